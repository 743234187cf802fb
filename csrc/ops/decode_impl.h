// decode_impl.h — the bodies of decode_ops.h, compiled once per ISA: csrc/ops/decode_ops.cc
// (baseline target; SSE2 on x86-64, NEON on aarch64) and csrc/kernels/avx2/decode_avx2.cc
// (-mavx2 -mfma). Plain loops the compiler vectorises: without -ffast-math, eight partial sums
// instead of one running sum, and an exp with no libm call (std::exp / std::tanh are scalar
// calls, ~250k of them per token for the SwiGLU gates of a 2B model).
// Include after defining EV_DECODE_NS (the namespace the functions go in).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../threadpool.h"
#include "decode_ops.h"

namespace ev {
namespace EV_DECODE_NS {

inline float dot(const float* a, const float* b, int64_t n) {
  float p[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) p[j] += a[i + j] * b[i + j];
  float d = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; i < n; ++i) d += a[i] * b[i];
  return d;
}

// e^x for |x| < 2.9e6: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), e^r by its
// degree-6 Taylor polynomial (relative error <= r^7/7! < 1.3e-7), 2^n from the exponent bits.
// n is clamped as an integer to [-127, 128]: 2^-127 is built as +0 (e^x < 1.2e-38 flushes to
// 0, never a denormal) and 2^128 as +inf. Clamping x as a float instead makes GCC evaluate the
// clamped constant path in every lane and blend, and that path divides into denormals
// (microcode assists: 20x slower, measured).
inline float exp_approx(float x) {
  // round to nearest by the 1.5 * 2^23 trick (no branch, no SSE4.1 roundps; exact for |t| < 2^22)
  const float fn = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  int n = (int)fn;
  n = n < -127 ? -127 : n;
  n = n > 128 ? 128 : n;
  const float r = (x - fn * 0.693145751953125f) - fn * 1.42860682030941723212e-6f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (n + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof s);
  return p * s;
}

// 8 floats as one GCC/Clang vector (two SSE/NEON registers or one AVX register): explicit
// SIMD without intrinsics, so the same source serves every ISA build.
typedef float v8f __attribute__((vector_size(32)));
// Only inline helpers take or return v8f, so the baseline build's "AVX vector return without
// AVX changes the ABI" note does not apply (nothing crosses a translation unit).
#pragma GCC diagnostic ignored "-Wpsabi"
inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline float hsum8(v8f v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

inline void rms_norm_row(const float* x, const float* w, int64_t d, float eps, float* y) {
  double p[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= d; i += 4)
    for (int j = 0; j < 4; ++j) p[j] += (double)x[i + j] * (double)x[i + j];
  double ss = (p[0] + p[1]) + (p[2] + p[3]);
  for (; i < d; ++i) ss += (double)x[i] * (double)x[i];
  const float inv = 1.0f / std::sqrt((float)(ss / (double)d) + eps);
  if (w) {
    for (i = 0; i < d; ++i) y[i] = x[i] * inv * w[i];
  } else {
    for (i = 0; i < d; ++i) y[i] = x[i] * inv;
  }
}

// silu(g) u = g u / (1 + e^-g): no cancellation for g << 0 (e^-g -> inf, the quotient -> 0)
inline void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] * u[i] / (1.0f + exp_approx(-g[i]));
}

// x[hd] -> y[hd]: optional per-head RMSNorm, then rotate_half RoPE on the first rot dims.
inline void norm_rope(const float* x, const AttnDecodeArgs& a, const float* norm_w, float* y) {
  const int64_t hd = a.hd, half = a.rot / 2;
  if (norm_w) rms_norm_row(x, norm_w, hd, a.eps, y);
  else std::copy(x, x + hd, y);
  for (int64_t i = 0; i < half; ++i) {
    const float lo = y[i], hi = y[i + half];
    y[i] = lo * a.cos[i] - hi * a.sin[i];
    y[i + half] = hi * a.cos[i + half] + lo * a.sin[i + half];
  }
}

// Scores of NH query heads (q[h], hd floats each, sharing one KV head) against cache rows
// [0, n): s[h][j] = q[h] . k_j. Four rows at a time: each K vector loaded feeds NH FMAs, so
// with NH = 2 four rows cost (4 + 2) loads per 8 FMAs, one head alone 5 per 4.
template <int NH>
inline void qk_rows(const float* const* q, const float* k, int64_t hd, int64_t n, float* const* s) {
  int64_t j = 0;
  if (hd % 8 == 0)
    for (; j + 4 <= n; j += 4) {
      v8f acc[NH][4] = {};
      for (int64_t i = 0; i < hd; i += 8) {
        const v8f k0 = load8(k + j * hd + i), k1 = load8(k + (j + 1) * hd + i);
        const v8f k2 = load8(k + (j + 2) * hd + i), k3 = load8(k + (j + 3) * hd + i);
        for (int h = 0; h < NH; ++h) {
          const v8f qv = load8(q[h] + i);
          acc[h][0] += qv * k0;
          acc[h][1] += qv * k1;
          acc[h][2] += qv * k2;
          acc[h][3] += qv * k3;
        }
      }
      for (int h = 0; h < NH; ++h)
        for (int r = 0; r < 4; ++r) s[h][j + r] = hsum8(acc[h][r]);
    }
  for (; j < n; ++j)
    for (int h = 0; h < NH; ++h) s[h][j] = dot(q[h], k + j * hd, hd);
}

