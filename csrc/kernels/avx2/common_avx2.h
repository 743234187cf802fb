// common_avx2.h — private to csrc/kernels/avx2: shared helpers and the two loop drivers
// (GEMV, GEMM) that every quant type instantiates with its own code policy.
//
// Math (kernels.h, QActs): for weight group g of row n and activation row m,
//   y[m,n] = sum_g scale[n,g] * d[m,g] * idot(qw, qx over g)  +  sum_g min[n,g] * s[m,g]
// (q8: no min term). idot is exact in integers: _mm256_maddubs_epi16(w_u8, x_i8) gives
// int16 pair sums, several are summed in int16 inside a group (bounds below), one
// _mm256_madd_epi16(.., 1) widens to int32, one cvt + fmadd applies scale*d per group.
//
// A code policy P (q2.cc, q3.cc, q4.cc, q8.cc) provides:
//   kSigned                      false: codes are u8 0..2^b-1 (asymmetric, with mins);
//                                true:  codes are int8 -127..127 (q8, sign trick, no mins)
//   load128(row, k0, w[4])       the 128 codes [k0, k0+128) of a row (k0 % 128 == 0) as
//                                four 32-code vectors in natural order
//   unpack_tail(row, k0, n, buf) codes [k0, k0+n) (n = 32/64/96, k0 % 128 == 0) -> buf
// int16 headroom per group (pair sums <= 2*qmax*127): q2 762*4, q3 1778*4, q4 3810*4
// are < 32767 for 4 maddubs (group 128); q8 pairs reach 32258, so widen after each.
// Only AVX2/FMA/F16C instructions: target hosts have no AVX-512/VNNI.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "avx2.h"

namespace ev {
namespace avx2 {

// ---- small helpers ----

EV_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane sums of four vectors: {sum a, sum b, sum c, sum d}.
EV_INLINE __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// n (>= 1) fp16 values -> 8 floats, zero past n. Tails copy to the stack: never read past p[n).
EV_INLINE __m256 load_f16x8(const uint16_t* p, int64_t n) {
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

// n (>= 1) floats -> 8 lanes, zero past n (masked load: never touches p[n..8)).
EV_INLINE __m256 load_f32x8(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), idx);
  return _mm256_maskload_ps(p, mask);
}

EV_INLINE __m256i ld(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// One 32-code step of a group's integer dot. Asymmetric: int16 pair sums, accumulated in
// int16 (headroom above). Signed (q8): |w| x sign(x, w) = w*x, widened to int32 at once.
template <bool kSigned>
EV_INLINE __m256i dot32(__m256i w, __m256i x, __m256i acc, bool first, __m256i ones) {
  if constexpr (kSigned) {
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), ones);
    return first ? p : _mm256_add_epi32(acc, p);
  } else {
    const __m256i p = _mm256_maddubs_epi16(w, x);
    return first ? p : _mm256_add_epi16(acc, p);
  }
}
// The group's int32 lanes (asymmetric: widen the int16 sums once per group).
template <bool kSigned>
EV_INLINE __m256i widen(__m256i acc, __m256i ones) {
  if constexpr (kSigned) return acc;
  else return _mm256_madd_epi16(acc, ones);
}

// Groups per stack chunk of the per-row factor buffers (sd = scale*d): K is walked in
// chunks of at most kGChunk groups so buffers stay fixed-size for any K.
constexpr int64_t kGChunk = 256;

// ---- GEMV: M == 1, one W row at a time, x (K int8) stays in L1 ----
// Per row and K chunk: sd[g] = scale[n,g]*d[g] into a stack buffer (8 at a time, F16C),
// the min term min.s as 8-lane partial products into the accumulator, then one pass over
// the codes: 128 codes (one superblock) per step, a group flushed every CPG 32-code steps.
// Bandwidth: the qs / scales / mins planes are three sequential streams; a software
// prefetch kPrefetch bytes ahead on qs keeps enough misses in flight.
constexpr int kPrefetch = 1024;

