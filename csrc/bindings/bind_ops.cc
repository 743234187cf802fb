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
#include "../ops/decode_step.h"
#include "../threadpool.h"
#include "bind_util.h"

namespace py = pybind11;
using ev::fail;

namespace {

using ev_bind::shape_str;

// A float32 C-contiguous array of `n` elements (any shape); returns its data.
const float* f32(const char* op, const char* name, const py::array& a, int64_t n) {
  const float* p = ev_bind::f32_data(op, name, a);
  if (a.size() != n) fail(op, "expected ", name, " with ", n, " elements, got shape ", shape_str(a));
  return p;
}

// A KV cache: a writable C-contiguous float32 or float16 array of `n` elements; returns its data
// and sets *f16 to which.
void* kv_cache(const char* op, const char* name, const py::array& a, int64_t n, bool* f16) {
  const bool is32 = a.dtype().is(py::dtype::of<float>()), is16 = a.dtype().is(py::dtype("float16"));
  if (!is32 && !is16) fail(op, "expected ", name, " of dtype float32 or float16, got ", std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) fail(op, "expected a C-contiguous ", name);
  if (!a.writeable()) fail(op, "expected a writable ", name, " (the token's K/V are stored there)");
  if (a.size() != n) fail(op, "expected ", name, " with ", n, " elements, got shape ", shape_str(a));
  *f16 = is16;
  return const_cast<void*>(a.data());
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
  bool kf16 = false, vf16 = false;
  a.kc = kv_cache(op, "kc", kc, hkv * ctx * hd, &kf16);
  a.vc = kv_cache(op, "vc", vc, hkv * ctx * hd, &vf16);
  if (kf16 != vf16) fail(op, "expected kc and vc of one dtype, got ", std::string(py::str(kc.dtype())), " and ",
                         std::string(py::str(vc.dtype())));
  a.kv_f16 = kf16;
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

// A decode plan: raw views of every layer's packed weights, norms and KV cache (kept alive by
// `keep`), checked once when built; step() then runs a token through all layers in one call.
class DecodePlan {
 public:
  DecodePlan(const py::list& layers, py::array norm, py::tuple dims, float eps, float scale,
             std::optional<std::string> isa_name) {
    const char* op = "DecodePlan";
    if (dims.size() != 6) fail(op, "expected dims (d, hq, hkv, hd, ctx, inter), got ", dims.size(), " values");
    ev::StepModel& m = m_;
    m.d = dims[0].cast<int64_t>();
    m.hq = dims[1].cast<int64_t>();
    m.hkv = dims[2].cast<int64_t>();
    m.hd = dims[3].cast<int64_t>();
    m.ctx = dims[4].cast<int64_t>();
    m.inter = dims[5].cast<int64_t>();
    if (m.d <= 0 || m.hq <= 0 || m.hkv <= 0 || m.hd <= 0 || m.ctx <= 0 || m.inter <= 0 || m.hq % m.hkv)
      fail(op, "expected positive dims with hq a multiple of hkv, got d=", m.d, " hq=", m.hq, " hkv=", m.hkv, " hd=",
           m.hd, " ctx=", m.ctx, " inter=", m.inter);
    m.eps = eps;
    m.scale = scale;
    m.isa = ev_bind::resolve_isa(op, isa_name);
    m.norm = keep_f32(op, "norm", norm, m.d);
    const int64_t nq = m.hq * m.hd, nkv = m.hkv * m.hd;
    for (const py::handle& item : layers) {
      const py::tuple t = py::reinterpret_borrow<py::tuple>(item);
      if (t.size() != 7) fail(op, "expected each layer as (linears, n1, n2, q_norm, k_norm, kc, vc), got ", t.size(), " items");
      const py::list lins = t[0].cast<py::list>();
      if (lins.size() != 7) fail(op, "expected 7 linears (q, k, v, o, gate, up, down), got ", lins.size());
      ev::StepLayer L{};
      const int64_t shapes[7][2] = {{nq, m.d}, {nkv, m.d}, {nkv, m.d}, {m.d, nq}, {m.inter, m.d}, {m.inter, m.d}, {m.d, m.inter}};
      ev::StepLinear* dst[7] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
      for (int i = 0; i < 7; ++i) *dst[i] = linear_view(op, lins[i].cast<py::tuple>(), shapes[i][0], shapes[i][1]);
      L.n1 = keep_f32(op, "n1", t[1].cast<py::array>(), m.d);
      L.n2 = keep_f32(op, "n2", t[2].cast<py::array>(), m.d);
      L.qn = t[3].is_none() ? nullptr : keep_f32(op, "q_norm", t[3].cast<py::array>(), m.hd);
      L.kn = t[4].is_none() ? nullptr : keep_f32(op, "k_norm", t[4].cast<py::array>(), m.hd);
      bool kf16 = false, vf16 = false;
      L.kc = cache(op, "kc", t[5].cast<py::array>(), &kf16);
      L.vc = cache(op, "vc", t[6].cast<py::array>(), &vf16);
      if (kf16 != vf16 || (!m.layers.empty() && kf16 != m.kv_f16))
        fail(op, "expected every layer's kc and vc of one dtype (float32 or float16)");
      m.kv_f16 = kf16;
      m.layers.push_back(L);
    }
  }

  // x [d] float32 (the token's embedding; updated in place to the residual stream) -> h [d],
  // the final RMSNorm output (the LM head's input). cos/sin [rot] of position pos.
  py::array_t<float> step(py::array x, int64_t pos, py::array cos, py::array sin, int threads) {
    const char* op = "DecodePlan.step";
    if (!x.writeable()) fail(op, "expected a writable x (it is updated in place)");
    float* xp = const_cast<float*>(f32(op, "x", x, m_.d));
    if (pos < 0 || pos >= m_.ctx) fail(op, "expected 0 <= pos < ctx=", m_.ctx, ", got pos=", pos);
    const int64_t rot = cos.size();
    if (rot % 2 != 0 || rot > m_.hd || rot <= 0) fail(op, "expected cos of an even length <= hd=", m_.hd, ", got ", rot);
    const float* cp = f32(op, "cos", cos, rot);
    const float* sp = f32(op, "sin", sin, rot);
    py::array_t<float> h(std::vector<py::ssize_t>{(py::ssize_t)m_.d});
    float* hp = h.mutable_data();
    {
      py::gil_scoped_release nogil;
      ev::decode_step(m_, xp, pos, cp, sp, rot, threads > 0 ? threads : ev::get_num_threads(), hp);
    }
    return h;
  }

  int64_t n_layers() const { return (int64_t)m_.layers.size(); }

 private:
  const float* keep_f32(const char* op, const char* name, const py::array& a, int64_t n) {
    const float* p = f32(op, name, a, n);
    keep_.push_back(a);
    return p;
  }

  void* cache(const char* op, const char* name, const py::array& a, bool* f16) {
    if (a.ndim() != 3 || a.shape(0) != m_.hkv || a.shape(1) != m_.ctx || a.shape(2) != m_.hd)
      fail(op, "expected ", name, " of shape [", m_.hkv, ", ", m_.ctx, ", ", m_.hd, "], got ", shape_str(a));
    void* p = kv_cache(op, name, a, a.size(), f16);
    keep_.push_back(a);
    return p;
  }

  // (blob uint8 [bytes], qtype, group, n, k, bias float32 [n] | None) of a packed W [n, k]
  ev::StepLinear linear_view(const char* op, const py::tuple& t, int64_t n, int64_t k) {
    if (t.size() != 6) fail(op, "expected a linear as (blob, qtype, group, n, k, bias), got ", t.size(), " items");
    const py::array blob = t[0].cast<py::array>();
    const ev::QType qt = ev_bind::parse_qtype(op, t[1].cast<std::string>());
    const int group = t[2].cast<int>();
    if (t[3].cast<int64_t>() != n || t[4].cast<int64_t>() != k)
      fail(op, "expected a linear of shape [", n, ", ", k, "], got [", t[3].cast<int64_t>(), ", ", t[4].cast<int64_t>(), "]");
    ev_bind::check_group(op, qt, group, k);
    if (!blob.dtype().is(py::dtype::of<uint8_t>()) || blob.ndim() != 1 || !(blob.flags() & py::array::c_style) ||
        blob.shape(0) != ev::packed_size(qt, n, k, group))
      fail(op, "expected a contiguous uint8 blob of ", ev::packed_size(qt, n, k, group), " bytes for ",
           ev::qtype_name(qt), " [", n, ", ", k, "] group ", group, ", got shape ", shape_str(blob));
    keep_.push_back(blob);
    ev::StepLinear l{ev::qmatrix_view(qt, n, k, group, static_cast<const uint8_t*>(blob.data())), nullptr};
    if (!t[5].is_none()) l.bias = keep_f32(op, "bias", t[5].cast<py::array>(), n);
    return l;
  }

  ev::StepModel m_{};
  std::vector<py::object> keep_;  // every array a view points into
};

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
  py::class_<DecodePlan>(m, "DecodePlan",
                         "Views of a Llama/Qwen2-family decoder's packed layers and KV cache; step() runs one "
                         "decode token through every layer (csrc/ops/decode_step.h).")
      .def(py::init<const py::list&, py::array, py::tuple, float, float, std::optional<std::string>>(),
           py::arg("layers"), py::arg("norm"), py::arg("dims"), py::arg("eps"), py::arg("scale"),
           py::arg("isa") = py::none())
      .def("step", &DecodePlan::step, py::arg("x"), py::arg("pos"), py::arg("cos"), py::arg("sin"),
           py::arg("threads") = 0, "x [d] (updated in place) -> final-normed h [d]. Releases the GIL.")
      .def_property_readonly("n_layers", &DecodePlan::n_layers);
}
