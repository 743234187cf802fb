// neon_impl.h — private to csrc/kernels/neon and csrc/kernels/neondot: the one body of
// the AArch64 linear kernels, templated on
//   Q    the code layout of a qtype (Q2Codes / Q3Codes / Q4Codes / Q8Codes below), which
//        turns one layout unit of raw bytes into 32-code granules in natural order, and
//   Dot  the int8 dot step  acc(int32x4) += a(int8x16) . b(int8x16)  whose lane sums add
//        up to the 16-element dot: SDOT in neondot/, vmull_s8 + vmlal_high_s8 +
//        vpadalq_s16 in neon/ (each .cc defines its own; this header names no ISA extension).
//
// Linkage: everything here lives in an anonymous namespace, so neon/*.cc (armv8-a) and
// neondot/*.cc (armv8.2-a+dotprod) each compile a private copy with their own -march; the
// linker can never merge a +dotprod-compiled inline function into the baseline path that a
// Cortex-A53 runs. For the same reason this header calls no external-linkage inline helper
// from csrc (fp16_to_fp32, unpack_codes_qN, std::min...): the portable unpack of a row's
// last partial unit is an out-of-line function compiled in neon/ (neon_detail::unpack_tail).
//
// Math (kernels.h): for group g of row n and activation row m,
//   y[m,n] += scale[n,g] * d[m,g] * idot(q_w, q_x over g)  +  min[n,g] * s[m,g]
// The int8 dot of a group is exact in int32 (|sum| <= 128 * 127 * 127 < 2^21, so also exact
// after vcvtq_f32_s32). Four int32x4 group accumulators are reduced with a vpaddq tree into
// one int32x4 of four outputs and applied with one fma; so the per-group epilogue is
// vectorised across the tile rather than done with scalar horizontal sums.
//
// Loop structure, with granule = 32 codes, UG = granules per layout unit (q4: 2, q2/q3: 4,
// q8: 1) and GPG = granules per group (1/2/4 for group 32/64/128, a template parameter):
// a row is walked in chunks of L = max(UG, GPG) granules; a chunk is whole units and whole
// groups, so its raw bytes are loaded once, unpacked granule by granule with compile-time
// shifts, and the group epilogue runs at compile-time positions. Only q2/q3 (K % 128 != 0)
// and q4 with group 32 (K % 64 == 32) leave a partial last unit: it is unpacked into a small
// stack buffer once per row tile and walked group by group.
//
// GEMV (M == 1): tiles of 4 W rows; lanes of the accumulator = the 4 outputs y[n..n+3].
// GEMM (M >= 2): tiles of 2 W rows x 4 X rows; each unpacked W vector feeds 4 dots; lanes
// of accumulator r = the 4 X rows of W row n+r. X rows are blocked (kGemmXBlockBytes) so a
// block stays in L2 while the W slice streams past it. Ragged tiles (N or M not a multiple
// of the tile) repeat the last valid row and drop its results, so there is one code path.
#pragma once

#include <arm_neon.h>

#include <cstdint>
#include <utility>

#include "../kernels.h"
#include "../ref/ref.h"

