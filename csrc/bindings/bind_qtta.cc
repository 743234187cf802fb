// bind_qtta.cc — numpy wrapper of csrc/ops/qtta_ops.h: QttaState, a view of one QTTA's
// preallocated numpy arrays (edgevlm/adapt/qtta.py), checked once at construction (dtype,
// C-contiguity, shapes, writability), then stepped with one call per feature or batch.
// The arrays stay owned by numpy (reset / load_state_dict write into them in place); this
// object keeps references so their buffers outlive it. Errors are ValueError("[op] ...").
// The GIL is kept: a step is a few microseconds and touches arrays Python can see.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../common.h"
#include "../ops/qtta_ops.h"
#include "bind_util.h"

namespace py = pybind11;
using ev::fail;

namespace {

using ev_bind::shape_str;

constexpr const char* kOp = "qtta";

template <typename T>
T* data_of(const char* name, const py::array& a, std::vector<py::ssize_t> shape, bool writable) {
  if (!a.dtype().is(py::dtype::of<T>()))
    fail(kOp, "expected ", name, ".dtype ", py::str(py::dtype::of<T>()).cast<std::string>(), ", got ",
         py::str(a.dtype()).cast<std::string>());
  if (!(a.flags() & py::array::c_style)) fail(kOp, "expected ", name, " to be C-contiguous");
  bool ok = a.ndim() == (py::ssize_t)shape.size();
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
  if (!ok) {
    std::string want = "[";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    fail(kOp, "expected ", name, " of shape ", want, "], got ", shape_str(a));
  }
  if (writable && !a.writeable()) fail(kOp, "expected ", name, " to be writable (it is updated in place)");
  return static_cast<T*>(const_cast<void*>(a.data()));
}

class QttaState {
 public:
  // W [C, D] float32; per cache: keys [C, cap, D] int8, scale [C, cap] uint16 (binary16 bits),
  // ent [C, cap] float32, count [C] int32; negative masks [C, cap, ceil(C/8)] uint8.
  QttaState(py::array W, py::array pk, py::array ps, py::array pe, py::array pc, py::array nk, py::array ns,
            py::array ne, py::array nm, py::array nc, double logit_scale, double alpha_p, double beta_p,
            double alpha_n, double beta_n, double ent_lo, double ent_hi, double mask_lo, double mask_hi)
      : arrays_{W, pk, ps, pe, pc, nk, ns, ne, nm, nc} {
    if (W.ndim() != 2 || W.shape(0) < 2 || W.shape(1) < 1) fail(kOp, "expected W of shape [C >= 2, D >= 1], got ",
                                                                 shape_str(W));
    const int64_t C = W.shape(0), D = W.shape(1), MB = (C + 7) / 8;
    if (pk.ndim() != 3 || nk.ndim() != 3) fail(kOp, "expected keys of shape [C, cap, D]");
    const int64_t kp = pk.shape(1), kn = nk.shape(1);
    prm_ = {C, D, logit_scale, alpha_p, beta_p, alpha_n, beta_n, ent_lo, ent_hi, mask_lo, mask_hi};
    W_ = data_of<float>("W", W, {C, D}, false);
    pos_ = {data_of<int8_t>("pos_keys", pk, {C, kp, D}, true), data_of<uint16_t>("pos_scale", ps, {C, kp}, true),
            data_of<float>("pos_entropy", pe, {C, kp}, true), data_of<int32_t>("pos_count", pc, {C}, true), nullptr,
            kp};
    neg_ = {data_of<int8_t>("neg_keys", nk, {C, kn, D}, true), data_of<uint16_t>("neg_scale", ns, {C, kn}, true),
            data_of<float>("neg_entropy", ne, {C, kn}, true), data_of<int32_t>("neg_count", nc, {C}, true),
            data_of<uint8_t>("neg_masks", nm, {C, kn, MB}, true), kn};
    q_.resize(D);
    f_.resize(D);
    z0_.resize(C);
    p_.resize(C);
    mask_.resize(MB);
  }

