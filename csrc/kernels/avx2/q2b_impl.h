// q2b_impl.h — 2-bit codes with bilevel scales (layout and spec: qtypes/q2b.h). The code
// stream is q2's: one 32-byte load + shifts/ands per 128 codes.
//
// Math, for row n, activation row m, weight group j (16 codes; activations are int8 per
// group of 16 too: QActs group 16, d[m,j], s[m,j] = d[m,j] * sum q_x over j):
//   y[m,n] = sum_j S[n,j] d[m,j] idot(q_w, q_x over j)  -  sum_j S[n,j] z[n,j] s[m,j]
// with S[n,j] = d2[n/16,j] * (c[n,j] - m2[n/16,j]) computed per 128-code unit (8 groups)
// in one 8-lane vector from the unit's 32-bit word of scale codes, its 16-bit word of
// zeros and 8 consecutive level-2 floats. An int8 dot of 32 codes (udot4: maddubs + madd,
// or one vpdpbusd in the VNNI build) leaves int32 lanes 0-3 = group 2c, 4-7 = group 2c+1,
// so the per-group factor S*d enters as one vpermps of the unit's 8-lane S*d vector
// (port 5, off the maddubs/fma ports) and one fma:
// no horizontal sums inside the loop. The zero term is one fma per unit. Shared by the
// avx2 and avxvnni builds (namespace EV_X86_NS; see common_avx2.h).
#pragma once

#include "../../qtypes/q2b.h"

#include "common_avx2.h"

namespace ev {
namespace EV_X86_NS {
namespace q2bk {  // own constants (kKc, kMr) next to common_avx2.h's

struct Q2BRow {
  const uint8_t* qs;
  const uint8_t* sc;  // the row's 4-bit scale codes
  const uint8_t* zp;  // the row's 2-bit zeros
  const float* d2;    // level-2 scale of the row's block, [G]
  const float* m2;    // level-2 zero, [G]
};

EV_INLINE Q2BRow q2b_row(const QMatrix& w, int64_t r) {
  const int64_t G = w.k / kQ2BGroup, blk = (r / kQ2BRowBlock) * G;
  return {w.row_qs(r), w.sc4 + r * q2b_sc_row_bytes(w.k), w.zp2 + r * q2b_zp_row_bytes(w.k), w.l2d + blk, w.l2m + blk};
}

// S and S*z of the groups [g0, g0 + ng) (ng <= 8, g0 % 8 == 0) as 8 lanes, zero past ng.
EV_INLINE void unit_params(const Q2BRow& R, int64_t g0, int ng, __m256& S, __m256& Sz) {
  if (ng == 8) {
    uint32_t c4;
    uint16_t z2;
    std::memcpy(&c4, R.sc + g0 / 2, 4);
    std::memcpy(&z2, R.zp + g0 / 4, 2);
    const __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)c4), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                       _mm256_set1_epi32(15));
    const __m256i z = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(z2), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                       _mm256_set1_epi32(3));
    S = _mm256_mul_ps(_mm256_loadu_ps(R.d2 + g0), _mm256_sub_ps(_mm256_cvtepi32_ps(c), _mm256_loadu_ps(R.m2 + g0)));
    Sz = _mm256_mul_ps(S, _mm256_cvtepi32_ps(z));
    return;
  }
  alignas(32) float s[8] = {0}, sz[8] = {0};  // the row's partial last unit (2/4/6 groups)
  for (int i = 0; i < ng; ++i) {
    const int64_t g = g0 + i;
    const int c = (R.sc[g / 2] >> (4 * (g & 1))) & 15, z = (R.zp[g / 4] >> (2 * (g & 3))) & 3;
    s[i] = R.d2[g] * ((float)c - R.m2[g]);
    sz[i] = s[i] * (float)z;
  }
  S = _mm256_load_ps(s);
  Sz = _mm256_load_ps(sz);
}

// Lane pattern of 32-code chunk j of a unit: groups 2j (lanes 0-3) and 2j+1 (lanes 4-7).
EV_INLINE __m256i chunk_idx(int j) {
  return _mm256_setr_epi32(2 * j, 2 * j, 2 * j, 2 * j, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1);
}

// Codes [k0, k0 + 32*nc) of a row (k0 % 128 == 0, nc <= 4) as nc 32-code vectors.
EV_INLINE void load_unit(const uint8_t* qs, int64_t k0, int64_t K, __m256i c[4], uint8_t* tail) {
  if (k0 + 128 <= K) {
    const __m256i m2 = _mm256_set1_epi8(0x03);
    const __m256i v = ld(qs + k0 / 4);
    c[0] = _mm256_and_si256(v, m2);
    c[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m2);
    c[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m2);
    c[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), m2);
    return;
  }
  unpack_codes_q2(qs + k0 / 4, K - k0, tail);  // 32/64/96-code tail unit
  for (int j = 0; j < (int)((K - k0) / 32); ++j) c[j] = ld(tail + 32 * j);
}

