// common_avx2.h — shared by csrc/kernels/avx2 and csrc/kernels/avxvnni: helpers and the
// two loop drivers (GEMV, GEMM) that every quant type instantiates with its own code policy.
//
// Two builds of the same code, chosen per translation unit:
//   (default)   namespace ev::avx2,    AVX2/FMA/F16C only (avx2/*.cc);
//   EV_VNNI=1   namespace ev::avxvnni, the integer dot is VEX AVX-VNNI vpdpbusd
//               (avxvnni/*.cc, compiled with -mavxvnni in addition).
// EV_X86_NS names the namespace. Distinct namespaces keep the two builds' inline and
// template code distinct symbols: the linker can never merge a VNNI copy into the AVX2
// path (which would SIGILL on a CPU without AVX-VNNI).
//
// Math (kernels.h, QActs): for weight group g of row n and activation row m,
//   y[m,n] = sum_g scale[n,g] * d[m,g] * idot(qw, qx over g)  +  sum_g min[n,g] * s[m,g]
// (q8: no min term). idot is exact in integers:
//   AVX2: _mm256_maddubs_epi16(w_u8, x_i8) gives int16 pair sums, several are summed in
//         int16 inside a group (bounds below), one _mm256_madd_epi16(.., 1) widens to int32;
//   VNNI: _mm256_dpbusd_avx_epi32(acc, w_u8, x_i8) adds the 4-byte sums straight into
//         int32 lanes (1 uop instead of maddubs + add, and no widen per group).
// Both give every int32 lane the exact sum of the same bytes (4i..4i+3 of each 32-code
// vector, over the group), so the int32 sums, and hence the float results, are
// bit-identical between the two builds (tests/test_kernels.py checks this). Then one cvt
// + fmadd applies scale*d per group.
//
// A code policy P (q2_impl.h, q3_impl.h, q4_impl.h, q8_impl.h) provides:
//   kSbBytes                     bytes of one full 128-code superblock (b * 16)
//   kSigned                      false: codes are u8 0..2^b-1 (asymmetric, with mins);
//                                true:  codes are int8 -127..127 (q8, sign trick, no mins)
//   load128(row, k0, w[4])       the 128 codes [k0, k0+128) of a row (k0 % 128 == 0) as
//                                four 32-code vectors in natural order
//   unpack_tail(row, k0, n, buf) codes [k0, k0+n) (n = 32/64/96, k0 % 128 == 0) -> buf
//   prepare(row, k0, k1, wb)     GEMM: pointer to codes [k0, k1) as 32-code vectors (u8
//                                codes unpacked into wb; q8: the row itself)
// int16 headroom per group (AVX2 only; pair sums <= 2*qmax*127): q2 762*4, q3 1778*4,
// q4 3810*4 are < 32767 for 4 maddubs (group 128); q8 pairs reach 32258, so widen after each.
// Only AVX2/FMA/F16C (+ AVX-VNNI in the EV_VNNI build): no AVX-512.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "avx2.h"

#if defined(EV_AVX512VNNI)
// csrc/kernels/avx512vnni uses the code policies (load128 / unpack_tail / prepare) and helpers,
// compiled with AVX-512 flags: its own namespace, so no copy can merge into the AVX2 path.
#define EV_X86_NS avx512vnni
#elif defined(EV_VNNI)
#if !defined(__AVXVNNI__)
#error "EV_VNNI builds need -mavxvnni (cmake/sources.cmake sets it for csrc/kernels/avxvnni)"
#endif
#define EV_X86_NS avxvnni
#else
#define EV_X86_NS avx2
#endif

