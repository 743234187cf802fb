// bind_info.cc — build and CPU introspection: compiled ISAs, CPU features, threads.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "../cpu_features.h"
#include "../kernels/kernels.h"
#include "../threadpool.h"

namespace py = pybind11;

void init_info(py::module_& m) {
  m.def("compiled_isas", [] {
    std::vector<std::string> out;
    for (int i = 0; i < ev::kNumIsas; ++i)
      if (ev::isa_compiled((ev::Isa)i)) out.push_back(ev::isa_name((ev::Isa)i));
    return out;
  }, "ISAs compiled into this build, e.g. ['ref', 'avx2', 'avxvnni'].");
  m.def("supported_isas", [] {
    std::vector<std::string> out;
    for (int i = 0; i < ev::kNumIsas; ++i)
      if (ev::isa_supported((ev::Isa)i)) out.push_back(ev::isa_name((ev::Isa)i));
    return out;
  }, "Compiled ISAs this CPU can run.");
  m.def("default_isa", [] { return std::string(ev::isa_name(ev::default_isa())); },
        "ISA used when none is given: EDGEVLM_ISA if set, else the best supported one.");
  m.def("cpu_features", [] {
    const ev::CpuFeatures& f = ev::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c; d["avx_vnni"] = f.avxvnni;
    d["avx512_vnni"] = f.avx512vnni;
    d["neon"] = f.neon; d["dotprod"] = f.dotprod; d["i8mm"] = f.i8mm;
    return d;
  });
  m.def("set_num_threads", [](int n) {
    if (n < 1) ev::fail("set_num_threads", "expected n >= 1, got ", n);
    ev::set_num_threads(n);
  }, py::arg("n"), "Threads used by every kernel call (caller included).");
  m.def("get_num_threads", &ev::get_num_threads);
}
