// gemm.cc — q2/q3/q4/q8 GEMM (M >= 2) on zmm vpdpbusd (avx512vnni.h).
//
// Why a different loop from common_avx2.h: there, a vector holds 32 codes of ONE weight row
// along K, so every group ends in a cvt + fma per X row for only CPG dot instructions (4 at
// group 128 on ymm, and 2 on zmm: the float work would equal the integer work). Here a vector
// holds 16 weight ROWS (N) x 4 codes (K), the layout vpdpbusd's 4-byte lanes want:
//
//   acc[m][n-lane] += sum_{j<4} w[n, k+j] (u8, register) * x[m, k+j] (s8, one broadcast dword)
//
// so each int32 lane is one output's whole group dot after group/4 steps, and a group costs
// per (X row, 16 outputs) CPG*8 vpdpbusd + one cvt, one mul (scale x d), one or two fma.
// Math (kernels.h, QActs): y[m,n] = sum_g scale[n,g] d[m,g] idot_g + sum_g min[n,g] s[m,g].
// idot_g is exact in int32 (|w| <= 255, |x| <= 127, group <= 128: < 2^22), the same integers
// as avx2/avxvnni; only the fp32 summation order differs (one lane per output, groups added
// in order, instead of 8 lane partials reduced at the end), tests/test_kernels.py bounds it.
//
// q8 codes are signed, but vpdpbusd's register operand is unsigned: W is stored as w + 128
// (xor 0x80, 1..255) and each group dot corrected in int32 by 128 * sum_k x[m,k] (exact).
//
// Blocking (per thread, over its [n0, n1) slice):
//   for K chunk of kc <= kChunkK codes
//     for W block of <= kBlockRows rows  codes unpacked (code policies of avx2/q*_impl.h) and
//                                        transposed to [16-row vector][kc/4][16 rows][4 codes]
//                                        (16 x 16 dword transposes), scales/mins to [g][n] fp32
//       for X tile of kTileRows rows     int8 rows read in place ([M, K] row-major)
//         for kTileVecs vectors at a time  micro-kernel: kTileRows x kTileVecs int32 + fp32 accumulators
// Registers: 12 int32 + 12 fp32 accumulators + 3 W vectors + 1 broadcast = 28 of 32 zmm.
// Per 4-code step: 3 W loads + 4 broadcast loads for 12 vpdpbusd. The W block (48 rows x 768
// codes = 36 KiB) stays in L1 while every X tile streams it (96 rows x 1024: fc1 197x3072x768 ran
// at 297 instead of 423 GFLOP/s, 1 thread); the X tile (kTileRows x kc bytes) serves every vector.
// Partial sums of K chunks accumulate in y (first chunk: bias + sum), as in common_avx2.h.
#define EV_AVX512VNNI 1
// GCC 12 flags the _mm512_undefined_epi32() pass-through inside avx512fintrin.h's unpack
// intrinsics as maybe-uninitialized (a false positive of the header, not of this code).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "../avx2/q2_impl.h"
#include "../avx2/q3_impl.h"
#include "../avx2/q4_impl.h"
#include "../avx2/q8_impl.h"
#include "avx512vnni.h"

#if !defined(__AVX512VNNI__) || !defined(__AVX512BW__)
#error "csrc/kernels/avx512vnni needs -mavx512f -mavx512bw -mavx512vl -mavx512vnni (cmake/sources.cmake)"
#endif

