// bind_encode.cc — numpy wrappers of csrc/ops/encode_ops.h (the encoder towers' float32 glue).
// Arguments are checked here (dtype, C-contiguity, shapes, writability) before any work;
// errors are ValueError("[op] expected X, got Y"). Every call releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::optional <-> None

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "../common.h"
#include "../ops/encode_ops.h"
#include "bind_util.h"

namespace py = pybind11;
using ev::fail;

namespace {

using ev_bind::shape_str;

// A float32 C-contiguous array; returns its data.
float* f32(const char* op, const char* name, const py::array& a) { return ev_bind::f32_data(op, name, a); }

ev::Gelu parse_gelu(const char* op, const std::string& s) {
  if (s == "quick") return ev::Gelu::Quick;
  if (s == "tanh") return ev::Gelu::Tanh;
  if (s == "erf") return ev::Gelu::Erf;
  fail(op, "expected kind one of quick|tanh|erf, got '", s, "'");
}

// gelu_inplace(x float32 C-contiguous writable, kind) -> None
void gelu_inplace(py::array x, const std::string& kind, int threads) {
  const char* op = "gelu_inplace";
  const ev::Gelu k = parse_gelu(op, kind);
  float* p = f32(op, "x", x);
  if (!x.writeable()) fail(op, "expected x to be writable (it is updated in place)");
  const int64_t n = x.size();
  py::gil_scoped_release nogil;
  ev::gelu_inplace(p, n, k, threads);
}

// layer_norm(x [..., D], w [D] | None, b [D] | None, eps, out=None) -> y [..., D]
py::array_t<float> layer_norm(py::array x, std::optional<py::array> w, std::optional<py::array> b, float eps,
                              std::optional<py::array> out, int threads) {
  const char* op = "layer_norm";
  if (x.ndim() < 1) fail(op, "expected x of shape [..., D], got a scalar");
  const float* xp = f32(op, "x", x);
  const int64_t d = x.shape(x.ndim() - 1), rows = d ? x.size() / d : 0;
  if (d <= 0) fail(op, "expected D > 0, got x of shape ", shape_str(x));
  if (!(eps >= 0.f) || !std::isfinite(eps)) fail(op, "expected a finite eps >= 0, got ", eps);
  const float* wp = nullptr;
  const float* bp = nullptr;
  if (w) {
    wp = f32(op, "w", *w);
    if (w->size() != d) fail(op, "expected w of shape [", d, "], got ", shape_str(*w));
  }
  if (b) {
    bp = f32(op, "b", *b);
    if (b->size() != d) fail(op, "expected b of shape [", d, "], got ", shape_str(*b));
  }
  py::array_t<float> y;
  if (out) {
    f32(op, "out", *out);
    if (out->ndim() != x.ndim() || !std::equal(x.shape(), x.shape() + x.ndim(), out->shape()))
      fail(op, "expected out of shape ", shape_str(x), ", got ", shape_str(*out));
    if (!out->writeable()) fail(op, "expected out to be writable");
    y = py::reinterpret_borrow<py::array_t<float>>(*out);
  } else {
    y = py::array_t<float>(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  }
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    ev::layer_norm_rows(xp, rows, d, wp, bp, eps, yp, threads);
  }
  return y;
}

// attend_encode(q [B, Tq, D], k [B, Tk, D], v [B, Tk, D], heads, scale=None, causal=False,
//               key_mask [B, Tk] | None, q_pos int64 [B, Tq] | None, out=None) -> out [B, Tq, D]
py::array_t<float> attend_encode(py::array q, py::array k, py::array v, int64_t heads, std::optional<float> scale,
                                 bool causal, std::optional<py::array> key_mask, std::optional<py::array> q_pos,
                                 std::optional<py::array> out, int threads) {
  const char* op = "attend_encode";
  for (const auto& [name, a] : {std::pair<const char*, const py::array*>{"q", &q}, {"k", &k}, {"v", &v}})
    if (a->ndim() != 3) fail(op, "expected ", name, " of shape [B, T, D], got ", shape_str(*a));
  const int64_t B = q.shape(0), tq = q.shape(1), d = q.shape(2), tk = k.shape(1);
  if (k.shape(0) != B || k.shape(2) != d || v.shape(0) != B || v.shape(1) != tk || v.shape(2) != d)
    fail(op, "expected k and v of shape [", B, ", Tk, ", d, "] (same Tk), got ", shape_str(k), " and ", shape_str(v));
  if (heads <= 0 || d % heads) fail(op, "expected heads > 0 dividing D=", d, ", got ", heads);
  if (tk <= 0) fail(op, "expected at least one key, got Tk=", tk);
  ev::AttnEncodeArgs a{};
  a.q = f32(op, "q", q);
  a.k = f32(op, "k", k);
  a.v = f32(op, "v", v);
  a.b = B;
  a.tq = tq;
  a.tk = tk;
  a.heads = heads;
  a.hd = d / heads;
  a.ldq = a.ldk = a.ldv = a.ldo = d;
  a.scale = scale ? *scale : 1.f / std::sqrt((float)a.hd);
  a.causal = causal;
  if (key_mask) {
    if (!key_mask->dtype().is(py::dtype::of<uint8_t>()) && !key_mask->dtype().is(py::dtype::of<bool>()))
      fail(op, "expected key_mask.dtype uint8 or bool, got ", py::str(key_mask->dtype()).cast<std::string>());
    if (!(key_mask->flags() & py::array::c_style) || key_mask->size() != B * tk)
      fail(op, "expected a C-contiguous key_mask of shape [", B, ", ", tk, "], got ", shape_str(*key_mask));
    a.key_mask = static_cast<const uint8_t*>(key_mask->data());
  }
  if (q_pos) {
    if (!q_pos->dtype().is(py::dtype::of<int64_t>()))
      fail(op, "expected q_pos.dtype int64, got ", py::str(q_pos->dtype()).cast<std::string>());
    if (!(q_pos->flags() & py::array::c_style) || q_pos->size() != B * tq)
      fail(op, "expected a C-contiguous q_pos of shape [", B, ", ", tq, "], got ", shape_str(*q_pos));
    a.q_pos = static_cast<const int64_t*>(q_pos->data());
  }
  py::array_t<float> o;
  if (out) {
    f32(op, "out", *out);
    if (out->ndim() != 3 || out->shape(0) != B || out->shape(1) != tq || out->shape(2) != d)
      fail(op, "expected out of shape [", B, ", ", tq, ", ", d, "], got ", shape_str(*out));
    if (!out->writeable()) fail(op, "expected out to be writable");
    o = py::reinterpret_borrow<py::array_t<float>>(*out);
  } else {
    o = py::array_t<float>({B, tq, d});
  }
  a.out = o.mutable_data();
  {
    py::gil_scoped_release nogil;
    ev::attend_encode(a, threads);
  }
  return o;
}

}  // namespace

void init_encode(py::module_& m) {
  m.def("gelu_inplace", &gelu_inplace, py::arg("x"), py::arg("kind"), py::arg("threads") = 0,
        "x <- gelu(x) in place (float32, C-contiguous, writable); kind: quick (x sigmoid(1.702 x)), "
        "tanh (gelu_pytorch_tanh) or erf (exact). threads <= 0: the pool size.");
  m.def("layer_norm", &layer_norm, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("eps"),
        py::arg("out") = py::none(), py::arg("threads") = 0,
        "LayerNorm over the last axis of float32 x [..., D] (biased variance): (x - mean) / sqrt(var + eps) * w + b.");
  m.def("attend_encode", &attend_encode, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("heads"),
        py::arg("scale") = py::none(), py::arg("causal") = false, py::arg("key_mask") = py::none(),
        py::arg("q_pos") = py::none(), py::arg("out") = py::none(), py::arg("threads") = 0,
        "Multi-head softmax attention q [B, Tq, D], k/v [B, Tk, D] -> [B, Tq, D] (scale default hd^-0.5; "
        "key_mask [B, Tk] nonzero = attend; causal: key j <= q_pos[b, i] or Tk - Tq + i), as "
        "edgevlm.runtime.layers.attention.");
}