namespace ev {

namespace neon_detail {
// Codes [0, ncodes) of a row stream that starts at `qs` at a unit boundary (ncodes < one
// unit for q2/q3/q4 here: the row's partial last unit) as int8, via the portable unpack of
// qtypes/qN.h. Defined in neon/linear_neon.cc (baseline ISA).
void unpack_tail(QType t, const uint8_t* qs, int64_t ncodes, int8_t* out);
}  // namespace neon_detail

namespace {

// Lambdas here are tiny epilogues called from several unrolled sites: always inline them.
#define EV_LAMBDA_INLINE __attribute__((always_inline))

constexpr int kGranule32 = 32;
// X bytes of one GEMM row block: about half an A76/A78 L2.
constexpr int64_t kGemmXBlockBytes = 128 * 1024;

// ---- compile-time loop -------------------------------------------------------------
template <class F, int... I>
EV_INLINE void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
// f(std::integral_constant<int, 0>{}) ... f(std::integral_constant<int, N-1>{}).
template <int N, class F>
EV_INLINE void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

EV_INLINE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// v >> S for S > 0, v << -S for S < 0 (per byte).
template <int S>
EV_INLINE uint8x16_t shift_right(uint8x16_t v) {
  if constexpr (S > 0) return vshrq_n_u8(v, S);
  else if constexpr (S < 0) return vshlq_n_u8(v, -S);
  else return v;
}

EV_INLINE int8x16_t as_s8(uint8x16_t v) { return vreinterpretq_s8_u8(v); }

// ---- fp16 scale / min loads ----------------------------------------------------------
EV_INLINE float h2f(const uint16_t* p) {
  return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_dup_u16(p))), 0);
}
EV_INLINE float32x4_t h2f_x4(const uint16_t* p0, const uint16_t* p1, const uint16_t* p2,
                             const uint16_t* p3) {
  uint16x4_t v = vld1_dup_u16(p0);
  v = vld1_lane_u16(p1, v, 1);
  v = vld1_lane_u16(p2, v, 2);
  v = vld1_lane_u16(p3, v, 3);
  return vcvt_f32_f16(vreinterpret_f16_u16(v));
}
EV_INLINE float32x4_t f32_x4(const float* p0, const float* p1, const float* p2, const float* p3) {
  float32x4_t v = vld1q_dup_f32(p0);
  v = vld1q_lane_f32(p1, v, 1);
  v = vld1q_lane_f32(p2, v, 2);
  v = vld1q_lane_f32(p3, v, 3);
  return v;
}
// Lane i = horizontal sum of a[i].
EV_INLINE int32x4_t hsum_x4(int32x4_t a0, int32x4_t a1, int32x4_t a2, int32x4_t a3) {
  return vpaddq_s32(vpaddq_s32(a0, a1), vpaddq_s32(a2, a3));
}

// ---- code layouts (bit diagrams in qtypes/qN.h) ----------------------------------------
// granule<T>(raw, w0, w1): codes 32T..32T+15 -> w0, 32T+16..32T+31 -> w1 of the unit, as
// int8 (q2/q3/q4 codes are 0..15, valid signed bytes for SDOT / SMULL).

struct Q4Codes {  // unit: 64 codes in 32 bytes; byte j = q[j] | q[j+32] << 4
  static constexpr int kBits = 4, kUnitGranules = 2, kUnitBytes = 32;
  static constexpr bool kHasMins = true;
  struct Raw { uint8x16_t a, b; };
  static EV_INLINE Raw load(const uint8_t* p) { return {vld1q_u8(p), vld1q_u8(p + 16)}; }
  template <int T>
  static EV_INLINE void granule(const Raw& r, int8x16_t& w0, int8x16_t& w1) {
    if constexpr (T == 0) {
      const uint8x16_t m = vdupq_n_u8(0x0F);
      w0 = as_s8(vandq_u8(r.a, m));
      w1 = as_s8(vandq_u8(r.b, m));
    } else {
      w0 = as_s8(vshrq_n_u8(r.a, 4));
      w1 = as_s8(vshrq_n_u8(r.b, 4));
    }
  }
};

struct Q2Codes {  // unit: 128 codes in 32 bytes; byte j = q[j] | q[j+32]<<2 | q[j+64]<<4 | q[j+96]<<6
  static constexpr int kBits = 2, kUnitGranules = 4, kUnitBytes = 32;
  static constexpr bool kHasMins = true;
  struct Raw { uint8x16_t a, b; };
  static EV_INLINE Raw load(const uint8_t* p) { return {vld1q_u8(p), vld1q_u8(p + 16)}; }
  template <int T>
  static EV_INLINE void granule(const Raw& r, int8x16_t& w0, int8x16_t& w1) {
    if constexpr (T == 3) {
      w0 = as_s8(vshrq_n_u8(r.a, 6));
      w1 = as_s8(vshrq_n_u8(r.b, 6));
    } else {
      const uint8x16_t m = vdupq_n_u8(3);
      w0 = as_s8(vandq_u8(shift_right<2 * T>(r.a), m));
      w1 = as_s8(vandq_u8(shift_right<2 * T>(r.b), m));
    }
  }
};