// GEMV, one row at a time: per unit one code load, S/Sz from the row's parameter words,
// four maddubs/madd/cvt/vpermps/fma steps. x (K int8) and d/s (G floats) stay in L1.
inline void gemv(const LinearArgs& a, int64_t n0, int64_t n1) {
  const QMatrix& w = a.w;
  const int64_t K = w.k, G = K / kQ2BGroup;
  const int8_t* xq = a.xq->q;
  const float* xd = a.xq->d;
  const float* xs = a.xq->s;
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) uint8_t tail[128];
  for (int64_t n = n0; n < n1; ++n) {
    const Q2BRow R = q2b_row(w, n);
    __m256 acc = _mm256_setzero_ps(), accz = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 128) {
      const int64_t g0 = k0 / kQ2BGroup;
      const int ng = (int)std::min<int64_t>(8, G - g0);
      if (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(R.qs + k0 / 4) + kPrefetch, _MM_HINT_T0);
      __m256 S, Sz;
      unit_params(R, g0, ng, S, Sz);
      accz = _mm256_fmadd_ps(Sz, load_f32x8(xs + g0, ng), accz);
      const __m256 sd = _mm256_mul_ps(S, load_f32x8(xd + g0, ng));
      __m256i c[4];
      load_unit(R.qs, k0, K, c, tail);
      for (int j = 0; j < ng / 2; ++j) {
        const __m256i p = udot4(c[j], ld(xq + k0 + 32 * j), ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(sd, chunk_idx(j)), acc);
      }
    }
    a.y[n] = (a.bias ? a.bias[n] : 0.f) + hsum(_mm256_sub_ps(acc, accz));
  }
}

// GEMM (M >= 2): per K chunk of <= 2048 codes and X block of <= 64 rows, each W row is
// prepared once (codes unpacked to u8, the chunk's S as per-32-code lane patterns, S*z per
// unit) and then swept over the X block 4 rows at a time: each W vector and S pattern feeds
// 4 dots. A ragged last X tile repeats its last row and drops those results.
constexpr int64_t kKc = 2048;
constexpr int64_t kMb = 64;
constexpr int kMr = 4;

inline void gemm(const LinearArgs& a, int64_t n0, int64_t n1) {
  const QMatrix& w = a.w;
  const int64_t K = w.k, N = w.n, M = a.m, G = K / kQ2BGroup;
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) uint8_t wb[kKc];
  alignas(32) float sx[kKc / 4];        // [chunk][8]: S of the chunk's two groups, 4 lanes each
  alignas(32) float szu[kKc / 128 * 8]; // [unit][8]: S*z per group
  alignas(32) uint8_t tail[128];
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t k1 = std::min(K, k0 + kKc), nchunk = (k1 - k0) / 32, nunit = (k1 - k0 + 127) / 128;
    for (int64_t mb0 = 0; mb0 < M; mb0 += kMb) {
      const int64_t mb1 = std::min(M, mb0 + kMb);
      for (int64_t n = n0; n < n1; ++n) {
        const Q2BRow R = q2b_row(w, n);
        for (int64_t u = 0; u < nunit; ++u) {
          const int64_t ku = k0 + 128 * u, g0 = ku / kQ2BGroup;
          const int ng = (int)std::min<int64_t>(8, G - g0);
          __m256 S, Sz;
          unit_params(R, g0, ng, S, Sz);
          _mm256_store_ps(szu + 8 * u, Sz);
          __m256i c[4];
          load_unit(R.qs, ku, K, c, tail);
          for (int j = 0; j < ng / 2; ++j) {
            _mm256_store_si256(reinterpret_cast<__m256i*>(wb + 128 * u + 32 * j), c[j]);
            _mm256_store_ps(sx + 8 * (4 * u + j), _mm256_permutevar8x32_ps(S, chunk_idx(j)));
          }
        }
        for (int64_t m = mb0; m < mb1; m += kMr) {
          const int8_t* xr[kMr];
          const float* dr[kMr];
          const float* sr[kMr];
          for (int i = 0; i < kMr; ++i) {
            const int64_t row = std::min(m + i, mb1 - 1);
            xr[i] = a.xq->q + row * K + k0;
            dr[i] = a.xq->d + row * G + k0 / kQ2BGroup;
            sr[i] = a.xq->s + row * G + k0 / kQ2BGroup;
          }
          __m256 acc[kMr];
          for (int i = 0; i < kMr; ++i) acc[i] = _mm256_setzero_ps();
          for (int64_t u = 0; u < nunit; ++u) {
            const int ng = (int)std::min<int64_t>(8, G - (k0 + 128 * u) / kQ2BGroup);
            const __m256 sz = _mm256_load_ps(szu + 8 * u);
            __m256 d8[kMr];
            for (int i = 0; i < kMr; ++i) {
              d8[i] = load_f32x8(dr[i] + 8 * u, ng);
              acc[i] = _mm256_fnmadd_ps(sz, load_f32x8(sr[i] + 8 * u, ng), acc[i]);
            }
            for (int j = 0; j < ng / 2; ++j) {
              const int64_t ch = 4 * u + j;
              const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + 32 * ch));
              const __m256 sv = _mm256_load_ps(sx + 8 * ch);
              const __m256i idx = chunk_idx(j);
              for (int i = 0; i < kMr; ++i) {
                const __m256i p = udot4(wv, ld(xr[i] + 32 * ch), ones);
                const __m256 f = _mm256_mul_ps(sv, _mm256_permutevar8x32_ps(d8[i], idx));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), f, acc[i]);
              }
            }
          }
          (void)nchunk;
          const __m128 v = hsum4(acc[0], acc[1], acc[2], acc[3]);
          alignas(16) float out[4];
          _mm_store_ps(out, v);
          for (int i = 0; i < kMr && m + i < mb1; ++i) {
            float& y = a.y[(m + i) * N + n];
            y = (k0 == 0 ? (a.bias ? a.bias[n] : 0.f) : y) + out[i];
          }
        }
      }
    }
  }
}

}  // namespace q2bk
}  // namespace EV_X86_NS
}  // namespace ev