namespace ev {
namespace EV_X86_NS {

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

// n (>= 1) fp16 values -> 8 floats, zero past n; never reads past p[n). Tails: a masked
// load of the whole 32-bit pairs, plus the odd last value inserted.
EV_INLINE __m256 load_f16x8(const uint16_t* p, int64_t n) {
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m128i mask = _mm_cmpgt_epi32(_mm_set1_epi32((int)(n / 2)), _mm_setr_epi32(0, 1, 2, 3));
  __m128i v = _mm_maskload_epi32(reinterpret_cast<const int*>(p), mask);
  switch (n) {
    case 1: v = _mm_insert_epi16(v, p[0], 0); break;
    case 3: v = _mm_insert_epi16(v, p[2], 2); break;
    case 5: v = _mm_insert_epi16(v, p[4], 4); break;
    case 7: v = _mm_insert_epi16(v, p[6], 6); break;
    default: break;
  }
  return _mm256_cvtph_ps(v);
}

// n (>= 1) floats -> 8 lanes, zero past n (masked load: never touches p[n..8)).
EV_INLINE __m256 load_f32x8(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), idx);
  return _mm256_maskload_ps(p, mask);
}

// Hides v's value from the optimiser (no instruction): keeps a running int16 sum a
// sequential chain. Without it GCC reassociates a group's adds into a tree, which keeps
// all maddubs results of a 6-row GEMM tile live at once and spills (q4 197x4096x4096:
// 150 vs 131 GFLOP/s on one core).
EV_INLINE void opaque(__m256i& v) { __asm__("" : "+x"(v)); }

EV_INLINE __m256i ld(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

#if defined(EV_VNNI)
constexpr bool kVnniBuild = true;
#else
constexpr bool kVnniBuild = false;
#endif

// One 32-code step of a group's integer dot. first: acc is ignored (starts the group).
// AVX2, asymmetric: int16 pair sums, accumulated in int16 (headroom above). AVX2, signed
// (q8): |w| x sign(x, w) = w*x, widened to int32 at once. VNNI: vpdpbusd into int32 lanes,
// the same |w| x sign(x, w) operands for q8 (|w| <= 127 fits u8).
template <bool kSigned>
EV_INLINE __m256i dot32(__m256i w, __m256i x, __m256i acc, bool first, __m256i ones) {
#if defined(EV_VNNI)
  (void)ones;
  const __m256i a0 = first ? _mm256_setzero_si256() : acc;
  if constexpr (kSigned) return _mm256_dpbusd_avx_epi32(a0, _mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
  else return _mm256_dpbusd_avx_epi32(a0, w, x);
#else
  if constexpr (kSigned) {
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), ones);
    return first ? p : _mm256_add_epi32(acc, p);
  } else {
    const __m256i p = _mm256_maddubs_epi16(w, x);
    return first ? p : _mm256_add_epi16(acc, p);
  }
#endif
}
// The group's int32 lanes (AVX2 asymmetric: widen the int16 sums once per group).
template <bool kSigned>
EV_INLINE __m256i widen(__m256i acc, __m256i ones) {
#if defined(EV_VNNI)
  (void)ones;
  return acc;
#else
  if constexpr (kSigned) return acc;
  else return _mm256_madd_epi16(acc, ones);
#endif
}

// int32 lane i = sum of the u8 x s8 products of bytes 4i..4i+3 (q2b's per-chunk dot).
EV_INLINE __m256i udot4(__m256i w, __m256i x, __m256i ones) {
#if defined(EV_VNNI)
  (void)ones;
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
#endif
}

// Groups per stack chunk of the per-row factor buffers (sd = scale*d): K is walked in
// chunks of at most kGChunk groups so buffers stay fixed-size for any K.
constexpr int64_t kGChunk = 256;

// ---- GEMV: M == 1, x (K int8) stays in L1 ----
// Per K chunk (<= kGChunk groups; one chunk unless K > 8192 at group 32): d and s copied
// zero-padded to the stack once; then per 4 W rows, R at a time (see gemv_impl):
// sd[r][g] = scale[n+r,g]*d[g] into a stack buffer (8 at a time, F16C), the min term
// min.s as 8-lane partial products into the accumulator, and one pass over the codes,
// 128 codes (one superblock) per step, a group flushed every CPG steps. Each x vector is
// loaded once per step and shared by the R rows. The 4 rows' accumulators are reduced
// together (hsum4) into y. Bandwidth: rows' codes and the scales / mins planes
// are sequential streams; a software prefetch kPrefetch bytes ahead on the codes keeps
// enough misses in flight for one core to beat a plain streaming read (q4 4096x4096,
// 1 thread: no prefetch 8.2 GB/s, 1 KiB ahead 11, 4 KiB ahead 13). VNNI: 4 vpdpbusd per
// 128 codes instead of 4 maddubs + 3 adds + 1 madd; q2 (ALU-bound) gains ~1.2x on
// L3-resident weights, q4 (stream-bound) little.
constexpr int kPrefetch = 4096;