// unit: 128 codes in 48 bytes: 32 bytes of low 2-bit planes (the q2 layout) + 16 bytes
// whose bit i of byte j is the high bit of q[j + 16 i]: granule T takes bit 2T (codes
// 32T..+15) and bit 2T+1 (codes 32T+16..+31), moved to bit 2 and OR-ed onto the low bits.
struct Q3Codes {
  static constexpr int kBits = 3, kUnitGranules = 4, kUnitBytes = 48;
  static constexpr bool kHasMins = true;
  struct Raw { uint8x16_t a, b, h; };
  static EV_INLINE Raw load(const uint8_t* p) {
    return {vld1q_u8(p), vld1q_u8(p + 16), vld1q_u8(p + 32)};
  }
  template <int T>
  static EV_INLINE void granule(const Raw& r, int8x16_t& w0, int8x16_t& w1) {
    int8x16_t l0, l1;
    Q2Codes::granule<T>(Q2Codes::Raw{r.a, r.b}, l0, l1);
    const uint8x16_t four = vdupq_n_u8(4);
    const uint8x16_t h0 = vandq_u8(shift_right<2 * T - 2>(r.h), four);  // bit 2T -> bit 2
    const uint8x16_t h1 = vandq_u8(shift_right<2 * T - 1>(r.h), four);  // bit 2T+1 -> bit 2
    w0 = vorrq_s8(l0, as_s8(h0));
    w1 = vorrq_s8(l1, as_s8(h1));
  }
};

struct Q8Codes {  // unit = granule: 32 int8 codes in natural order
  static constexpr int kBits = 8, kUnitGranules = 1, kUnitBytes = 32;
  static constexpr bool kHasMins = false;
  struct Raw { int8x16_t a, b; };
  static EV_INLINE Raw load(const uint8_t* p) {
    const int8_t* s = reinterpret_cast<const int8_t*>(p);
    return {vld1q_s8(s), vld1q_s8(s + 16)};
  }
  template <int T>
  static EV_INLINE void granule(const Raw& r, int8x16_t& w0, int8x16_t& w1) {
    static_assert(T == 0, "q8 unit is one granule");
    w0 = r.a;
    w1 = r.b;
  }
};

// Chunk geometry of a (layout, group) pair; see the header comment.
template <class Q, int GPG>
struct Geometry {
  static constexpr int UG = Q::kUnitGranules;
  static constexpr int L = UG > GPG ? UG : GPG;  // granules per chunk
  static constexpr int NU = L / UG;              // units per chunk
  static constexpr int kChunkCodes = L * kGranule32;
  static constexpr int kChunkBytes = NU * Q::kUnitBytes;
  static constexpr int kGroupCodes = GPG * kGranule32;
  static_assert(L % UG == 0 && L % GPG == 0, "chunks are whole units and whole groups");
  static_assert(kChunkCodes <= 128, "the tail buffer holds less than one chunk");
};

