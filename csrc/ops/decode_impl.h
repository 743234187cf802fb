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

// Four dot products q . k_r (k_r = k + r * stride, r < 4) at once: four independent
// accumulator chains hide the FMA latency that a single 128-long dot would wait on. n % 8 == 0.
inline void dot4(const float* q, const float* k, int64_t stride, int64_t n, float* out) {
  v8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
  for (int64_t i = 0; i < n; i += 8) {
    const v8f qv = load8(q + i);
    a0 += qv * load8(k + i);
    a1 += qv * load8(k + stride + i);
    a2 += qv * load8(k + 2 * stride + i);
    a3 += qv * load8(k + 3 * stride + i);
  }
  out[0] = hsum8(a0);
  out[1] = hsum8(a1);
  out[2] = hsum8(a2);
  out[3] = hsum8(a3);
}

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

inline void attend_decode(const AttnDecodeArgs& a, int threads) {
  const int64_t hd = a.hd, n = a.pos + 1, rep = a.hq / a.hkv;
  // The new token's K (normed, rotated) and V into cache slot pos, head by head.
  for (int64_t g = 0; g < a.hkv; ++g) {
    norm_rope(a.k + g * hd, a, a.kn, a.kc + (g * a.ctx + a.pos) * hd);
    std::copy(a.v + g * hd, a.v + (g + 1) * hd, a.vc + (g * a.ctx + a.pos) * hd);
  }
  // Threads split the query heads once the work pays for waking them (~1M multiply-adds:
  // a 2B model's 12 heads x 128 dims past ~340 cached tokens).
  const int64_t macs = 2 * a.hq * n * hd;
  const int nt = (int)std::min<int64_t>(std::max(threads, 1), macs >= (1 << 20) ? a.hq : 1);
  const int64_t per = (a.hq + nt - 1) / nt;
  parallel_for(nt, [&](int t) {
    std::vector<float> qh((size_t)hd), s((size_t)n), acc((size_t)hd);
    for (int64_t h = t * per; h < std::min(a.hq, (t + 1) * per); ++h) {
      const int64_t g = h / rep;
      const float* kg = a.kc + g * a.ctx * hd;
      const float* vg = a.vc + g * a.ctx * hd;
      norm_rope(a.q + h * hd, a, a.qn, qh.data());
      int64_t j = 0;
      if (hd % 8 == 0)
        for (; j + 4 <= n; j += 4) dot4(qh.data(), kg + j * hd, hd, hd, s.data() + j);
      for (; j < n; ++j) s[j] = dot(qh.data(), kg + j * hd, hd);
      float mx = -INFINITY;
      for (j = 0; j < n; ++j) {
        s[j] *= a.scale;
        mx = std::max(mx, s[j]);
      }
      float sum = 0.f;
      for (j = 0; j < n; ++j) s[j] = exp_approx(s[j] - mx);
      for (j = 0; j < n; ++j) sum += s[j];
      const float inv = 1.0f / sum;
      for (j = 0; j < n; ++j) s[j] *= inv;
      // out = sum_j p_j v_j, 32 columns at a time: four 8-wide register accumulators (four
      // independent FMA chains) instead of a memory accumulator re-read for every j.
      float* o = a.out + h * hd;
      int64_t i0 = 0;
      for (; i0 + 32 <= hd; i0 += 32) {
        v8f c0 = {}, c1 = {}, c2 = {}, c3 = {};
        for (j = 0; j < n; ++j) {
          const float* vj = vg + j * hd + i0;
          const float p = s[j];
          c0 += p * load8(vj);
          c1 += p * load8(vj + 8);
          c2 += p * load8(vj + 16);
          c3 += p * load8(vj + 24);
        }
        std::memcpy(o + i0, &c0, sizeof c0);
        std::memcpy(o + i0 + 8, &c1, sizeof c1);
        std::memcpy(o + i0 + 16, &c2, sizeof c2);
        std::memcpy(o + i0 + 24, &c3, sizeof c3);
      }
      if (i0 < hd) {  // head dims that are not a multiple of 32
        std::fill(acc.begin(), acc.end(), 0.f);
        for (j = 0; j < n; ++j)
          for (int64_t i = i0; i < hd; ++i) acc[i] += s[j] * vg[j * hd + i];
        std::copy(acc.begin() + i0, acc.end(), o + i0);
      }
    }
  });
}

}  // namespace EV_DECODE_NS
}  // namespace ev