struct GemvChunk {
  const int8_t* x;   // the chunk's activations
  const float* dz;   // [gpad] d, zero-padded
  const float* sz;   // [gpad] s, zero-padded
  int64_t g0, gn, gpad, k0, k1;
};

// acc[r] (r < R) = rows n..n+R-1 over one K chunk, as 8-lane partial sums.
template <class P, int CPG, int R>
EV_INLINE void gemv_rows(const QMatrix& w, const GemvChunk& ch, int64_t n, float* sd, uint8_t* tail, __m256* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < ch.gpad; i += 8) {
    const __m256 dd = _mm256_load_ps(ch.dz + i);
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(sd + r * kGChunk + i, _mm256_mul_ps(load_f16x8(w.row_scales(n + r) + ch.g0 + i, ch.gn - i), dd));
      if constexpr (!P::kSigned)
        acc[r] = _mm256_fmadd_ps(load_f16x8(w.row_mins(n + r) + ch.g0 + i, ch.gn - i), _mm256_load_ps(ch.sz + i), acc[r]);
    }
  }
  // Pointer bumps rather than one shared index: base + displacement operands keep each
  // maddubs-with-load micro-fused (an indexed one splits into two uops).
  const uint8_t* wp = w.row_qs(n) + ch.k0 / 128 * P::kSbBytes;
  const int64_t rstride = row_bytes(w.type, w.k);
  const int8_t* xp = ch.x;
  const float* sp = sd;
  int64_t k = ch.k0;
  for (; k + 128 <= ch.k1; k += 128, wp += P::kSbBytes, xp += 128, sp += 4 / CPG) {
    __m256i c[R][4];
    for (int r = 0; r < R; ++r) {
      if (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(wp + r * rstride) + kPrefetch, _MM_HINT_T0);
      P::load128(wp + r * rstride, 0, c[r]);
    }
    // VNNI: a group's 32-code steps alternate between two int32 chains (summed at the flush):
    // vpdpbusd has ~5 cycles of latency, and one chain of four per 128 codes made the q2
    // GEMV latency-bound (q2 K=1536 in cache, 1 thread: 35 G weights/s with one chain).
    constexpr int kChains = (kVnniBuild && CPG >= 2) ? 2 : 1;
    __m256i ia[R][kChains];
    for (int j = 0; j < 4; ++j) {
      const __m256i xv = ld(xp + 32 * j);
      const int jc = j % CPG, ch = jc % kChains;
      for (int r = 0; r < R; ++r) {
        ia[r][ch] = dot32<P::kSigned>(c[r][j], xv, ia[r][ch], jc < kChains, ones);
        if (jc == CPG - 1) {
          __m256i sum = widen<P::kSigned>(ia[r][0], ones);
          if constexpr (kChains == 2) sum = _mm256_add_epi32(sum, ia[r][1]);
          const __m256 f = _mm256_cvtepi32_ps(sum);
          acc[r] = _mm256_fmadd_ps(f, _mm256_broadcast_ss(sp + r * kGChunk + j / CPG), acc[r]);
        }
      }
    }
  }
  if (k < ch.k1) {  // tail: 32/64/96 codes (a group divides it), unpacked on the stack
    const int nc = (int)((ch.k1 - k) / 32);
    for (int r = 0; r < R; ++r) {
      P::unpack_tail(w.row_qs(n + r), k, ch.k1 - k, tail);
      __m256i ia = _mm256_setzero_si256();
      for (int j = 0; j < nc; ++j) {
        ia = dot32<P::kSigned>(ld(tail + 32 * j), ld(xp + 32 * j), ia, j % CPG == 0, ones);
        if (j % CPG == CPG - 1) {
          const __m256 f = _mm256_cvtepi32_ps(widen<P::kSigned>(ia, ones));
          acc[r] = _mm256_fmadd_ps(f, _mm256_broadcast_ss(sp + r * kGChunk + j / CPG), acc[r]);
        }
      }
    }
  }
}