// ---- GEMV: 4 W rows x 1 X row ------------------------------------------------------------
template <class Q, class Dot, int GPG>
void gemv_kernel(const LinearArgs& a, int64_t n0, int64_t n1) {
  using Geo = Geometry<Q, GPG>;
  constexpr int NR = 4;
  const QMatrix& w = a.w;
  const int64_t K = w.k;
  const int64_t nchunks = K / Geo::kChunkCodes;
  const int64_t ktail = nchunks * Geo::kChunkCodes;  // first code of the partial unit
  const int64_t tail_groups = (K - ktail) / Geo::kGroupCodes;
  const int8_t* xq = a.xq->q;
  const float* xd = a.xq->d;
  const float* xs = a.xq->s;

  for (int64_t n = n0; n < n1; n += NR) {
    const uint8_t* wq[NR];
    const uint16_t* sc[NR];
    const uint16_t* mn[NR];
    for (int r = 0; r < NR; ++r) {
      const int64_t row = imin(n + r, n1 - 1);  // ragged tile: repeat the last row
      wq[r] = w.row_qs(row);
      sc[r] = w.row_scales(row);
      mn[r] = w.row_mins(row);
    }
    float32x4_t acc = vdupq_n_f32(0.f);
    int32x4_t ia[NR];
    int64_t g = 0;
    auto flush = [&]() EV_LAMBDA_INLINE {
      const float32x4_t scale = h2f_x4(sc[0] + g, sc[1] + g, sc[2] + g, sc[3] + g);
      acc = vfmaq_f32(acc, vcvtq_f32_s32(hsum_x4(ia[0], ia[1], ia[2], ia[3])),
                      vmulq_n_f32(scale, xd[g]));
      if constexpr (Q::kHasMins)
        acc = vfmaq_n_f32(acc, h2f_x4(mn[0] + g, mn[1] + g, mn[2] + g, mn[3] + g), xs[g]);
      ++g;
    };

    for (int64_t c = 0; c < nchunks; ++c) {
      typename Q::Raw raw[NR][Geo::NU];
      for (int r = 0; r < NR; ++r)
        for (int u = 0; u < Geo::NU; ++u)
          raw[r][u] = Q::load(wq[r] + c * Geo::kChunkBytes + u * Q::kUnitBytes);
      const int8_t* xc = xq + c * Geo::kChunkCodes;
      static_for<Geo::L>([&](auto t) EV_LAMBDA_INLINE {
        constexpr int T = decltype(t)::value;
        if constexpr (T % GPG == 0)
          for (int r = 0; r < NR; ++r) ia[r] = vdupq_n_s32(0);
        const int8x16_t x0 = vld1q_s8(xc + T * kGranule32);
        const int8x16_t x1 = vld1q_s8(xc + T * kGranule32 + 16);
        for (int r = 0; r < NR; ++r) {
          int8x16_t w0, w1;
          Q::template granule<T % Geo::UG>(raw[r][T / Geo::UG], w0, w1);
          ia[r] = Dot::dot(Dot::dot(ia[r], w0, x0), w1, x1);
        }
        if constexpr (T % GPG == GPG - 1) flush();
      });
    }

    if (tail_groups > 0) {
      alignas(16) int8_t buf[NR][128];
      for (int r = 0; r < NR; ++r)
        neon_detail::unpack_tail(w.type, wq[r] + ktail * Q::kBits / 8, K - ktail, buf[r]);
      for (int64_t tg = 0; tg < tail_groups; ++tg) {
        for (int r = 0; r < NR; ++r) ia[r] = vdupq_n_s32(0);
        static_for<GPG>([&](auto t) EV_LAMBDA_INLINE {
          constexpr int T = decltype(t)::value;
          const int64_t off = (tg * GPG + T) * kGranule32;
          const int8x16_t x0 = vld1q_s8(xq + ktail + off), x1 = vld1q_s8(xq + ktail + off + 16);
          for (int r = 0; r < NR; ++r)
            ia[r] = Dot::dot(Dot::dot(ia[r], vld1q_s8(buf[r] + off), x0), vld1q_s8(buf[r] + off + 16), x1);
        });
        flush();
      }
    }

    float* y = a.y;
    if (n + NR <= n1) {
      if (a.bias) acc = vaddq_f32(acc, vld1q_f32(a.bias + n));
      vst1q_f32(y + n, acc);
    } else {
      float out[NR];
      vst1q_f32(out, acc);
      for (int r = 0; n + r < n1; ++r) y[n + r] = out[r] + (a.bias ? a.bias[n + r] : 0.f);
    }
  }
}

