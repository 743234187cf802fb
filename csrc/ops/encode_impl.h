// encode_impl.h — the bodies of encode_ops.h, compiled once per ISA: csrc/ops/encode_ops.cc
// (baseline target), csrc/ops/encode_ops_avx2.cc (-mavx2 -mfma) and
// csrc/kernels/avx512vnni/encode_avx512.cc (AVX-512). Plain loops on GCC/Clang vector types of
// EV_ENCODE_LANES floats (8: two SSE / NEON or one AVX register; 16: one zmm), so one source
// serves every ISA; the compiler contracts a * b + c into FMAs where the target has them.
// Include after defining EV_ENCODE_NS (the namespace the functions go in) and EV_ENCODE_LANES.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../threadpool.h"
#include "encode_ops.h"

#if !defined(EV_ENCODE_NS) || !defined(EV_ENCODE_LANES)
#error "define EV_ENCODE_NS and EV_ENCODE_LANES before including encode_impl.h"
#endif

namespace ev {
namespace EV_ENCODE_NS {

constexpr int L = EV_ENCODE_LANES;
typedef float vf __attribute__((vector_size(4 * EV_ENCODE_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * EV_ENCODE_LANES)));
// Only inline helpers take or return vf, so the baseline build's "vector return without AVX
// changes the ABI" note does not apply (nothing crosses a translation unit).
#pragma GCC diagnostic ignored "-Wpsabi"

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < L; ++i) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < L; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// e^x per lane: x clamped to [-87.3, 88.7] (e^-87.3 = 1.2e-38 is still a normal float, so no
// denormal assists; e^88.7 overflows to inf as it should), x = n ln2 + r with |r| <= ln2/2
// (Cody-Waite split of ln2), e^r by its degree-6 Taylor polynomial (relative error < 1.3e-7),
// 2^n from the exponent bits (round to nearest by the 1.5 * 2^23 trick, no libm call).
inline vf vexp(vf x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  x = x > splat(88.7f) ? splat(88.7f) : x;
  const vf fn = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const vi n = __builtin_convertvector(fn, vi);
  const vf r = (x - fn * 0.693145751953125f) - fn * 1.42860682030941723212e-6f;
  vf p = splat(1.f / 720.f);
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi bits = (n + 127) << 23;
  return p * (vf)bits;
}

// ---- GELU variants ----

inline vf gelu_quick(vf x) { return x / (1.f + vexp(x * -1.702f)); }

// 0.5 x (1 + tanh(u)) = x sigmoid(2u) = x / (1 + e^-2u): no cancellation for x << 0.
inline vf gelu_tanh(vf x) {
  const vf u = (x + x * x * x * 0.044715f) * 0.7978845608028654f;
  return x / (1.f + vexp(u * -2.f));
}

// Exact GELU 0.5 x erfc(-z), z = x / sqrt 2. z >= 0: 1 + erf(z), erf(z) = z P(z^2) / Q(z^2) on
// [-4, 4] (Eigen's / XLA's float rational approximation, |error| < 1e-7; the twin
// edgevlm.runtime.layers.gelu uses the same coefficients). z < 0: erfc(|z|) = t e^(-z^2 + R(t)),
// t = 1 / (1 + |z|/2) (Numerical Recipes' erfcc, relative error < 1.2e-7), which keeps the
// negative tail's relative accuracy where 1 + erf(z) would cancel.
inline vf gelu_erf(vf x) {
  const vf z = x * 0.7071067811865476f;
  vf zc = z < splat(-4.f) ? splat(-4.f) : z;
  zc = zc > splat(4.f) ? splat(4.f) : zc;
  const vf z2 = zc * zc;
  vf p = splat(-2.72614225801306e-10f);
  p = p * z2 + 2.77068142495902e-08f;
  p = p * z2 + -2.10102402082508e-06f;
  p = p * z2 + -5.69250639462346e-05f;
  p = p * z2 + -7.34990630326855e-04f;
  p = p * z2 + -2.95459980854025e-03f;
  p = p * z2 + -1.60960333262415e-02f;
  vf q = splat(-1.45660718464996e-05f);
  q = q * z2 + -2.13374055278905e-04f;
  q = q * z2 + -1.68282697438203e-03f;
  q = q * z2 + -7.37332916720468e-03f;
  q = q * z2 + -1.42647390514189e-02f;
  const vf pos = 1.f + zc * p / q;
  const vf a = z < 0.f ? -z : z;
  const vf t = 1.f / (1.f + a * 0.5f);
  vf r = splat(0.17087277f);
  r = r * t + -0.82215223f;
  r = r * t + 1.48851587f;
  r = r * t + -1.13520398f;
  r = r * t + 0.27886807f;
  r = r * t + -0.18628806f;
  r = r * t + 0.09678418f;
  r = r * t + 0.37409196f;
  r = r * t + 1.00002368f;
  r = r * t + -1.26551223f;
  const vf neg = t * vexp(r - a * a);
  return 0.5f * x * (z < 0.f ? neg : pos);
}

template <vf (*F)(vf)>
inline void map_inplace(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + L <= n; i += L) store(x + i, F(load(x + i)));
  if (i < n) {  // tail through a zero-padded vector
    float buf[L] = {};
    std::memcpy(buf, x + i, (size_t)(n - i) * sizeof(float));
    store(buf, F(load(buf)));
    std::memcpy(x + i, buf, (size_t)(n - i) * sizeof(float));
  }
}

