// module.cc — the edgevlm._core extension: registers the bindings, nothing else.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void init_kernels(py::module_& m);
void init_info(py::module_& m);
void init_ops(py::module_& m);
void init_encode(py::module_& m);
void init_qtta(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "edgevlm native kernels: packed low-bit dequant-matmul (see csrc/)";
  init_kernels(m);
  init_info(m);
  init_ops(m);
  init_encode(m);
  init_qtta(m);
}