// ---- GEMM: 2 W rows x 4 X rows -----------------------------------------------------------
template <class Q, class Dot, int GPG>
void gemm_kernel(const LinearArgs& a, int64_t n0, int64_t n1) {
  using Geo = Geometry<Q, GPG>;
  constexpr int NR = 2, MR = 4;
  const QMatrix& w = a.w;
  const int64_t K = w.k, N = w.n, M = a.m, G = w.groups_per_row();
  const int64_t nchunks = K / Geo::kChunkCodes;
  const int64_t ktail = nchunks * Geo::kChunkCodes;
  const int64_t tail_groups = (K - ktail) / Geo::kGroupCodes;
  int64_t mblock = (kGemmXBlockBytes / K) / MR * MR;
  if (mblock < MR) mblock = MR;

  for (int64_t mb0 = 0; mb0 < M; mb0 += mblock) {
    const int64_t mb1 = imin(M, mb0 + mblock);
    for (int64_t n = n0; n < n1; n += NR) {
      const uint8_t* wq[NR];
      const uint16_t* sc[NR];
      const uint16_t* mn[NR];
      for (int r = 0; r < NR; ++r) {
        const int64_t row = imin(n + r, n1 - 1);
        wq[r] = w.row_qs(row);
        sc[r] = w.row_scales(row);
        mn[r] = w.row_mins(row);
      }
      alignas(16) int8_t tbuf[NR][128];  // this W tile's partial last unit, unpacked once
      if (tail_groups > 0)
        for (int r = 0; r < NR; ++r)
          neon_detail::unpack_tail(w.type, wq[r] + ktail * Q::kBits / 8, K - ktail, tbuf[r]);

      for (int64_t m = mb0; m < mb1; m += MR) {
        const int8_t* xq[MR];
        const float* xd[MR];
        const float* xs[MR];
        for (int i = 0; i < MR; ++i) {
          const int64_t row = imin(m + i, mb1 - 1);
          xq[i] = a.xq->q + row * K;
          xd[i] = a.xq->d + row * G;
          xs[i] = a.xq->s + row * G;
        }
        float32x4_t acc[NR];
        for (int r = 0; r < NR; ++r) acc[r] = vdupq_n_f32(0.f);
        int32x4_t ia[NR][MR];
        int64_t g = 0;
        auto zero = [&]() EV_LAMBDA_INLINE {
          for (int r = 0; r < NR; ++r)
            for (int i = 0; i < MR; ++i) ia[r][i] = vdupq_n_s32(0);
        };
        auto flush = [&]() EV_LAMBDA_INLINE {
          const float32x4_t d = f32_x4(xd[0] + g, xd[1] + g, xd[2] + g, xd[3] + g);
          for (int r = 0; r < NR; ++r) {
            const int32x4_t dots = hsum_x4(ia[r][0], ia[r][1], ia[r][2], ia[r][3]);
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(dots), vmulq_n_f32(d, h2f(sc[r] + g)));
          }
          if constexpr (Q::kHasMins) {
            const float32x4_t s = f32_x4(xs[0] + g, xs[1] + g, xs[2] + g, xs[3] + g);
            for (int r = 0; r < NR; ++r) acc[r] = vfmaq_n_f32(acc[r], s, h2f(mn[r] + g));
          }
          ++g;
        };
        // One 16-code half of a granule: 2 W vectors x 4 X vectors -> 8 dots.
        auto step = [&](const int8x16_t* wv, int64_t k) EV_LAMBDA_INLINE {
          for (int i = 0; i < MR; ++i) {
            const int8x16_t xv = vld1q_s8(xq[i] + k);
            for (int r = 0; r < NR; ++r) ia[r][i] = Dot::dot(ia[r][i], wv[r], xv);
          }
        };

        for (int64_t c = 0; c < nchunks; ++c) {
          typename Q::Raw raw[NR][Geo::NU];
          for (int r = 0; r < NR; ++r)
            for (int u = 0; u < Geo::NU; ++u)
              raw[r][u] = Q::load(wq[r] + c * Geo::kChunkBytes + u * Q::kUnitBytes);
          const int64_t kc = c * Geo::kChunkCodes;
          static_for<Geo::L>([&](auto t) EV_LAMBDA_INLINE {
            constexpr int T = decltype(t)::value;
            if constexpr (T % GPG == 0) zero();
            int8x16_t w0[NR], w1[NR];
            for (int r = 0; r < NR; ++r)
              Q::template granule<T % Geo::UG>(raw[r][T / Geo::UG], w0[r], w1[r]);
            step(w0, kc + T * kGranule32);
            step(w1, kc + T * kGranule32 + 16);
            if constexpr (T % GPG == GPG - 1) flush();
          });
        }
        for (int64_t tg = 0; tg < tail_groups; ++tg) {
          zero();
          static_for<GPG>([&](auto t) EV_LAMBDA_INLINE {
            constexpr int T = decltype(t)::value;
            const int64_t off = (tg * GPG + T) * kGranule32;
            int8x16_t w0[NR], w1[NR];
            for (int r = 0; r < NR; ++r) {
              w0[r] = vld1q_s8(tbuf[r] + off);
              w1[r] = vld1q_s8(tbuf[r] + off + 16);
            }
            step(w0, ktail + off);
            step(w1, ktail + off + 16);
          });
          flush();
        }

        for (int r = 0; r < NR && n + r < n1; ++r) {
          float out[MR];
          vst1q_f32(out, vaddq_f32(acc[r], vdupq_n_f32(a.bias ? a.bias[n + r] : 0.f)));
          for (int i = 0; i < MR && m + i < mb1; ++i) a.y[(m + i) * N + n + r] = out[i];
        }
      }
    }
  }
}