namespace ev {
namespace avx512vnni {

constexpr int kTileRows = 4;             // X rows per micro tile
constexpr int kTileVecs = 3;             // 16-row W vectors per micro tile
constexpr int64_t kChunkK = 768;         // codes per K chunk (multiple of 128)
constexpr int64_t kBlockRows = 48;       // W rows per block (multiple of 16 * kTileVecs)
constexpr int64_t kGMax = kChunkK / 32;  // groups per K chunk at most
constexpr int64_t kRowPad = kChunkK + 64;

// Per-thread scratch of one W block (~60 KiB: on the stack of the calling/pool thread).
struct WBlock {
  alignas(64) uint8_t w[kBlockRows * kChunkK];  // [nvec][kcp/4][16][4] transposed codes
  alignas(64) float sc[kGMax * kBlockRows];      // [g][nbp] scales (fp32), zero past the block's rows
  alignas(64) float mn[kGMax * kBlockRows];      // [g][nbp] mins
  alignas(64) uint8_t rows[16 * kRowPad];  // 16 rows' codes unpacked to u8 (natural order)
};

// r[i] = row i (16 dwords) -> r[j] = dword j of every row (lane i = row i).
EV_INLINE void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // In r[4b + j], 128-bit lane L holds dword j (of the 4 in that lane's column group) of rows
  // 4b..4b+3. Two rounds of 128-bit shuffles gather the four row blocks per column.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// W rows [nb0, nb0 + nb) x codes [k0, k1) -> b (layout above); rows past nb are zero codes
// (their outputs are masked off on store).
template <class P>
void pack_w(const QMatrix& w, int64_t nb0, int64_t nb, int64_t k0, int64_t k1, int64_t g0, int64_t gn,
            int64_t kcp, WBlock& b) {
  const int64_t kc = k1 - k0, nvec = (nb + 15) / 16, nbp = nvec * 16;
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int64_t v = 0; v < nvec; ++v) {
    const uint8_t* src[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t j = v * 16 + i;
      src[i] = j < nb ? P::prepare(w.row_qs(nb0 + j), k0, k1, b.rows + i * kRowPad) : nullptr;
    }
    uint8_t* dst = b.w + v * kcp * 16;
    for (int64_t c = 0; c < kcp / 64; ++c) {
      const int64_t rem = kc - c * 64;  // >= 32: kc is a multiple of 32
      const __mmask64 m = rem >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << rem) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = src[i] ? _mm512_maskz_loadu_epi8(m, src[i] + c * 64) : _mm512_setzero_si512();
        if constexpr (P::kSigned) r[i] = _mm512_xor_si512(r[i], flip);  // w + 128 as u8
      }
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_store_si512(dst + (c * 16 + j) * 64, r[j]);
    }
  }
  for (int64_t g = 0; g < gn; ++g) {
    float* sc = b.sc + g * nbp;
    float* mn = b.mn + g * nbp;
    for (int64_t j = 0; j < nbp; ++j) {
      sc[j] = j < nb ? _cvtsh_ss(w.row_scales(nb0 + j)[g0 + g]) : 0.f;
      if constexpr (!P::kSigned) mn[j] = j < nb ? _cvtsh_ss(w.row_mins(nb0 + j)[g0 + g]) : 0.f;
    }
  }
}

EV_INLINE int32_t ld32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

struct Tile {
  const int8_t* x;    // X row m0 at code k0; rows K bytes apart
  int64_t K;
  const uint8_t* w;   // the tile's first W vector at step 0; vectors vstride bytes apart
  int64_t vstride;
  int64_t gn;
  const float* sc;    // [g][nbp] at the tile's first column
  const float* mn;
  int64_t nbp;
  const float* d;     // d[m0, g0]; rows G apart
  const float* s;
  int64_t G;
  const int32_t* xi;  // q8: sum of the int8 x of (row i, group g) at xi[i * kGMax + g]
};

// fa[i][v] = this K chunk's y[m0 + i, 16 v + lane] (before bias / earlier chunks).
template <int MR, int NV, int CPG, bool kSigned>
EV_INLINE void micro(const Tile& t, __m512 (&fa)[MR][NV]) {
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) fa[i][v] = _mm512_setzero_ps();
  const int8_t* x = t.x;
  const uint8_t* w = t.w;
  for (int64_t g = 0; g < t.gn; ++g) {
    __m512i ia[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) ia[i][v] = _mm512_setzero_si512();
    for (int st = 0; st < CPG * 8; ++st) {
      __m512i wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_si512(w + v * t.vstride + st * 64);
      for (int i = 0; i < MR; ++i) {
        const __m512i xb = _mm512_set1_epi32(ld32(x + i * t.K + st * 4));
        for (int v = 0; v < NV; ++v) ia[i][v] = _mm512_dpbusd_epi32(ia[i][v], wv[v], xb);
      }
    }
    w += CPG * 8 * 64;
    x += CPG * 32;
    const float* sc = t.sc + g * t.nbp;
    const float* mn = t.mn + g * t.nbp;
    for (int i = 0; i < MR; ++i) {
      const __m512 dv = _mm512_set1_ps(t.d[i * t.G + g]);
      for (int v = 0; v < NV; ++v) {
        __m512i iv = ia[i][v];
        if constexpr (kSigned) iv = _mm512_sub_epi32(iv, _mm512_set1_epi32(128 * t.xi[i * kGMax + g]));
        const __m512 sd = _mm512_mul_ps(_mm512_load_ps(sc + 16 * v), dv);
        fa[i][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iv), sd, fa[i][v]);
        if constexpr (!kSigned)
          fa[i][v] = _mm512_fmadd_ps(_mm512_load_ps(mn + 16 * v), _mm512_set1_ps(t.s[i * t.G + g]), fa[i][v]);
      }
    }
  }
}

// One micro tile, then y[m0 + i, col .. col + 16 NV) (masked to n1) = base + fa, base = bias
// (or 0) for the first K chunk, else y itself.
template <int MR, int NV, int CPG, bool kSigned>
void tile(const Tile& t, const LinearArgs& a, int64_t m0, int64_t col, int64_t n1, bool first) {
  __m512 fa[MR][NV];
  micro<MR, NV, CPG, kSigned>(t, fa);
  const int64_t N = a.w.n;
  for (int v = 0; v < NV; ++v) {
    const int64_t c = col + 16 * v, cnt = std::min<int64_t>(16, n1 - c);
    if (cnt <= 0) break;
    const __mmask16 mk = (__mmask16)((1u << cnt) - 1);
    const __m512 bias = first && a.bias ? _mm512_maskz_loadu_ps(mk, a.bias + c) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      float* yp = a.y + (m0 + i) * N + c;
      const __m512 base = first ? bias : _mm512_maskz_loadu_ps(mk, yp);
      _mm512_mask_storeu_ps(yp, mk, _mm512_add_ps(base, fa[i][v]));
    }
  }
}