  // feature [D] or [B, D] float32/float64 (C-contiguous), rows L2-normalised within norm_tol;
  // mode 0 zero-shot, 1 read the caches, 2 adapt (rows in order). Returns float32 [C] / [B, C].
  // Every row is checked before any row changes the caches.
  py::array_t<float> step(py::array feature, int mode, double norm_tol) {
    const int64_t C = prm_.classes, D = prm_.dim;
    if (mode < 0 || mode > 2) fail(kOp, "expected mode 0 (zero-shot), 1 (read) or 2 (adapt), got ", mode);
    const bool f32 = feature.dtype().is(py::dtype::of<float>());
    if (!f32 && !feature.dtype().is(py::dtype::of<double>()))
      fail(kOp, "expected feature.dtype float32 or float64, got ", py::str(feature.dtype()).cast<std::string>());
    if (!(feature.flags() & py::array::c_style)) fail(kOp, "expected feature to be C-contiguous");
    if ((feature.ndim() != 1 && feature.ndim() != 2) || feature.shape(feature.ndim() - 1) != D)
      fail(kOp, "expected feature of shape [D] or [B, D] with D=", D, ", got ", shape_str(feature));
    const int64_t B = feature.ndim() == 1 ? 1 : feature.shape(0);
    const float* src32 = f32 ? static_cast<const float*>(feature.data()) : nullptr;
    const double* src64 = f32 ? nullptr : static_cast<const double*>(feature.data());
    auto row = [&](int64_t b) {  // row b as float64 in f_ [D] (one row at a time: no [B, D] copy)
      if (f32)
        for (int64_t i = 0; i < D; ++i) f_[i] = (double)src32[b * D + i];
      else
        std::memcpy(f_.data(), src64 + b * D, (size_t)D * sizeof(double));
    };
    for (int64_t b = 0; b < B; ++b) {
      row(b);
      double ss = 0.0;
      for (int64_t i = 0; i < D; ++i) ss += f_[i] * f_[i];
      if (!std::isfinite(ss)) fail(kOp, "expected finite features, row ", b, " has non-finite values");
      const double norm = std::sqrt(ss);
      if (std::fabs(norm - 1.0) > norm_tol)
        fail(kOp, "expected L2-normalised features (|norm - 1| <= ", norm_tol, "), row ", b, " has norm ", norm);
    }
    py::array_t<float> out = feature.ndim() == 1 ? py::array_t<float>(C) : py::array_t<float>({B, C});
    float* o = out.mutable_data();
    ev::QttaScratch s{q_.data(), z0_.data(), p_.data(), mask_.data()};
    for (int64_t b = 0; b < B; ++b) {
      row(b);
      ev::qtta_step(prm_, W_, f_.data(), pos_, neg_, (ev::QttaMode)mode, s, o + b * C);
    }
    return out;
  }

 private:
  std::vector<py::array> arrays_;  // keeps the numpy buffers alive
  ev::QttaParams prm_{};
  const float* W_ = nullptr;
  ev::QttaCache pos_{}, neg_{};
  std::vector<double> f_, z0_, p_;
  std::vector<int8_t> q_;
  std::vector<uint8_t> mask_;
};

// quantize_int8(x [D] float64) -> (q [D] int8, scale bits uint16): the twin of edgevlm.adapt.quantize_int8.
py::tuple quantize_int8(py::array_t<double, py::array::c_style | py::array::forcecast> x) {
  py::array_t<int8_t> q(x.size());
  const uint16_t h = ev::qtta_quantize_int8(x.data(), x.size(), q.mutable_data());
  return py::make_tuple(q, h);
}

}  // namespace

void init_qtta(py::module_& m) {
  py::class_<QttaState>(m, "QttaState",
                        "One Q-TTA stream's caches (numpy arrays, updated in place); see csrc/ops/qtta_ops.h")
      .def(py::init<py::array, py::array, py::array, py::array, py::array, py::array, py::array, py::array,
                    py::array, py::array, double, double, double, double, double, double, double, double, double>(),
           py::arg("W"), py::arg("pos_keys"), py::arg("pos_scale"), py::arg("pos_entropy"), py::arg("pos_count"),
           py::arg("neg_keys"), py::arg("neg_scale"), py::arg("neg_entropy"), py::arg("neg_masks"),
           py::arg("neg_count"), py::arg("logit_scale"), py::arg("alpha_p"), py::arg("beta_p"), py::arg("alpha_n"),
           py::arg("beta_n"), py::arg("ent_lo"), py::arg("ent_hi"), py::arg("mask_lo"), py::arg("mask_hi"))
      .def("step", &QttaState::step, py::arg("feature"), py::arg("mode"), py::arg("norm_tol"));
  m.def("qtta_quantize_int8", &quantize_int8, py::arg("x"));
}