// Group size -> template instance. Groups other than 32/64/128 never reach a kernel
// (validated by the callers); the reference handles them anyway.
template <class Q, class Dot>
EV_INLINE void gemv_dispatch(const LinearArgs& a, int64_t n0, int64_t n1) {
  switch (a.w.group) {
    case 32: gemv_kernel<Q, Dot, 1>(a, n0, n1); return;
    case 64: gemv_kernel<Q, Dot, 2>(a, n0, n1); return;
    case 128: gemv_kernel<Q, Dot, 4>(a, n0, n1); return;
    default: linear_ref(a, n0, n1); return;
  }
}
template <class Q, class Dot>
EV_INLINE void gemm_dispatch(const LinearArgs& a, int64_t n0, int64_t n1) {
  switch (a.w.group) {
    case 32: gemm_kernel<Q, Dot, 1>(a, n0, n1); return;
    case 64: gemm_kernel<Q, Dot, 2>(a, n0, n1); return;
    case 128: gemm_kernel<Q, Dot, 4>(a, n0, n1); return;
    default: linear_ref(a, n0, n1); return;
  }
}

// ---- q2b: 2-bit codes with bilevel scales (qtypes/q2b.h) ----------------------------------
// Codes are the q2 stream (Q2Codes); groups are 16 codes = one int8x16 dot, activations are
// int8 per group of 16 (QActs group 16). Per 128-code unit and W row, the 8 groups' factors
// S = d2 * (c - m2) (same fp32 operations as the reference) and S*z are computed once into
// small arrays laid out [group][row], so a group's epilogue is one 4-lane load each:
//   y[m,n] += S[n,j] d[m,j] idot_j  -  S[n,j] z[n,j] s[m,j]
// Everything is inline here (no call to q2b.h helpers: see the linkage note at the top).

// S and S*z of row r, groups [g0, g0 + ng), into S[i * stride + col], Sz[...].
EV_INLINE void q2b_unit_params(const QMatrix& w, int64_t r, int64_t g0, int ng, float* S, float* Sz, int stride, int col) {
  const int64_t G = w.k / kQ2BGroup, blk = (r / kQ2BRowBlock) * G;
  const uint8_t* sc = w.sc4 + r * (G / 2);
  const uint8_t* zp = w.zp2 + r * ((G + 3) / 4);
  for (int i = 0; i < ng; ++i) {
    const int64_t g = g0 + i;
    const int c = (sc[g / 2] >> (4 * (g & 1))) & 15, z = (zp[g / 4] >> (2 * (g & 3))) & 3;
    const float s = w.l2d[blk + g] * ((float)c - w.l2m[blk + g]);
    S[i * stride + col] = s;
    Sz[i * stride + col] = s * (float)z;
  }
}

