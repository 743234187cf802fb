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

#include "../common.h"
#include "../threadpool.h"
#include "decode_ops.h"

#if defined(__F16C__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace ev {
namespace EV_DECODE_NS {

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

// KV cache element access: float32, or IEEE half bits (uint16_t) converted by F16C / NEON
// instructions where the build has them, else by common.h's portable (bit-exact) routines.
inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#elif defined(__aarch64__)
  __fp16 f;
  std::memcpy(&f, &h, sizeof f);
  return (float)f;
#else
  return fp16_to_fp32(h);
#endif
}
inline v8f load8(const uint16_t* p) {
  v8f v;
#if defined(__F16C__)
  const __m256 r = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &r, sizeof v);
#elif defined(__aarch64__)
  const float32x4_t lo = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
  const float32x4_t hi = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4)));
  std::memcpy(&v, &lo, 16);
  std::memcpy(reinterpret_cast<char*>(&v) + 16, &hi, 16);
#else
  for (int i = 0; i < 8; ++i) v[i] = fp16_to_fp32(p[i]);
#endif
  return v;
}
// dst[0, n) <- src rounded to nearest even (numpy's astype(float16)).
inline void store_row(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }
inline void store_row(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__aarch64__)
  for (; i + 4 <= n; i += 4) vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
#endif
  for (; i < n; ++i) dst[i] = fp32_to_fp16(src[i]);
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

// Most query heads one attention work item holds (a larger KV group is split into runs).
constexpr int64_t kMaxItemHeads = 8;

// Scores of NH query heads (q[h], hd floats each, sharing one KV head) against cache rows
// [0, n): s[h][j] = q[h] . k_j. Four rows at a time: each K vector loaded feeds NH FMAs, so
// with NH = 2 four rows cost (4 + 2) loads per 8 FMAs, one head alone 5 per 4.
template <int NH, class T>
inline void qk_rows(const float* const* q, const T* k, int64_t hd, int64_t n, float* const* s) {
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
  for (; j < n; ++j)  // row tails, and head dims that are not a multiple of 8
    for (int h = 0; h < NH; ++h) {
      float d = 0.f;
      for (int64_t i = 0; i < hd; ++i) d += q[h][i] * to_f32(k[j * hd + i]);
      s[h][j] = d;
    }
}

