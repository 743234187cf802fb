// bind_kernels.cc — numpy wrappers around the kernel table. Every argument is checked
// here (dtype, C-contiguity, shape, divisibility) before any kernel runs; errors are
// ValueError("[op] expected X, got Y"). Long calls release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <string>

#include "../kernels/kernels.h"
#include "../kernels/linear.h"
#include "../membench.h"
#include "../qtypes/qtype.h"
#include "bind_util.h"

namespace py = pybind11;
using ev::fail;
using ev_bind::check_group;
using ev_bind::parse_qtype;
using ev_bind::resolve_isa;

namespace {

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

template <typename T>
void check_array(const char* op, const char* name, const py::array& a) {
  if (!py::isinstance<py::array_t<T>>(a) || !a.dtype().is(py::dtype::of<T>()))
    fail(op, "expected ", name, ".dtype ", py::str(py::dtype::of<T>()).cast<std::string>(), ", got ", dtype_str(a));
  if (!(a.flags() & py::array::c_style)) fail(op, "expected ", name, " to be C-contiguous (use np.ascontiguousarray)");
}

py::array_t<float> linear(py::array x, py::array w, const std::string& qtype, int group, int64_t n,
                          std::optional<py::array> bias, std::optional<py::array> out,
                          std::optional<std::string> isa_name, int threads) {
  const char* op = "linear";
  check_array<float>(op, "x", x);
  check_array<uint8_t>(op, "w", w);
  if (x.ndim() != 1 && x.ndim() != 2) fail(op, "expected x of shape [M, K] or [K], got ndim=", x.ndim());
  const ev::QType t = parse_qtype(op, qtype);
  const int64_t K = x.shape(x.ndim() - 1), M = x.ndim() == 2 ? x.shape(0) : 1;
  check_group(op, t, group, K);
  if (n <= 0) fail(op, "expected n (output features) > 0, got ", n);
  if (w.ndim() != 1) fail(op, "expected w as a 1-D packed uint8 blob, got ndim=", w.ndim());
  const int64_t want = ev::packed_size(t, n, K, group);
  if (w.shape(0) != want)
    fail(op, "expected w of ", want, " bytes for ", qtype, " N=", n, " K=", K, " group=", group, ", got ", w.shape(0),
         " (is K = x.shape[-1] the weight's in-features?)");
  const float* bptr = nullptr;
  if (bias) {
    check_array<float>(op, "bias", *bias);
    if (bias->ndim() != 1 || bias->shape(0) != n) fail(op, "expected bias of shape [", n, "], got ndim=", bias->ndim(),
                                                         bias->ndim() ? " len=" + std::to_string(bias->shape(0)) : "");
    bptr = static_cast<const float*>(bias->data());
  }
  py::array_t<float> y;
  if (out) {
    check_array<float>(op, "out", *out);
    const bool ok = x.ndim() == 2 ? (out->ndim() == 2 && out->shape(0) == M && out->shape(1) == n)
                                  : (out->ndim() == 1 && out->shape(0) == n);
    if (!ok) fail(op, "expected out of shape ", x.ndim() == 2 ? "[" + std::to_string(M) + ", " : "[", n, "]");
    if (!out->writeable()) fail(op, "expected a writeable out array");
    y = py::reinterpret_borrow<py::array_t<float>>(*out);
  } else {
    y = x.ndim() == 2 ? py::array_t<float>({M, n}) : py::array_t<float>({n});
  }
  if (M == 0) return y;
  const ev::Isa isa = resolve_isa(op, isa_name);
  const ev::QMatrix qm = ev::qmatrix_view(t, n, K, group, static_cast<const uint8_t*>(w.data()));
  const float* xp = static_cast<const float*>(x.data());
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    ev::linear(xp, M, qm, bptr, yp, isa, threads);
  }
  return y;
}

py::array_t<uint8_t> quantize(py::array w, const std::string& qtype, int group) {
  const char* op = "quantize";
  check_array<float>(op, "w", w);
  if (w.ndim() != 2) fail(op, "expected w of shape [N, K], got ndim=", w.ndim());
  const ev::QType t = parse_qtype(op, qtype);
  const int64_t N = w.shape(0), K = w.shape(1);
  check_group(op, t, group, K);
  const float* wp = static_cast<const float*>(w.data());
  if (t == ev::QType::Q2B) {  // fp32 scale planes: any finite weight
    for (int64_t i = 0; i < N * K; ++i)
      if (!std::isfinite(wp[i])) fail(op, "expected finite weights, got ", wp[i], " at flat index ", i);
  } else {
    for (int64_t i = 0; i < N * K; ++i)
      if (!(std::fabs(wp[i]) <= 65504.f)) fail(op, "expected finite weights with |w| <= 65504 (fp16 range), got ", wp[i], " at flat index ", i);
  }
  py::array_t<uint8_t> blob(ev::packed_size(t, N, K, group));
  uint8_t* bp = blob.mutable_data();
  {
    py::gil_scoped_release nogil;
    ev::quantize_rows_ref(t, wp, N, K, group, bp);
  }
  return blob;
}