// o[h] = sum_j p[h][j] v_j for NH heads sharing the value rows v [n, hd]: 32 columns at a time
// in NH x 4 register accumulators, each V vector loaded once for all NH heads.
template <int NH>
inline void pv_rows(const float* const* p, const float* v, int64_t hd, int64_t n, float* const* o) {
  int64_t i0 = 0;
  for (; i0 + 32 <= hd; i0 += 32) {
    v8f c[NH][4] = {};
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = v + j * hd + i0;
      const v8f v0 = load8(vj), v1 = load8(vj + 8), v2 = load8(vj + 16), v3 = load8(vj + 24);
      for (int h = 0; h < NH; ++h) {
        const float pj = p[h][j];
        c[h][0] += pj * v0;
        c[h][1] += pj * v1;
        c[h][2] += pj * v2;
        c[h][3] += pj * v3;
      }
    }
    for (int h = 0; h < NH; ++h)
      for (int r = 0; r < 4; ++r) std::memcpy(o[h] + i0 + 8 * r, &c[h][r], sizeof(v8f));
  }
  if (i0 < hd)  // head dims that are not a multiple of 32
    for (int h = 0; h < NH; ++h) {
      for (int64_t i = i0; i < hd; ++i) o[h][i] = 0.f;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = i0; i < hd; ++i) o[h][i] += p[h][j] * v[j * hd + i];
    }
}

// s[0, n) <- softmax(s * scale), in place.
inline void softmax_scaled(float* s, int64_t n, float scale) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    s[j] *= scale;
    mx = std::max(mx, s[j]);
  }
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) s[j] = exp_approx(s[j] - mx);
  for (int64_t j = 0; j < n; ++j) sum += s[j];
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
}

// NH query heads h0 .. h0+NH-1 of KV group g: rotate, score, softmax, weighted sum of values.
template <int NH>
inline void attend_heads(const AttnDecodeArgs& a, int64_t g, int64_t h0, int64_t n, float* qbuf, float* sbuf) {
  const int64_t hd = a.hd;
  const float* q[NH];
  float* s[NH];
  float* o[NH];
  for (int h = 0; h < NH; ++h) {
    norm_rope(a.q + (h0 + h) * hd, a, a.qn, qbuf + h * hd);
    q[h] = qbuf + h * hd;
    s[h] = sbuf + h * n;
    o[h] = a.out + (h0 + h) * hd;
  }
  qk_rows<NH>(q, a.kc + g * a.ctx * hd, hd, n, s);
  for (int h = 0; h < NH; ++h) softmax_scaled(s[h], n, a.scale);
  pv_rows<NH>(s, a.vc + g * a.ctx * hd, hd, n, o);
}

inline void attend_decode(const AttnDecodeArgs& a, int threads) {
  const int64_t hd = a.hd, n = a.pos + 1, rep = a.hq / a.hkv;
  // The new token's K (normed, rotated) and V into cache slot pos, head by head.
  for (int64_t g = 0; g < a.hkv; ++g) {
    norm_rope(a.k + g * hd, a, a.kn, a.kc + (g * a.ctx + a.pos) * hd);
    std::copy(a.v + g * hd, a.v + (g + 1) * hd, a.vc + (g * a.ctx + a.pos) * hd);
  }
  // Work items: pairs of query heads of one KV group (K and V rows read once per pair; a
  // group of odd size ends with a single head). Threads split the items once the work pays
  // for waking them: 128K multiply-adds (~10 us on one core; a 2B model's 12 heads x 128 dims
  // past ~42 tokens), as a pool wake-up costs a few us (at 1M, the 2B model's attention ran
  // on one thread up to ~340 tokens: 2.5 ms of a 27 ms q2 decode step).
  const int64_t pairs = (rep + 1) / 2, items = a.hkv * pairs;
  const int64_t macs = 2 * a.hq * n * hd;
  const int nt = (int)std::min<int64_t>(std::max(threads, 1), macs >= (1 << 17) ? items : 1);
  const int64_t per = (items + nt - 1) / nt;
  parallel_for(nt, [&](int t) {
    std::vector<float> qbuf((size_t)(2 * hd)), sbuf((size_t)(2 * n));
    for (int64_t it = t * per; it < std::min(items, (t + 1) * per); ++it) {
      const int64_t g = it / pairs, h0 = g * rep + 2 * (it % pairs);
      if (h0 + 2 <= (g + 1) * rep) attend_heads<2>(a, g, h0, n, qbuf.data(), sbuf.data());
      else attend_heads<1>(a, g, h0, n, qbuf.data(), sbuf.data());
    }
  });
}

}  // namespace EV_DECODE_NS
}  // namespace ev
