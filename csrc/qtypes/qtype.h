// qtype.h — what every weight quant type shares: the enum, the packed-matrix view
// and the plane layout of a packed weight W[N, K].
//
// A packed matrix is ONE contiguous byte blob (one .evlm tensor record) of three planes:
//
//   [ qs     : N rows x row_bytes(K)        packed integer codes, layout per qN.h ]
//   [ scales : N x G  fp16 (raw uint16)     G = K / group                        ]
//   [ mins   : N x G  fp16                  (q2/q3/q4 only; q8 is symmetric)     ]
//
// Dequantization of element (n, k) in group g = k / group:
//   q2/q3/q4:  w = scale[n,g] * q + min[n,g],   q in [0, 2^bits - 1]  (asymmetric)
//   q8:        w = scale[n,g] * q,              q in [-127, 127]     (symmetric)
// q2b (2-bit codes with bilevel scales, SPEED-Q) has its own five planes and fixed group
// 16: see q2b.h. Everything below that names "scales"/"mins" is about q2/q3/q4/q8.
// Planes instead of interleaved blocks: the codes of a row are one dense stream whose
// SIMD loads never straddle a scale field, and the layout is the same for every group
// size, so one kernel serves groups 32/64/128. The file aligns the blob to 64 bytes.
#pragma once

#include <cstdint>

#include "../common.h"

namespace ev {

enum class QType : int { Q2 = 0, Q3 = 1, Q4 = 2, Q8 = 3, Q2B = 4 };
constexpr int kNumQTypes = 5;

inline const char* qtype_name(QType t) {
  switch (t) {
    case QType::Q2: return "q2";
    case QType::Q3: return "q3";
    case QType::Q4: return "q4";
    case QType::Q8: return "q8";
    case QType::Q2B: return "q2b";
  }
  return "?";
}

inline int qtype_bits(QType t) {
  switch (t) {
    case QType::Q2: return 2;
    case QType::Q3: return 3;
    case QType::Q4: return 4;
    case QType::Q8: return 8;
    case QType::Q2B: return 2;
  }
  return 0;
}

inline bool qtype_has_mins(QType t) { return t != QType::Q8 && t != QType::Q2B; }

// Every code stream is built from 32-weight granules (the smallest group), so K must
// be a multiple of 32 and of the group size.
constexpr int kGranule = 32;
inline bool valid_group(int g) { return g == 32 || g == 64 || g == 128; }
// q2b: group 16 is part of the type (SPEED-Q's g16), the only valid value.
constexpr int kQ2BGroup = 16;
constexpr int kQ2BRowBlock = 16;  // rows sharing one level-2 (d, m) pair per column group
inline bool valid_group(QType t, int g) { return t == QType::Q2B ? g == kQ2BGroup : valid_group(g); }
// The K granule a type needs: 32 for all (q2b codes use the q2 stream; its 16-groups pair up).
inline bool valid_k(QType t, int64_t k, int g) { return k > 0 && k % kGranule == 0 && k % g == 0 && valid_group(t, g); }

inline int64_t row_bytes(QType t, int64_t k) { return k * qtype_bits(t) / 8; }

// q2b plane sizes (layout in q2b.h).
inline int64_t q2b_row_blocks(int64_t n) { return (n + kQ2BRowBlock - 1) / kQ2BRowBlock; }
inline int64_t q2b_sc_row_bytes(int64_t k) { return k / kQ2BGroup / 2; }        // 4-bit scale codes
inline int64_t q2b_zp_row_bytes(int64_t k) { return (k / kQ2BGroup + 3) / 4; }  // 2-bit zeros

inline int64_t packed_size(QType t, int64_t n, int64_t k, int group) {
  if (t == QType::Q2B) {
    const int64_t G = k / kQ2BGroup;
    return n * row_bytes(t, k) + q2b_row_blocks(n) * G * 8 + n * (q2b_sc_row_bytes(k) + q2b_zp_row_bytes(k));
  }
  const int64_t groups = n * (k / group);
  return n * row_bytes(t, k) + groups * 2 * (qtype_has_mins(t) ? 2 : 1);
}

// Non-owning view of a packed W[N, K] (see the plane diagram above).
struct QMatrix {
  QType type;
  int64_t n, k;
  int group;
  const uint8_t* qs;       // [N, row_bytes(K)]
  const uint16_t* scales;  // [N, K/group] fp16 bits
  const uint16_t* mins;    // [N, K/group] fp16 bits; nullptr for q8
  // q2b only (nullptr otherwise), G = K/16, NB = ceil(N/16); see q2b.h.
  const float* l2d = nullptr;    // [NB, G] level-2 scale
  const float* l2m = nullptr;    // [NB, G] level-2 zero
  const uint8_t* sc4 = nullptr;  // [N, G/2] 4-bit scale codes
  const uint8_t* zp2 = nullptr;  // [N, ceil(G/4)] 2-bit zeros

  int64_t groups_per_row() const { return k / group; }
  const uint8_t* row_qs(int64_t r) const { return qs + r * row_bytes(type, k); }
  const uint16_t* row_scales(int64_t r) const { return scales + r * groups_per_row(); }
  const uint16_t* row_mins(int64_t r) const { return mins ? mins + r * groups_per_row() : nullptr; }
};

// Splits a blob into its planes. The caller has checked size == packed_size().
inline QMatrix qmatrix_view(QType t, int64_t n, int64_t k, int group, const uint8_t* blob) {
  QMatrix w{t, n, k, group, blob, nullptr, nullptr};
  const uint8_t* p = blob + n * row_bytes(t, k);
  if (t == QType::Q2B) {  // qs | d | m | sc4 | zp2: the fp32 planes start 8-byte aligned (K % 32 == 0)
    const int64_t nbg = q2b_row_blocks(n) * (k / kQ2BGroup);
    w.l2d = reinterpret_cast<const float*>(p);
    w.l2m = w.l2d + nbg;
    w.sc4 = reinterpret_cast<const uint8_t*>(w.l2m + nbg);
    w.zp2 = w.sc4 + n * q2b_sc_row_bytes(k);
    return w;
  }
  w.scales = reinterpret_cast<const uint16_t*>(p);
  if (qtype_has_mins(t)) w.mins = w.scales + n * (k / group);
  return w;
}

// RTN parameters of one asymmetric group, shared by q2/q3/q4 so that every writer
// (C++, numpy, later Triton) produces the same bits:
//   min   = fp16_floor(min(w))               -> stored min <= every weight
//   scale = fp16_ceil((max(w) - min) / qmax) -> (w - min) / scale <= qmax for every w
//   q     = clamp(nearbyint((w - min) / scale), 0, qmax)     (0 when scale == 0)
// so |w - (scale*q + min)| <= scale/2 exactly (plus fp32 rounding of the product).
struct AsymParams { uint16_t scale, min; float fscale, fmin; };
inline AsymParams asym_params(const float* w, int n, int qmax) {
  float lo = w[0], hi = w[0];
  for (int i = 1; i < n; ++i) { lo = w[i] < lo ? w[i] : lo; hi = w[i] > hi ? w[i] : hi; }
  AsymParams p;
  p.min = fp16_floor(lo);
  p.fmin = fp16_to_fp32(p.min);
  p.scale = fp16_ceil((hi - p.fmin) / (float)qmax);
  p.fscale = fp16_to_fp32(p.scale);
  return p;
}

}  // namespace ev