// o[h] += sum_j p[h][j] v_j for NH heads sharing the value rows v [n, hd]: 32 columns at a time
// in NH x 4 register accumulators (loaded from and stored back to o), each V vector loaded once
// for all NH heads. Accumulating lets the caller walk the rows in L1-sized blocks.
template <int NH, class T>
inline void pv_rows(const float* const* p, const T* v, int64_t hd, int64_t n, float* const* o) {
  int64_t i0 = 0;
  for (; i0 + 32 <= hd; i0 += 32) {
    v8f c[NH][4];
    for (int h = 0; h < NH; ++h)
      for (int r = 0; r < 4; ++r) c[h][r] = load8(o[h] + i0 + 8 * r);
    for (int64_t j = 0; j < n; ++j) {
      const T* vj = v + j * hd + i0;
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
    for (int h = 0; h < NH; ++h)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = i0; i < hd; ++i) o[h][i] += p[h][j] * to_f32(v[j * hd + i]);
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

// Cache rows per block: ~16 KB of K or V (a multiple of 4 rows, qk_rows' tile), so a block read
// for the first head pair is still in L1 for the others.
inline int64_t block_rows(int64_t hd) { return std::max<int64_t>(4, (16384 / (4 * hd)) / 4 * 4); }

// Query heads [h0, h1) of KV group g: rotate, score, softmax, weighted sum of values. The K and
// V rows are walked once, block by block, and every head pair of the range is applied to a block
// while it is in L1. Why: with one pass over the cache per head pair, a Qwen2-VL-2B group (6
// query heads) read its K/V three times, from L3/DRAM each time (L2 is too small for 28 layers'
// caches): 207 us per layer at 400 positions on one core, vs 14 us of in-cache arithmetic per
// pair. Each head's arithmetic (and so its result) does not depend on [h0, h1), hence not on
// the thread count.
template <class T>
inline void attend_heads(const AttnDecodeArgs& a, int64_t g, int64_t h0, int64_t h1, int64_t n, float* qbuf,
                         float* sbuf) {
  const int64_t hd = a.hd, nh = h1 - h0, B = block_rows(hd);
  const float* q[kMaxItemHeads];
  float* s[kMaxItemHeads];
  float* o[kMaxItemHeads];
  for (int64_t h = 0; h < nh; ++h) {
    norm_rope(a.q + (h0 + h) * hd, a, a.qn, qbuf + h * hd);
    q[h] = qbuf + h * hd;
    s[h] = sbuf + h * n;
    o[h] = a.out + (h0 + h) * hd;
    std::fill(o[h], o[h] + hd, 0.f);
  }
  const T* kc = static_cast<const T*>(a.kc) + g * a.ctx * hd;
  const T* vc = static_cast<const T*>(a.vc) + g * a.ctx * hd;
  for (int64_t j0 = 0; j0 < n; j0 += B) {
    const int64_t nb = std::min(B, n - j0);
    for (int64_t h = 0; h < nh; h += 2) {
      float* sj[2] = {s[h] + j0, h + 1 < nh ? s[h + 1] + j0 : nullptr};
      if (h + 1 < nh) qk_rows<2>(q + h, kc + j0 * hd, hd, nb, sj);
      else qk_rows<1>(q + h, kc + j0 * hd, hd, nb, sj);
    }
  }
  for (int64_t h = 0; h < nh; ++h) softmax_scaled(s[h], n, a.scale);
  for (int64_t j0 = 0; j0 < n; j0 += B) {
    const int64_t nb = std::min(B, n - j0);
    for (int64_t h = 0; h < nh; h += 2) {
      const float* pj[2] = {s[h] + j0, h + 1 < nh ? s[h + 1] + j0 : nullptr};
      if (h + 1 < nh) pv_rows<2>(pj, vc + j0 * hd, hd, nb, o + h);
      else pv_rows<1>(pj, vc + j0 * hd, hd, nb, o + h);
    }
  }
}

template <class T>
inline void attend_decode_t(const AttnDecodeArgs& a, int threads) {
  const int64_t hd = a.hd, n = a.pos + 1, rep = a.hq / a.hkv;
  // The new token's K (normed, rotated) and V into cache slot pos, head by head.
  std::vector<float> krow((size_t)hd);
  for (int64_t g = 0; g < a.hkv; ++g) {
    norm_rope(a.k + g * hd, a, a.kn, krow.data());
    store_row(krow.data(), hd, static_cast<T*>(a.kc) + (g * a.ctx + a.pos) * hd);
    store_row(a.v + g * hd, hd, static_cast<T*>(a.vc) + (g * a.ctx + a.pos) * hd);
  }
  // Work items: runs of up to kMaxItemHeads query heads of one KV group, each reading its
  // group's K/V rows once. A group is split into as many runs (whole pairs) as it takes to
  // give every thread an item (Qwen2-VL-2B: 2 groups of 6 heads, 2 threads: one run each).
  // Threads split the items once the work pays for waking them: 128K multiply-adds (~10 us on
  // one core; a 2B model's 12 heads x 128 dims past ~42 tokens), as a pool wake-up costs a
  // few us.
  const int64_t pairs = (rep + 1) / 2, max_pairs = kMaxItemHeads / 2;
  const int64_t macs = 2 * a.hq * n * hd;
  const int nt0 = std::max(threads, 1);
  const int64_t want = macs >= (1 << 17) ? (nt0 + a.hkv - 1) / a.hkv : 1;  // runs per group
  const int64_t runs = std::min(pairs, std::max(want, (pairs + max_pairs - 1) / max_pairs));
  const int64_t run_pairs = (pairs + runs - 1) / runs, items = a.hkv * runs;
  const int nt = (int)std::min<int64_t>(nt0, macs >= (1 << 17) ? items : 1);
  const int64_t per = (items + nt - 1) / nt;
  parallel_for(nt, [&](int t) {
    std::vector<float> qbuf((size_t)(kMaxItemHeads * hd)), sbuf((size_t)(kMaxItemHeads * n));
    for (int64_t it = t * per; it < std::min(items, (t + 1) * per); ++it) {
      const int64_t g = it / runs, r = it % runs;
      const int64_t h0 = g * rep + std::min(rep, 2 * r * run_pairs);
      const int64_t h1 = g * rep + std::min(rep, 2 * (r + 1) * run_pairs);
      if (h0 < h1) attend_heads<T>(a, g, h0, h1, n, qbuf.data(), sbuf.data());
    }
  });
}

inline void attend_decode(const AttnDecodeArgs& a, int threads) {
  if (a.kv_f16) attend_decode_t<uint16_t>(a, threads);
  else attend_decode_t<float>(a, threads);
}

}  // namespace EV_DECODE_NS
}  // namespace ev