template <class Dot>
void gemv_q2b_kernel(const LinearArgs& a, int64_t n0, int64_t n1) {
  constexpr int NR = 4;
  const QMatrix& w = a.w;
  const int64_t K = w.k, G = K / kQ2BGroup;
  const int8_t* xq = a.xq->q;
  const float* xd = a.xq->d;
  const float* xs = a.xq->s;
  for (int64_t n = n0; n < n1; n += NR) {
    int64_t rows[NR];
    for (int r = 0; r < NR; ++r) rows[r] = imin(n + r, n1 - 1);
    float32x4_t acc = vdupq_n_f32(0.f);
    alignas(16) float S[8][NR], Sz[8][NR];
    for (int64_t k0 = 0; k0 < K; k0 += 128) {
      const int64_t g0 = k0 / kQ2BGroup;
      const int ng = (int)imin(8, G - g0);
      for (int r = 0; r < NR; ++r) q2b_unit_params(w, rows[r], g0, ng, &S[0][0], &Sz[0][0], NR, r);
      auto flush = [&](int i, const int32x4_t* ia) EV_LAMBDA_INLINE {
        const int32x4_t dots = hsum_x4(ia[0], ia[1], ia[2], ia[3]);
        acc = vfmaq_f32(acc, vcvtq_f32_s32(dots), vmulq_n_f32(vld1q_f32(S[i]), xd[g0 + i]));
        acc = vfmsq_f32(acc, vld1q_f32(Sz[i]), vdupq_n_f32(xs[g0 + i]));
      };
      if (ng == 8) {
        Q2Codes::Raw raw[NR];
        for (int r = 0; r < NR; ++r) raw[r] = Q2Codes::load(w.row_qs(rows[r]) + k0 / 4);
        static_for<4>([&](auto t) EV_LAMBDA_INLINE {
          constexpr int T = decltype(t)::value;
          const int8x16_t x0 = vld1q_s8(xq + k0 + 32 * T), x1 = vld1q_s8(xq + k0 + 32 * T + 16);
          int32x4_t ia0[NR], ia1[NR];
          for (int r = 0; r < NR; ++r) {
            int8x16_t w0, w1;
            Q2Codes::granule<T>(raw[r], w0, w1);
            ia0[r] = Dot::dot(vdupq_n_s32(0), w0, x0);
            ia1[r] = Dot::dot(vdupq_n_s32(0), w1, x1);
          }
          flush(2 * T, ia0);
          flush(2 * T + 1, ia1);
        });
      } else {  // the row's partial last unit: 32/64/96 codes
        alignas(16) int8_t buf[NR][128];
        for (int r = 0; r < NR; ++r) neon_detail::unpack_tail(QType::Q2B, w.row_qs(rows[r]) + k0 / 4, K - k0, buf[r]);
        for (int i = 0; i < ng; ++i) {
          const int8x16_t xv = vld1q_s8(xq + k0 + 16 * i);
          int32x4_t ia[NR];
          for (int r = 0; r < NR; ++r) ia[r] = Dot::dot(vdupq_n_s32(0), vld1q_s8(buf[r] + 16 * i), xv);
          flush(i, ia);
        }
      }
    }
    float out[NR];
    vst1q_f32(out, acc);
    for (int r = 0; r < NR && n + r < n1; ++r) a.y[n + r] = out[r] + (a.bias ? a.bias[n + r] : 0.f);
  }
}