template <class P, int CPG>
void gemv_impl(const LinearArgs& a, int64_t n0, int64_t n1) {
  constexpr int kGroup = CPG * 32;
  const QMatrix& w = a.w;
  const int64_t K = w.k, G = K / kGroup;
  const int64_t rb = row_bytes(w.type, K);
  const int8_t* x = a.xq->q;
  const float* xd = a.xq->d;
  const float* xs = a.xq->s;
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) float sd[kGChunk];
  alignas(32) uint8_t tail[128];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.row_qs(n);
    const uint16_t* sc = w.row_scales(n);
    const uint16_t* mn = w.row_mins(n);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < G; g0 += kGChunk) {
      const int64_t gn = std::min(kGChunk, G - g0);
      for (int64_t i = 0; i < gn; i += 8) {
        const __m256 dd = load_f32x8(xd + g0 + i, gn - i);
        _mm256_store_ps(sd + i, _mm256_mul_ps(load_f16x8(sc + g0 + i, gn - i), dd));
        if constexpr (!P::kSigned)
          acc1 = _mm256_fmadd_ps(load_f16x8(mn + g0 + i, gn - i), load_f32x8(xs + g0 + i, gn - i), acc1);
      }
      const int64_t k0 = g0 * kGroup, k1 = (g0 + gn) * kGroup;
      int64_t k = k0;
      for (; k + 128 <= k1; k += 128) {
        if (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(row + (k * rb / K)) + kPrefetch, _MM_HINT_T0);
        __m256i c[4];
        P::load128(row, k, c);
        __m256i acc = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
          acc = dot32<P::kSigned>(c[j], ld(x + k + 32 * j), acc, j % CPG == 0, ones);
          if (j % CPG == CPG - 1) {
            const __m256 f = _mm256_cvtepi32_ps(widen<P::kSigned>(acc, ones));
            const __m256 s = _mm256_broadcast_ss(sd + (k + 32 * j) / kGroup - g0);
            if ((j / CPG) % 2 == 0) acc0 = _mm256_fmadd_ps(f, s, acc0);
            else acc1 = _mm256_fmadd_ps(f, s, acc1);
          }
        }
      }
      if (k < k1) {  // tail: 32/64/96 codes (a group divides it), unpacked on the stack
        const int nc = (int)((k1 - k) / 32);
        P::unpack_tail(row, k, k1 - k, tail);
        __m256i acc = _mm256_setzero_si256();
        for (int j = 0; j < nc; ++j) {
          acc = dot32<P::kSigned>(ld(tail + 32 * j), ld(x + k + 32 * j), acc, j % CPG == 0, ones);
          if (j % CPG == CPG - 1) {
            const __m256 f = _mm256_cvtepi32_ps(widen<P::kSigned>(acc, ones));
            acc0 = _mm256_fmadd_ps(f, _mm256_broadcast_ss(sd + (k + 32 * j) / kGroup - g0), acc0);
          }
        }
      }
    }
    a.y[n] = hsum(_mm256_add_ps(acc0, acc1)) + (a.bias ? a.bias[n] : 0.f);
  }
}

template <class P>
void gemv(const LinearArgs& a, int64_t n0, int64_t n1) {
  switch (a.w.group) {
    case 32: gemv_impl<P, 1>(a, n0, n1); break;
    case 64: gemv_impl<P, 2>(a, n0, n1); break;
    case 128: gemv_impl<P, 4>(a, n0, n1); break;
    default: break;  // valid_group() was checked by the caller
  }
}

// ---- GEMM: M >= 2 ----
// Blocking (per thread, over its [n0, n1) slice):
//   for K chunk of kKc codes            (all block buffers fixed-size on the stack)
//     for M block of mb rows            (mb x kKc int8 activations ~ 32 KiB: L1-resident)
//       for W row n                     (its chunk unpacked once to u8 in wbuf, L1)
//         for 4-row tile of the block   micro-kernel: 1 W row x 4 X rows
// The micro-kernel keeps 4 int16 + 4 fp32 accumulators and the current W vector in
// registers (~11 of 16 ymm); X vectors are maddubs memory operands. Unpacking W once per
// block amortises it over mb X rows; sd[m][g] = scale*d is precomputed per (n, block) so
// each group costs one broadcast load + cvt + fmadd per X row. Partial sums of K chunks
// accumulate in y (first chunk writes bias + sum).
constexpr int64_t kKc = 2048;      // codes per K chunk (multiple of 128)
constexpr int64_t kGcMax = kKc / 32;  // groups per K chunk at most (64)
constexpr int64_t kMbMax = 64;
constexpr int kMr = 4;

template <bool kSigned, int MR, int CPG>
EV_INLINE void micro(const uint8_t* wb, const int8_t* x, int64_t ldx, int64_t gn, const float* sd,
                     const float* mf, const float* sb, int64_t gpad, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
  if constexpr (!kSigned) {  // min term as 8-lane partial products (buffers zero-padded)
    for (int64_t i = 0; i < gpad; i += 8) {
      const __m256 mv = _mm256_load_ps(mf + i);
      for (int m = 0; m < MR; ++m) acc[m] = _mm256_fmadd_ps(mv, _mm256_load_ps(sb + m * gpad + i), acc[m]);
    }
  }
  for (int64_t g = 0; g < gn; ++g) {
    __m256i ia[MR];
    for (int m = 0; m < MR; ++m) ia[m] = _mm256_setzero_si256();
    for (int c = 0; c < CPG; ++c) {
      const int64_t off = (g * CPG + c) * 32;
      const __m256i wv = ld(wb + off);  // q8: straight from the qs row (unaligned)
      for (int m = 0; m < MR; ++m) ia[m] = dot32<kSigned>(wv, ld(x + m * ldx + off), ia[m], c == 0, ones);
    }
    for (int m = 0; m < MR; ++m)
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(widen<kSigned>(ia[m], ones)),
                               _mm256_broadcast_ss(sd + m * gpad + g), acc[m]);
  }
  const __m256 z = _mm256_setzero_ps();
  _mm_storeu_ps(out, hsum4(acc[0], MR > 1 ? acc[1 % MR] : z, MR > 2 ? acc[2 % MR] : z, MR > 3 ? acc[3 % MR] : z));
}