// Rows per pass: 2 rows share each x load and halve per-row overheads, which wins on
// short rows (compute-bound); on long rows one sequential stream at a time streams
// faster (measured, cold weights, 1 core, 1 vs 2 rows: q3 K=4096 0.53 vs 0.57 ms, q3
// K=768 0.089 vs 0.083 ms, q2 K=768 0.072 vs 0.060 ms).
constexpr int64_t kPairRowBytes = 768;  // rows of at most this many code bytes go in pairs

template <class P, int CPG, int R>
void gemv_pass(const LinearArgs& a, int64_t n0, int64_t n1) {
  constexpr int kGroup = CPG * 32;
  const QMatrix& w = a.w;
  const int64_t K = w.k, G = K / kGroup;
  alignas(32) float sd[R * kGChunk], dz[kGChunk], sz[kGChunk];
  alignas(32) uint8_t tail[128];
  for (int64_t g0 = 0; g0 < G; g0 += kGChunk) {
    GemvChunk ch;
    ch.g0 = g0;
    ch.gn = std::min(kGChunk, G - g0);
    ch.gpad = (ch.gn + 7) / 8 * 8;
    ch.k0 = g0 * kGroup;
    ch.k1 = (g0 + ch.gn) * kGroup;
    ch.x = a.xq->q + ch.k0;
    for (int64_t i = 0; i < ch.gpad; i += 8) {
      _mm256_store_ps(dz + i, load_f32x8(a.xq->d + g0 + i, ch.gn - i));
      _mm256_store_ps(sz + i, load_f32x8(a.xq->s + g0 + i, ch.gn - i));
    }
    ch.dz = dz;
    ch.sz = sz;
    const bool first = g0 == 0;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {  // 4 rows, reduced together
      __m256 acc[4];
      for (int r = 0; r < 4; r += R) gemv_rows<P, CPG, R>(w, ch, n + r, sd, tail, acc + r);
      __m128 v = hsum4(acc[0], acc[1], acc[2], acc[3]);
      const __m128 base = first ? (a.bias ? _mm_loadu_ps(a.bias + n) : _mm_setzero_ps()) : _mm_loadu_ps(a.y + n);
      _mm_storeu_ps(a.y + n, _mm_add_ps(base, v));
    }
    for (; n < n1; ++n) {
      __m256 acc[1];
      gemv_rows<P, CPG, 1>(w, ch, n, sd, tail, acc);
      a.y[n] = (first ? (a.bias ? a.bias[n] : 0.f) : a.y[n]) + hsum(acc[0]);
    }
  }
}