// Below this many elements one thread does the whole call (waking the pool costs ~10 us).
constexpr int64_t kMinParallel = 1 << 15;

inline int pick_threads(int threads, int64_t work) {
  const int nt = threads > 0 ? threads : get_num_threads();
  return work < kMinParallel ? 1 : std::max(1, nt);
}

inline void gelu_inplace(float* x, int64_t n, Gelu kind, int threads) {
  const int nt = pick_threads(threads, n);
  const int64_t per = ((n + nt - 1) / nt + L - 1) / L * L;  // whole vectors per thread
  parallel_for(nt, [&](int t) {
    const int64_t i0 = std::min(n, t * per), i1 = std::min(n, i0 + per);
    if (i0 >= i1) return;
    switch (kind) {
      case Gelu::Quick: map_inplace<gelu_quick>(x + i0, i1 - i0); break;
      case Gelu::Tanh: map_inplace<gelu_tanh>(x + i0, i1 - i0); break;
      case Gelu::Erf: map_inplace<gelu_erf>(x + i0, i1 - i0); break;
    }
  });
}

// ---- LayerNorm ----

inline void layer_norm_row(const float* x, int64_t d, const float* w, const float* b, float eps, float* y) {
  vf acc = {};
  int64_t i = 0;
  for (; i + L <= d; i += L) acc += load(x + i);
  float s = hsum(acc);
  for (; i < d; ++i) s += x[i];
  const float mean = s / (float)d;
  acc = vf{};
  for (i = 0; i + L <= d; i += L) {
    const vf c = load(x + i) - mean;
    acc += c * c;
  }
  float ss = hsum(acc);
  for (; i < d; ++i) ss += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.f / std::sqrt(ss / (float)d + eps);
  for (i = 0; i + L <= d; i += L) {
    vf c = (load(x + i) - mean) * inv;
    if (w) c *= load(w + i);
    if (b) c += load(b + i);
    store(y + i, c);
  }
  for (; i < d; ++i) {
    float c = (x[i] - mean) * inv;
    if (w) c *= w[i];
    if (b) c += b[i];
    y[i] = c;
  }
}

// LayerNorm streams its row twice at a few flops per element: a ViT-B row block (197 x 768) is
// ~50 us on one core, about what a pool wake-up costs on a busy machine, so it splits only above.
constexpr int64_t kMinParallelNorm = 1 << 18;