template <int CPG, bool kSigned, int MR = kTileRows>
void tile_m(int64_t mr, int64_t nv, const Tile& t, const LinearArgs& a, int64_t m0, int64_t col, int64_t n1,
            bool first) {
  if (mr == MR) {
    if (nv >= 3) tile<MR, 3, CPG, kSigned>(t, a, m0, col, n1, first);
    else if (nv == 2) tile<MR, 2, CPG, kSigned>(t, a, m0, col, n1, first);
    else tile<MR, 1, CPG, kSigned>(t, a, m0, col, n1, first);
  } else if constexpr (MR > 1) {
    tile_m<CPG, kSigned, MR - 1>(mr, nv, t, a, m0, col, n1, first);
  }
}

template <class P, int CPG>
void zgemm_impl(const LinearArgs& a, int64_t n0, int64_t n1) {
  static_assert(kTileVecs == 3 && kBlockRows % (16 * kTileVecs) == 0, "tile_m dispatches NV = 1..3; blocks hold whole tiles");
  constexpr int kGroup = CPG * 32;
  const QMatrix& w = a.w;
  const int64_t K = w.k, M = a.m, G = K / kGroup;
  const int64_t kc = std::min(K, kChunkK);
  WBlock b;
  int32_t xi[kTileRows * kGMax];
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t k1 = std::min(K, k0 + kc), g0 = k0 / kGroup, gn = (k1 - k0) / kGroup;
    const int64_t kcp = (k1 - k0 + 63) / 64 * 64;
    for (int64_t nb0 = n0; nb0 < n1; nb0 += kBlockRows) {
      const int64_t nb = std::min(kBlockRows, n1 - nb0), nvec = (nb + 15) / 16, nbp = nvec * 16;
      pack_w<P>(w, nb0, nb, k0, k1, g0, gn, kcp, b);
      for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
        const int64_t mr = std::min<int64_t>(kTileRows, M - m0);
        Tile t;
        t.x = a.xq->q + m0 * K + k0;
        t.K = K;
        t.vstride = kcp * 16;
        t.gn = gn;
        t.nbp = nbp;
        t.d = a.xq->d + m0 * G + g0;
        t.s = a.xq->s + m0 * G + g0;
        t.G = G;
        t.xi = xi;
        if constexpr (P::kSigned) {  // group sums of the int8 activations: vpdpbusd with 1s
          const __m512i ones = _mm512_set1_epi8(1);
          for (int64_t i = 0; i < mr; ++i)
            for (int64_t g = 0; g < gn; ++g) {
              __m512i acc = _mm512_setzero_si512();
              const int8_t* p = t.x + i * K + g * kGroup;
              for (int j = 0; j < kGroup; j += 64) {
                const __mmask64 m = kGroup - j >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (kGroup - j)) - 1);
                acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(m, p + j));
              }
              xi[i * kGMax + g] = _mm512_reduce_add_epi32(acc);
            }
        }
        for (int64_t v0 = 0; v0 < nvec; v0 += kTileVecs) {
          t.w = b.w + v0 * t.vstride;
          t.sc = b.sc + v0 * 16;
          t.mn = b.mn + v0 * 16;
          tile_m<CPG, P::kSigned>(mr, std::min<int64_t>(kTileVecs, nvec - v0), t, a, m0, nb0 + v0 * 16, n1, k0 == 0);
        }
      }
    }
  }
}

template <class P>
void zgemm(const LinearArgs& a, int64_t n0, int64_t n1) {
  switch (a.w.group) {
    case 32: zgemm_impl<P, 1>(a, n0, n1); break;
    case 64: zgemm_impl<P, 2>(a, n0, n1); break;
    case 128: zgemm_impl<P, 4>(a, n0, n1); break;
    default: break;  // valid_group() was checked by the caller
  }
}

}  // namespace avx512vnni

void gemm_q2_avx512vnni(const LinearArgs& a, int64_t n0, int64_t n1) { avx512vnni::zgemm<avx512vnni::Q2Codes>(a, n0, n1); }
void gemm_q3_avx512vnni(const LinearArgs& a, int64_t n0, int64_t n1) { avx512vnni::zgemm<avx512vnni::Q3Codes>(a, n0, n1); }
void gemm_q4_avx512vnni(const LinearArgs& a, int64_t n0, int64_t n1) { avx512vnni::zgemm<avx512vnni::Q4Codes>(a, n0, n1); }
void gemm_q8_avx512vnni(const LinearArgs& a, int64_t n0, int64_t n1) { avx512vnni::zgemm<avx512vnni::Q8Codes>(a, n0, n1); }

}  // namespace ev