template <class P, int CPG>
void gemv_impl(const LinearArgs& a, int64_t n0, int64_t n1) {
  if (row_bytes(a.w.type, a.w.k) <= kPairRowBytes) gemv_pass<P, CPG, 2>(a, n0, n1);
  else gemv_pass<P, CPG, 1>(a, n0, n1);
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
//   for K chunk of kc <= 2048 codes
//     for W block of nb rows             codes unpacked once to u8 (nb x kc <= 64 KiB, L2)
//       for X block of mb rows           int8 rows packed per tile (mb x kc <= 32 KiB, L1)
//         for W row n of the block       sd[m][g] = scale[n,g] * d[m,g] for the block's rows
//           for 6-row tile of the block  micro-kernel: 1 W row x 6 X rows
// The micro-kernel keeps 6 int16 + 6 fp32 accumulators, the current W vector and the
// madd ones in registers (14 of 16 ymm); X vectors are maddubs memory operands (L1). W is
// read from memory once per K chunk and unpacked once; X is re-packed per W block (a
// copy, ~3%). Per group and X row: CPG maddubs (+ adds), one madd, one cvt, one fmadd
// with a broadcast load of sd — maddubs/madd/cvt/fmadd share ports 0/1, which bounds a
// q4 g128 pair-group at 3.5 cycles (measured 4.2 in the micro-kernel, 4.8 overall).
// VNNI: CPG vpdpbusd (no madd, no int16 adds, the ones register unused) + cvt + fmadd per
// group and row; each row's vpdpbusd chain is serial (latency ~5), so 6 rows keep it only
// partly busy: measured 1.1x the AVX2 GEMM (q4 197x4096x4096, 1 core; 7 rows: no better).
// Partial sums of K chunks accumulate in y (first chunk: bias + sum). All buffers are
// fixed-size, on the stack (~125 KiB; glibc threads have MiBs).
constexpr int64_t kKc = 2048;        // codes per K chunk (multiple of 128)
constexpr int64_t kWBlock = 65536;   // bytes of unpacked W per block
constexpr int64_t kNbMax = 256;      // W rows per block at most
constexpr int64_t kNbG = 2048;       // nb * gpad at most (scales/mins floats)
constexpr int64_t kXBlock = 32768;   // bytes of packed int8 X per block (L1-resident)
constexpr int64_t kMbMax = 64;       // X rows per block at most
constexpr int64_t kMbG = 1024;       // mb * gpad at most (d, s, sd floats)
constexpr int kMr = 6;               // X rows per micro-kernel tile (VNNI: 7 measured no faster)

// x: the tile's MR rows, interleaved per 32-code chunk: chunk j of row m at x + (j*MR + m)*32,
// so every X operand is one pointer + a constant displacement (indexed addressing would
// un-laminate each maddubs-with-load into two uops at rename).
template <bool kSigned, int MR, int CPG>
EV_INLINE void micro(const uint8_t* wb, const int8_t* x, int64_t gn, const float* sd,
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
      const __m256i wv = ld(wb + c * 32);  // q8: straight from the qs row (unaligned)
      for (int m = 0; m < MR; ++m) {
        ia[m] = dot32<kSigned>(wv, ld(x + (c * MR + m) * 32), ia[m], c == 0, ones);
        opaque(ia[m]);
      }
    }
    wb += CPG * 32;
    x += CPG * MR * 32;
    for (int m = 0; m < MR; ++m)
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(widen<kSigned>(ia[m], ones)),
                               _mm256_broadcast_ss(sd + m * gpad + g), acc[m]);
  }
  const __m256 z = _mm256_setzero_ps();
  for (int m = 0; m < MR; m += 4)
    _mm_storeu_ps(out + m, hsum4(acc[m], m + 1 < MR ? acc[(m + 1) % MR] : z, m + 2 < MR ? acc[(m + 2) % MR] : z,
                                 m + 3 < MR ? acc[(m + 3) % MR] : z));
}

