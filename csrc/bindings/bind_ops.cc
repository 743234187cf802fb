// bind_ops.cc — numpy wrappers of csrc/ops/decode_ops.h (the decoder's per-token glue).
// Arguments are checked here (dtype, contiguity, shapes, writability of the caches) before
// any work; errors are ValueError("[op] expected X, got Y"). The attention call releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::optional <-> None

#include <optional>
#include <string>

#include "../common.h"
#include "../ops/decode_ops.h"
#include "../threadpool.h"

namespace py = pybind11;
using ev::fail;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

// A float32 C-contiguous array of `n` elements (any shape); returns its data.
const float* f32(const char* op, const char* name, const py::array& a, int64_t n) {
  if (!a.dtype().is(py::dtype::of<float>()))
    fail(op, "expected ", name, ".dtype float32, got ", py::str(a.dtype()).cast<std::string>());
  if (!(a.flags() & py::array::c_style)) fail(op, "expected ", name, " to be C-contiguous (use np.ascontiguousarray)");
  if (a.size() != n) fail(op, "expected ", name, " with ", n, " elements, got shape ", shape_str(a));
  return static_cast<const float*>(a.data());
}

const float* opt_f32(const char* op, const char* name, const std::optional<py::array>& a, int64_t n) {
  return a ? f32(op, name, *a, n) : nullptr;
}

// rms_norm(x [..., D], w [D] | None, eps) -> y [..., D]
py::array_t<float> rms_norm(py::array x, std::optional<py::array> w, float eps) {
  const char* op = "rms_norm";
  if (x.ndim() < 1) fail(op, "expected x of shape [..., D], got a scalar");
  const int64_t d = x.shape(x.ndim() - 1), rows = d ? x.size() / d : 0;
  const float* xp = f32(op, "x", x, x.size());
  const float* wp = opt_f32(op, "w", w, d);
  py::array_t<float> y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  float* yp = y.mutable_data();
  for (int64_t r = 0; r < rows; ++r) ev::rms_norm_row(xp + r * d, wp, d, eps, yp + r * d);
  return y;
}

// add_rms_norm(x [..., D] (updated: x += y), y [..., D], w [D] | None, eps) -> rms_norm(x)
py::array_t<float> add_rms_norm(py::array x, py::array y, std::optional<py::array> w, float eps) {
  const char* op = "add_rms_norm";
  if (x.ndim() < 1) fail(op, "expected x of shape [..., D], got a scalar");
  if (!x.writeable()) fail(op, "expected x to be writable (it is updated in place)");
  const int64_t d = x.shape(x.ndim() - 1), rows = d ? x.size() / d : 0;
  float* xp = const_cast<float*>(f32(op, "x", x, x.size()));
  const float* yp = f32(op, "y", y, x.size());
  const float* wp = opt_f32(op, "w", w, d);
  for (int64_t i = 0; i < x.size(); ++i) xp[i] += yp[i];
  py::array_t<float> h(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  for (int64_t r = 0; r < rows; ++r) ev::rms_norm_row(xp + r * d, wp, d, eps, h.mutable_data() + r * d);
  return h;
}

// silu_mul(g, u) -> silu(g) * u, same shape
py::array_t<float> silu_mul(py::array g, py::array u) {
  const char* op = "silu_mul";
  const float* gp = f32(op, "g", g, g.size());
  const float* up = f32(op, "u", u, g.size());
  py::array_t<float> out(std::vector<py::ssize_t>(g.shape(), g.shape() + g.ndim()));
  ev::silu_mul(gp, up, g.size(), out.mutable_data());
  return out;
}

py::array_t<float> attend_decode(py::array q, py::array k, py::array v, py::array kc, py::array vc, int64_t pos,
                                 py::array cos, py::array sin, std::optional<py::array> q_norm,
                                 std::optional<py::array> k_norm, float eps, float scale, int threads) {
  const char* op = "attend_decode";
  if (kc.ndim() != 3) fail(op, "expected kc of shape [Hkv, ctx, hd], got ", shape_str(kc));
  const int64_t hkv = kc.shape(0), ctx = kc.shape(1), hd = kc.shape(2);
  if (vc.ndim() != 3 || vc.shape(0) != hkv || vc.shape(1) != ctx || vc.shape(2) != hd)
    fail(op, "expected vc of shape ", shape_str(kc), " like kc, got ", shape_str(vc));
  if (!kc.writeable() || !vc.writeable()) fail(op, "expected writable kc and vc (the token's K/V are stored there)");
  if (hd <= 0 || hkv <= 0) fail(op, "expected non-empty heads, got kc ", shape_str(kc));
  if (q.size() % hd != 0 || q.size() / hd < hkv || (q.size() / hd) % hkv != 0)
    fail(op, "expected q with a multiple of Hkv=", hkv, " heads of ", hd, ", got shape ", shape_str(q));
  if (pos < 0 || pos >= ctx) fail(op, "expected 0 <= pos < ctx=", ctx, ", got pos=", pos);
  const int64_t rot = cos.size();
  if (rot % 2 != 0 || rot > hd || rot <= 0) fail(op, "expected cos of an even length <= hd=", hd, ", got ", rot);
  ev::AttnDecodeArgs a{};
  a.hq = q.size() / hd;
  a.hkv = hkv;
  a.hd = hd;
  a.ctx = ctx;
  a.pos = pos;
  a.rot = rot;
  a.q = f32(op, "q", q, a.hq * hd);
  a.k = f32(op, "k", k, hkv * hd);
  a.v = f32(op, "v", v, hkv * hd);
  a.kc = const_cast<float*>(f32(op, "kc", kc, hkv * ctx * hd));
  a.vc = const_cast<float*>(f32(op, "vc", vc, hkv * ctx * hd));
  a.cos = f32(op, "cos", cos, rot);
  a.sin = f32(op, "sin", sin, rot);
  a.qn = opt_f32(op, "q_norm", q_norm, hd);
  a.kn = opt_f32(op, "k_norm", k_norm, hd);
  a.eps = eps;
  a.scale = scale;
  py::array_t<float> out(std::vector<py::ssize_t>{(py::ssize_t)(a.hq * hd)});
  a.out = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    ev::attend_decode(a, threads > 0 ? threads : ev::get_num_threads());
  }
  return out;
}

}  // namespace

void init_ops(py::module_& m) {
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("w"), py::arg("eps"),
        "x [..., D] / sqrt(mean(x^2) + eps) * w (w None: no weight); float32, sum of squares in double.");
  m.def("add_rms_norm", &add_rms_norm, py::arg("x"), py::arg("y"), py::arg("w"), py::arg("eps"),
        "x += y in place (the residual), then returns rms_norm(x, w, eps).");
  m.def("silu_mul", &silu_mul, py::arg("g"), py::arg("u"), "silu(g) * u (the SwiGLU gate), float32.");
  m.def("attend_decode", &attend_decode, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("kc"), py::arg("vc"),
        py::arg("pos"), py::arg("cos"), py::arg("sin"), py::arg("q_norm") = py::none(),
        py::arg("k_norm") = py::none(), py::arg("eps") = 1e-6f, py::arg("scale") = 1.0f, py::arg("threads") = 0,
        "One decode token's attention: optional per-head q/k RMSNorm, RoPE (cos/sin [rot]), K/V stored "
        "at cache slot pos of kc/vc [Hkv, ctx, hd], grouped-query softmax attention over slots [0, pos]. "
        "Returns float32 [Hq * hd]. Releases the GIL.");
}