template <class P, int CPG>
void gemm_impl(const LinearArgs& a, int64_t n0, int64_t n1) {
  constexpr int kGroup = CPG * 32;
  const QMatrix& w = a.w;
  const int64_t K = w.k, N = w.n, M = a.m, G = K / kGroup;
  const int8_t* xq = a.xq->q;
  const float* xd = a.xq->d;
  const float* xs = a.xq->s;
  const int64_t kc = std::min(K, kKc);
  const int64_t mbs = std::max<int64_t>(kMr, std::min<int64_t>(kMbMax, (32768 / kc) / kMr * kMr));
  alignas(32) uint8_t wbuf[kKc];
  alignas(32) float sf[kGcMax], mf[kGcMax];
  alignas(32) float db[kMbMax * kGcMax], sb[kMbMax * kGcMax], sd[kMbMax * kGcMax];
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t k1 = std::min(K, k0 + kc), g0 = k0 / kGroup, gn = (k1 - k0) / kGroup;
    const int64_t gpad = (gn + 7) / 8 * 8;
    for (int64_t m0 = 0; m0 < M; m0 += mbs) {
      const int64_t mb = std::min(mbs, M - m0);
      for (int64_t m = 0; m < mb; ++m)  // block's d and s, zero-padded to gpad
        for (int64_t i = 0; i < gpad; i += 8) {
          const int64_t r = (m0 + m) * G + g0 + i, left = gn - i;
          _mm256_store_ps(db + m * gpad + i, load_f32x8(xd + r, left));
          _mm256_store_ps(sb + m * gpad + i, load_f32x8(xs + r, left));
        }
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = w.row_qs(n);
        const uint8_t* wb = P::prepare(row, k0, k1, wbuf);
        const uint16_t* sc = w.row_scales(n) + g0;
        for (int64_t i = 0; i < gpad; i += 8) {
          _mm256_store_ps(sf + i, load_f16x8(sc + i, gn - i));
          if constexpr (!P::kSigned) _mm256_store_ps(mf + i, load_f16x8(w.row_mins(n) + g0 + i, gn - i));
        }
        for (int64_t m = 0; m < mb; ++m)
          for (int64_t i = 0; i < gpad; i += 8)
            _mm256_store_ps(sd + m * gpad + i, _mm256_mul_ps(_mm256_load_ps(sf + i), _mm256_load_ps(db + m * gpad + i)));
        const float add = k0 == 0 ? (a.bias ? a.bias[n] : 0.f) : 0.f;
        for (int64_t mt = 0; mt < mb; mt += kMr) {
          const int64_t mr = std::min<int64_t>(kMr, mb - mt);
          const int8_t* xt = xq + (m0 + mt) * K + k0;
          const float* sdt = sd + mt * gpad;
          const float* sbt = sb + mt * gpad;
          float out[4];
          switch (mr) {
            case 4: micro<P::kSigned, 4, CPG>(wb, xt, K, gn, sdt, mf, sbt, gpad, out); break;
            case 3: micro<P::kSigned, 3, CPG>(wb, xt, K, gn, sdt, mf, sbt, gpad, out); break;
            case 2: micro<P::kSigned, 2, CPG>(wb, xt, K, gn, sdt, mf, sbt, gpad, out); break;
            default: micro<P::kSigned, 1, CPG>(wb, xt, K, gn, sdt, mf, sbt, gpad, out); break;
          }
          float* yc = a.y + (m0 + mt) * N + n;
          for (int64_t i = 0; i < mr; ++i) yc[i * N] = (k0 == 0 ? add : yc[i * N]) + out[i];
        }
      }
    }
  }
}

template <class P>
void gemm(const LinearArgs& a, int64_t n0, int64_t n1) {
  switch (a.w.group) {
    case 32: gemm_impl<P, 1>(a, n0, n1); break;
    case 64: gemm_impl<P, 2>(a, n0, n1); break;
    case 128: gemm_impl<P, 4>(a, n0, n1); break;
    default: break;
  }
}

// Unpacks codes [k0, k1) of a row into wb (u8, natural order) with the policy's SIMD
// superblock unpack; a 32/64/96-code tail goes through unpack_tail. Returns wb.
template <class P>
EV_INLINE const uint8_t* unpack_range(const uint8_t* row, int64_t k0, int64_t k1, uint8_t* wb) {
  int64_t k = k0;
  for (; k + 128 <= k1; k += 128) {
    __m256i c[4];
    P::load128(row, k, c);
    for (int j = 0; j < 4; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(wb + (k - k0) + 32 * j), c[j]);
  }
  if (k < k1) P::unpack_tail(row, k, k1 - k, wb + (k - k0));
  return wb;
}

}  // namespace avx2
}  // namespace ev