// GEMM: tiles of 2 W rows x 4 X rows, X rows blocked as in gemm_kernel.
template <class Dot>
void gemm_q2b_kernel(const LinearArgs& a, int64_t n0, int64_t n1) {
  constexpr int NR = 2, MR = 4;
  const QMatrix& w = a.w;
  const int64_t K = w.k, N = w.n, M = a.m, G = K / kQ2BGroup;
  int64_t mblock = (kGemmXBlockBytes / K) / MR * MR;
  if (mblock < MR) mblock = MR;
  for (int64_t mb0 = 0; mb0 < M; mb0 += mblock) {
    const int64_t mb1 = imin(M, mb0 + mblock);
    for (int64_t n = n0; n < n1; n += NR) {
      int64_t rows[NR];
      for (int r = 0; r < NR; ++r) rows[r] = imin(n + r, n1 - 1);
      for (int64_t m = mb0; m < mb1; m += MR) {
        const int8_t* xq[MR];
        const float* xd[MR];
        const float* xs[MR];
        for (int i = 0; i < MR; ++i) {
          const int64_t row = imin(m + i, mb1 - 1);
          xq[i] = a.xq->q + row * K;
          xd[i] = a.xq->d + row * G;
          xs[i] = a.xq->s + row * G;
        }
        float32x4_t acc[NR];
        for (int r = 0; r < NR; ++r) acc[r] = vdupq_n_f32(0.f);
        alignas(16) float S[8][NR], Sz[8][NR];
        for (int64_t k0 = 0; k0 < K; k0 += 128) {
          const int64_t g0 = k0 / kQ2BGroup;
          const int ng = (int)imin(8, G - g0);
          for (int r = 0; r < NR; ++r) q2b_unit_params(w, rows[r], g0, ng, &S[0][0], &Sz[0][0], NR, r);
          // One group (16 codes): 2 W vectors x 4 X vectors -> 8 dots, then the epilogue.
          auto group = [&](int i, const int8x16_t* wv) EV_LAMBDA_INLINE {
            int32x4_t ia[NR][MR];
            for (int j = 0; j < MR; ++j) {
              const int8x16_t xv = vld1q_s8(xq[j] + k0 + 16 * i);
              for (int r = 0; r < NR; ++r) ia[r][j] = Dot::dot(vdupq_n_s32(0), wv[r], xv);
            }
            const int64_t g = g0 + i;
            const float32x4_t d = f32_x4(xd[0] + g, xd[1] + g, xd[2] + g, xd[3] + g);
            const float32x4_t s = f32_x4(xs[0] + g, xs[1] + g, xs[2] + g, xs[3] + g);
            for (int r = 0; r < NR; ++r) {
              const int32x4_t dots = hsum_x4(ia[r][0], ia[r][1], ia[r][2], ia[r][3]);
              acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(dots), vmulq_n_f32(d, S[i][r]));
              acc[r] = vfmsq_f32(acc[r], s, vdupq_n_f32(Sz[i][r]));
            }
          };
          if (ng == 8) {
            Q2Codes::Raw raw[NR];
            for (int r = 0; r < NR; ++r) raw[r] = Q2Codes::load(w.row_qs(rows[r]) + k0 / 4);
            static_for<4>([&](auto t) EV_LAMBDA_INLINE {
              constexpr int T = decltype(t)::value;
              int8x16_t w0[NR], w1[NR];
              for (int r = 0; r < NR; ++r) Q2Codes::granule<T>(raw[r], w0[r], w1[r]);
              group(2 * T, w0);
              group(2 * T + 1, w1);
            });
          } else {
            alignas(16) int8_t buf[NR][128];
            for (int r = 0; r < NR; ++r) neon_detail::unpack_tail(QType::Q2B, w.row_qs(rows[r]) + k0 / 4, K - k0, buf[r]);
            for (int i = 0; i < ng; ++i) {
              int8x16_t wv[NR];
              for (int r = 0; r < NR; ++r) wv[r] = vld1q_s8(buf[r] + 16 * i);
              group(i, wv);
            }
          }
        }
        for (int r = 0; r < NR && n + r < n1; ++r) {
          float out[MR];
          vst1q_f32(out, vaddq_f32(acc[r], vdupq_n_f32(a.bias ? a.bias[n + r] : 0.f)));
          for (int i = 0; i < MR && m + i < mb1; ++i) a.y[(m + i) * N + n + r] = out[i];
        }
      }
    }
  }
}

}  // namespace
}  // namespace ev

// Defines the ten gemv/gemm entry points of one ISA (neon.h / neondot.h) on a Dot policy.
#define EV_NEON_DEFINE_KERNELS(suffix, DotT)                                                   \
  namespace ev {                                                                               \
  void gemv_q2_##suffix(const LinearArgs& a, int64_t n0, int64_t n1) { gemv_dispatch<Q2Codes, DotT>(a, n0, n1); } \
  void gemm_q2_##suffix(const LinearArgs& a, int64_t n0, int64_t n1) { gemm_dispatch<Q2Codes, DotT>(a, n0, n1); } \
  void gemv_q3_##suffix(const LinearArgs& a, int64_t n0, int64_t n1) { gemv_dispatch<Q3Codes, DotT>(a, n0, n1); } \
  void gemm_q3_##suffix(const LinearArgs& a, int64_t n0, int64_t n1) { gemm_dispatch<Q3Codes, DotT>(a, n0, n1); } \
  void gemv_q4_##suffix(const LinearArgs& a, int64_t n0, int64_t n1) { gemv_dispatch<Q4Codes, DotT>(a, n0, n1); } \
  void gemm_q4_##suffix(const LinearArgs& a, int64_t n0, int64_t n1) { gemm_dispatch<Q4Codes, DotT>(a, n0, n1); } \
  void gemv_q8_##suffix(const LinearArgs& a, int64_t n0, int64_t n1) { gemv_dispatch<Q8Codes, DotT>(a, n0, n1); } \
  void gemm_q8_##suffix(const LinearArgs& a, int64_t n0, int64_t n1) { gemm_dispatch<Q8Codes, DotT>(a, n0, n1); } \
  void gemv_q2b_##suffix(const LinearArgs& a, int64_t n0, int64_t n1) { gemv_q2b_kernel<DotT>(a, n0, n1); } \
  void gemm_q2b_##suffix(const LinearArgs& a, int64_t n0, int64_t n1) { gemm_q2b_kernel<DotT>(a, n0, n1); } \
  }