inline void layer_norm_rows(const float* x, int64_t rows, int64_t d, const float* w, const float* b, float eps,
                            float* y, int threads) {
  const int nt = rows * d < kMinParallelNorm ? 1 : pick_threads(threads, rows * d);
  const int64_t per = (rows + nt - 1) / nt;
  parallel_for(nt, [&](int t) {
    for (int64_t r = t * per; r < std::min(rows, (t + 1) * per); ++r) layer_norm_row(x + r * d, d, w, b, eps, y + r * d);
  });
}

// ---- attention ----
// Per (batch, head): K^T [hd][tkp] and V [tk][hdp] packed once (tkp, hdp rounded up to L,
// zero-padded), then per block of kR query rows: scores S = scale q K^T as kR x kC register
// tiles (one K^T vector load feeds kR FMAs), masks, row max, e = exp(s - max) and its sum,
// O = (e V) / sum as kR x kC tiles (one V vector load feeds kR FMAs).
constexpr int kR = L == 16 ? 4 : 2;  // query rows per tile (zmm: 32 registers, ymm: 16)
constexpr int kC = 4;                // vectors per tile

template <int R, int C>
inline void score_tile(const float* const* q, const float* kt, int64_t tkp, int64_t hd, int64_t j0, float scale,
                       float* s) {
  vf acc[R][C] = {};
  for (int64_t d = 0; d < hd; ++d) {
    vf kv[C];
    for (int c = 0; c < C; ++c) kv[c] = load(kt + d * tkp + j0 + c * L);
    for (int r = 0; r < R; ++r) {
      const float qd = q[r][d];
      for (int c = 0; c < C; ++c) acc[r][c] += kv[c] * qd;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) store(s + r * tkp + j0 + c * L, acc[r][c] * scale);
}

template <int R, int C>
inline void pv_tile(const float* e, int64_t tkp, const float* vh, int64_t hdp, int64_t tk, int64_t c0, float* o) {
  vf acc[R][C] = {};
  for (int64_t j = 0; j < tk; ++j) {
    vf vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load(vh + j * hdp + c0 + c * L);
    for (int r = 0; r < R; ++r) {
      const float ej = e[r * tkp + j];
      for (int c = 0; c < C; ++c) acc[r][c] += vv[c] * ej;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) store(o + r * hdp + c0 + c * L, acc[r][c]);
}

// Runs TILE<R, c>(args) over vectors [0, nvec) kC at a time (the last step with fewer).
template <int R>
inline void scores_rows(const float* const* q, const float* kt, int64_t tkp, int64_t hd, float scale, float* s) {
  const int64_t nvec = tkp / L;
  int64_t v = 0;
  for (; v + kC <= nvec; v += kC) score_tile<R, kC>(q, kt, tkp, hd, v * L, scale, s);
  switch (nvec - v) {
    case 3: score_tile<R, 3>(q, kt, tkp, hd, v * L, scale, s); break;
    case 2: score_tile<R, 2>(q, kt, tkp, hd, v * L, scale, s); break;
    case 1: score_tile<R, 1>(q, kt, tkp, hd, v * L, scale, s); break;
    default: break;
  }
}

template <int R>
inline void pv_rows(const float* e, int64_t tkp, const float* vh, int64_t hdp, int64_t tk, float* o) {
  const int64_t nvec = hdp / L;
  int64_t v = 0;
  for (; v + kC <= nvec; v += kC) pv_tile<R, kC>(e, tkp, vh, hdp, tk, v * L, o);
  switch (nvec - v) {
    case 3: pv_tile<R, 3>(e, tkp, vh, hdp, tk, v * L, o); break;
    case 2: pv_tile<R, 2>(e, tkp, vh, hdp, tk, v * L, o); break;
    case 1: pv_tile<R, 1>(e, tkp, vh, hdp, tk, v * L, o); break;
    default: break;
  }
}

// Masks, then s <- e = exp(s - max) over keys [0, tk) (zero past tk); returns 1 / sum e.
inline float softmax_row(float* s, int64_t tk, int64_t tkp, const uint8_t* km, bool causal, int64_t pos) {
  const float lo = -FLT_MAX;
  if (km || causal)
    for (int64_t j = 0; j < tk; ++j)
      if ((km && !km[j]) || (causal && j > pos)) s[j] = lo;
  for (int64_t j = tk; j < tkp; ++j) s[j] = lo;
  vf mv = splat(lo);
  for (int64_t j = 0; j < tkp; j += L) {
    const vf x = load(s + j);
    mv = x > mv ? x : mv;
  }
  const float m = hmax(mv);
  for (int64_t j = 0; j < tkp; j += L) store(s + j, vexp(load(s + j) - m));
  for (int64_t j = tk; j < tkp; ++j) s[j] = 0.f;  // the clamped exp leaves 1e-38 in the padding
  vf sv = {};
  for (int64_t j = 0; j < tkp; j += L) sv += load(s + j);
  const float sum = hsum(sv);
  return 1.f / sum;
}

template <int R>
inline void attend_rows(const AttnEncodeArgs& a, int64_t bi, int64_t h, int64_t i0, const float* kt, const float* vh,
                        int64_t tkp, int64_t hdp, float* s, float* o) {
  const float* q[R];
  for (int r = 0; r < R; ++r) q[r] = a.q + (bi * a.tq + i0 + r) * a.ldq + h * a.hd;
  scores_rows<R>(q, kt, tkp, a.hd, a.scale, s);
  float inv[R];
  const uint8_t* km = a.key_mask ? a.key_mask + bi * a.tk : nullptr;
  for (int r = 0; r < R; ++r) {
    const int64_t i = i0 + r;
    const int64_t pos = a.q_pos ? a.q_pos[bi * a.tq + i] : a.tk - a.tq + i;
    inv[r] = softmax_row(s + r * tkp, a.tk, tkp, km, a.causal, pos);
  }
  pv_rows<R>(s, tkp, vh, hdp, a.tk, o);
  for (int r = 0; r < R; ++r) {
    float* dst = a.out + (bi * a.tq + i0 + r) * a.ldo + h * a.hd;
    for (int64_t c = 0; c < a.hd; ++c) dst[c] = o[r * hdp + c] * inv[r];
  }
}

inline void attend_encode(const AttnEncodeArgs& a, int threads) {
  const int64_t tkp = (a.tk + L - 1) / L * L, hdp = (a.hd + L - 1) / L * L;
  const int64_t tasks = a.b * a.heads;
  const int nt = (int)std::min<int64_t>(pick_threads(threads, a.tq * a.tk * a.hd * tasks), tasks);
  parallel_for(std::max(nt, 1), [&](int t) {
    std::vector<float> kt((size_t)(a.hd * tkp)), vh((size_t)(a.tk * hdp), 0.f), s((size_t)(kR * tkp)),
        o((size_t)(kR * hdp));
    for (int64_t task = t; task < tasks; task += std::max(nt, 1)) {
      const int64_t bi = task / a.heads, h = task % a.heads;
      std::fill(kt.begin(), kt.end(), 0.f);
      for (int64_t j = 0; j < a.tk; ++j) {
        const float* kr = a.k + (bi * a.tk + j) * a.ldk + h * a.hd;
        const float* vr = a.v + (bi * a.tk + j) * a.ldv + h * a.hd;
        for (int64_t d = 0; d < a.hd; ++d) kt[d * tkp + j] = kr[d];
        std::memcpy(vh.data() + j * hdp, vr, (size_t)a.hd * sizeof(float));
      }
      int64_t i0 = 0;
      for (; i0 + kR <= a.tq; i0 += kR) attend_rows<kR>(a, bi, h, i0, kt.data(), vh.data(), tkp, hdp, s.data(), o.data());
      for (; i0 < a.tq; ++i0) attend_rows<1>(a, bi, h, i0, kt.data(), vh.data(), tkp, hdp, s.data(), o.data());
    }
  });
}

}  // namespace EV_ENCODE_NS
}  // namespace ev