// micro<MR> for the tile's row count mr in [1, kMr] (the last tile of a block may be short).
template <bool kSigned, int CPG, int MR = kMr>
EV_INLINE void micro_dispatch(int64_t mr, const uint8_t* wb, const int8_t* x, int64_t gn, const float* sd,
                              const float* mf, const float* sb, int64_t gpad, float* out) {
  if (mr == MR) micro<kSigned, MR, CPG>(wb, x, gn, sd, mf, sb, gpad, out);
  else if constexpr (MR > 1) micro_dispatch<kSigned, CPG, MR - 1>(mr, wb, x, gn, sd, mf, sb, gpad, out);
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
  const int64_t gpmax = (kc / kGroup + 7) / 8 * 8;
  const int64_t nbs = std::max<int64_t>(1, std::min({kNbMax, kWBlock / kc, kNbG / gpmax}));
  const int64_t mbs = std::max<int64_t>(kMr, std::min({kMbMax, kXBlock / kc, kMbG / gpmax}) / kMr * kMr);
  alignas(64) uint8_t wball[kWBlock];
  alignas(64) int8_t xbuf[kXBlock];
  alignas(32) float sfall[kNbG], mfall[kNbG];
  alignas(32) float db[kMbG], sb[kMbG], sd[kMbG];
  const uint8_t* wptr[kNbMax];
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t k1 = std::min(K, k0 + kc), g0 = k0 / kGroup, gn = (k1 - k0) / kGroup;
    const int64_t gpad = (gn + 7) / 8 * 8;
    for (int64_t nb0 = n0; nb0 < n1; nb0 += nbs) {
      const int64_t nb = std::min(nbs, n1 - nb0);
      for (int64_t j = 0; j < nb; ++j) {  // the W block: codes, scales, mins (zero-padded)
        wptr[j] = P::prepare(w.row_qs(nb0 + j), k0, k1, wball + j * kc);
        const uint16_t* sc = w.row_scales(nb0 + j) + g0;
        for (int64_t i = 0; i < gpad; i += 8) {
          _mm256_store_ps(sfall + j * gpad + i, load_f16x8(sc + i, gn - i));
          if constexpr (!P::kSigned)
            _mm256_store_ps(mfall + j * gpad + i, load_f16x8(w.row_mins(nb0 + j) + g0 + i, gn - i));
        }
      }
      for (int64_t m0 = 0; m0 < M; m0 += mbs) {
        const int64_t mb = std::min(mbs, M - m0);
        // The X block, packed per tile (chunk-interleaved, see micro): contiguous, so
        // rows K bytes apart (K often a multiple of 4 KiB) do not all map to the same L1
        // sets. d and s zero-padded to gpad.
        for (int64_t mt = 0; mt < mb; mt += kMr) {
          const int64_t mr = std::min<int64_t>(kMr, mb - mt);
          for (int64_t m = 0; m < mr; ++m) {
            const int8_t* src = xq + (m0 + mt + m) * K + k0;
            int8_t* dst = xbuf + mt * kc + m * 32;
            for (int64_t j = 0; j < (k1 - k0) / 32; ++j)
              _mm256_store_si256(reinterpret_cast<__m256i*>(dst + j * mr * 32), ld(src + j * 32));
          }
        }
        for (int64_t m = 0; m < mb; ++m) {
          for (int64_t i = 0; i < gpad; i += 8) {
            const int64_t r = (m0 + m) * G + g0 + i;
            _mm256_store_ps(db + m * gpad + i, load_f32x8(xd + r, gn - i));
            _mm256_store_ps(sb + m * gpad + i, load_f32x8(xs + r, gn - i));
          }
        }
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t n = nb0 + j;
          const float* sf = sfall + j * gpad;
          for (int64_t m = 0; m < mb; ++m)
            for (int64_t i = 0; i < gpad; i += 8)
              _mm256_store_ps(sd + m * gpad + i, _mm256_mul_ps(_mm256_load_ps(sf + i), _mm256_load_ps(db + m * gpad + i)));
          const float* mf = mfall + j * gpad;
          const uint8_t* wb = wptr[j];
          const float add = k0 == 0 && a.bias ? a.bias[n] : 0.f;
          for (int64_t mt = 0; mt < mb; mt += kMr) {
            const int64_t mr = std::min<int64_t>(kMr, mb - mt);
            const int8_t* xt = xbuf + mt * kc;
            const float* sdt = sd + mt * gpad;
            const float* sbt = sb + mt * gpad;
            float out[8];
            micro_dispatch<P::kSigned, CPG>(mr, wb, xt, gn, sdt, mf, sbt, gpad, out);
            float* yc = a.y + (m0 + mt) * N + n;
            for (int64_t i = 0; i < mr; ++i) yc[i * N] = (k0 == 0 ? add : yc[i * N]) + out[i];
          }
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

}  // namespace EV_X86_NS
}  // namespace ev