py::array_t<float> dequantize(py::array w, const std::string& qtype, int group, int64_t n, int64_t k) {
  const char* op = "dequantize";
  check_array<uint8_t>(op, "w", w);
  const ev::QType t = parse_qtype(op, qtype);
  check_group(op, t, group, k);
  if (n <= 0) fail(op, "expected n > 0, got ", n);
  if (w.ndim() != 1 || w.shape(0) != ev::packed_size(t, n, k, group))
    fail(op, "expected a 1-D blob of ", ev::packed_size(t, n, k, group), " bytes, got ", w.ndim() == 1 ? w.shape(0) : -1);
  py::array_t<float> out({n, k});
  const ev::QMatrix qm = ev::qmatrix_view(t, n, k, group, static_cast<const uint8_t*>(w.data()));
  float* op_ = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    ev::dequant_rows_ref(qm, 0, n, op_);
  }
  return out;
}

py::tuple quantize_acts(py::array x, int group, std::optional<std::string> isa_name) {
  const char* op = "quantize_acts";
  check_array<float>(op, "x", x);
  if (x.ndim() != 2) fail(op, "expected x of shape [M, K], got ndim=", x.ndim());
  const int64_t M = x.shape(0), K = x.shape(1);
  // 16: the activation groups of q2b (one int8 scale per weight group of 16).
  if (group == 16) { if (K <= 0 || K % 32) fail(op, "expected K a positive multiple of 32 for group 16, got K=", K); }
  else check_group(op, group, K);
  const ev::IsaKernels& kt = ev::kernels_for(resolve_isa(op, isa_name));
  py::array_t<int8_t> q({M, K});
  py::array_t<float> d({M, K / group}), s({M, K / group});
  kt.quantize_acts(static_cast<const float*>(x.data()), 0, M, K, group, q.mutable_data(), d.mutable_data(),
                   s.mutable_data());
  return py::make_tuple(q, d, s);
}

uint64_t stream_read(py::array buf, int threads) {
  check_array<uint8_t>("stream_read", "buf", buf);
  const auto* p = static_cast<const uint8_t*>(buf.data());
  const int64_t nb = buf.nbytes();
  py::gil_scoped_release nogil;
  return ev::stream_read(p, nb, threads);
}

}  // namespace

void init_kernels(py::module_& m) {
  m.def("linear", &linear, py::arg("x"), py::arg("w"), py::arg("qtype"), py::arg("group"), py::arg("n"),
        py::arg("bias") = py::none(), py::arg("out") = py::none(), py::arg("isa") = py::none(),
        py::arg("threads") = 0,
        "Y[M, N] = X[M, K] @ dequant(W)[N, K]^T (+ bias). x: float32 [M, K] or [K]; w: uint8 packed blob "
        "(edgevlm.qtypes layout); threads=0 uses get_num_threads(). Releases the GIL.");
  m.def("quantize", &quantize, py::arg("w"), py::arg("qtype"), py::arg("group"),
        "RTN-quantize float32 W[N, K] into a packed blob (C++ reference; bit-identical to edgevlm.qtypes).");
  m.def("dequantize", &dequantize, py::arg("w"), py::arg("qtype"), py::arg("group"), py::arg("n"), py::arg("k"),
        "Packed blob -> float32 [N, K] (C++ reference).");
  m.def("quantize_acts", &quantize_acts, py::arg("x"), py::arg("group"), py::arg("isa") = py::none(),
        "int8 activation quantization used by the SIMD kernels: returns (q int8 [M,K], d f32 [M,G], s f32 [M,G]).");
  m.def("packed_size", [](const std::string& qtype, int64_t n, int64_t k, int group) {
    const ev::QType t = parse_qtype("packed_size", qtype);
    check_group("packed_size", t, group, k);
    return ev::packed_size(t, n, k, group);
  }, py::arg("qtype"), py::arg("n"), py::arg("k"), py::arg("group"));
  m.def("stream_read", &stream_read, py::arg("buf"), py::arg("threads") = 0,
        "Read every byte of buf once on `threads` threads (memory bandwidth probe); returns a checksum.");
}
