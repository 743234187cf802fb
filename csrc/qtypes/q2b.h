// q2b.h — 2-bit weights with bilevel (double-quantized) scales: SPEED-Q's "int2-bilevel"
// quantizer (design.md Part 2 §4, antgroup/SPEED-Q quantization/bilevel_quantizer.py)
// as a packed type. Numpy twin: edgevlm/qtypes/q2b.py. Group size 16 is part of the type.
//
// Weights W[N, K], K % 32 == 0, G = K / 16 column groups per row, NB = ceil(N / 16)
// row blocks. Level 1: each (row n, group j) of 16 weights has 2-bit codes q, a 2-bit
// integer zero z and a 4-bit scale code c. Level 2: SPEED-Q quantizes the level-1 scales in
// runs of 16 *consecutive scales in (group, row) order* (it regroups W[out, in] to rows of 16
// input channels ordered group-major, then scale.reshape(-1, 16)), so one level-2 group is
// the 16 rows of a row block b = n / 16 at one column group j: a float scale d[b, j] and a
// float (unrounded) zero m[b, j]. The last row block of an N % 16 != 0 matrix is short.
//
// Dequantization (the spec; fp32, in this order, no fused multiply-add):
//   S[n, j] = d[n/16, j] * ((float)c[n, j] - m[n/16, j])
//   w[n, k] = S[n, j] * (float)(q[n, k] - z[n, j])            j = k / 16, q - z in [-3, 3]
// which is SPEED-Q's fake quantization evaluated in float32 (scale2 * (c - zero2), then
// scale * (q - zero)), bit for bit, when d / m / c / z / q are SPEED-Q's values. SPEED-Q's
// bf16 training run rounds each of those three operations to bf16 instead; see q2b.py.
//
// Planes of the blob (one .evlm tensor record; packed_size() in qtype.h):
//   [ qs  : N x K/4 bytes          codes, exactly the q2 layout (q2.h: units of 128 codes, a
//                                  32/64/96-code tail unit), so the q2 unpack serves q2b   ]
//   [ d   : NB x G float32         level-2 scales                                          ]
//   [ m   : NB x G float32         level-2 zeros                                           ]
//   [ sc4 : N x G/2 bytes          byte i of a row = c[2i] | c[2i+1] << 4                  ]
//   [ zp2 : N x ceil(G/4) bytes    byte i of a row = z[4i] | z[4i+1] << 2 | z[4i+2] << 4
//                                  | z[4i+3] << 6 (unused high fields of the last byte 0)   ]
// Why: the qs stream is q2's (one 32-byte load per 128 codes); the fp32 planes come right
// after it, so they are 8-byte aligned (K % 32 == 0) inside a 64-byte aligned blob; a row's
// 8 groups of one 128-code unit have their scale codes in one 32-bit word and their zeros in
// one 16-bit word. fp32 (not fp16) level-2 parameters: SPEED-Q's are bf16 or fp32 tensors
// and m = -min(scales) / d can be large when the 16 scales are close, so fp16 could not hold
// them exactly. Cost per weight (N % 16 == 0, K % 64 == 0):
//   2 (codes) + 4/16 (c) + 2/16 (z) + 64/256 (d, m) = 2.625 bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "q2.h"
#include "qtype.h"

namespace ev {

inline int q2b_scale_code(const QMatrix& w, int64_t r, int64_t j) {
  return (w.sc4[r * q2b_sc_row_bytes(w.k) + j / 2] >> (4 * (j & 1))) & 15;
}
inline int q2b_zero(const QMatrix& w, int64_t r, int64_t j) {
  return (w.zp2[r * q2b_zp_row_bytes(w.k) + j / 4] >> (2 * (j & 3))) & 3;
}
// S[r, j], exactly as the spec above.
inline float q2b_group_scale(const QMatrix& w, int64_t r, int64_t j) {
  const int64_t i = (r / kQ2BRowBlock) * (w.k / kQ2BGroup) + j;
  return w.l2d[i] * ((float)q2b_scale_code(w, r, j) - w.l2m[i]);
}

// SPEED-Q's quantizer (min-max at both levels), float32 operation for operation as in
// q2b.py, so numpy and C++ write the same bytes:
//   level 1, per (row, group): lo/hi = min/max (both replaced by -1/+1 if equal),
//     s = max((hi - lo) / 3, 1e-5),  z = clamp(rint(-lo / s), 0, 3)
//   level 2, per (row block, group) over its nr <= 16 scales s: lo2/hi2 likewise,
//     d = max((hi2 - lo2) / 15, 1e-5),  m = -lo2 / d,  c = clamp(rint(s / max(d, 1e-9) + m), 0, 15)
//   codes: S = d * (c - m),  q = clamp(rint(w / max(S, 1e-9) + z), 0, 3)
// rint = round half to even (std::nearbyint in the default mode; torch.round; np.rint).
// w: [N, K] row-major; writes the whole blob (packed_size(Q2B, N, K, 16) bytes).
inline void quantize_q2b(const float* w, int64_t n, int64_t k, uint8_t* blob) {
  const QMatrix v = qmatrix_view(QType::Q2B, n, k, kQ2BGroup, blob);
  const int64_t G = k / kQ2BGroup, scb = q2b_sc_row_bytes(k), zpb = q2b_zp_row_bytes(k);
  float* d = const_cast<float*>(v.l2d);
  float* m = const_cast<float*>(v.l2m);
  uint8_t* sc = const_cast<uint8_t*>(v.sc4);
  uint8_t* zp = const_cast<uint8_t*>(v.zp2);
  for (int64_t i = 0; i < n * scb; ++i) sc[i] = 0;
  for (int64_t i = 0; i < n * zpb; ++i) zp[i] = 0;
  std::vector<uint8_t> codes((size_t)k);
  std::vector<float> s1((size_t)kQ2BRowBlock);
  std::vector<int> z1((size_t)kQ2BRowBlock);
  std::vector<uint8_t> all_codes((size_t)(kQ2BRowBlock * k));
  for (int64_t b = 0; b * kQ2BRowBlock < n; ++b) {
    const int64_t r0 = b * kQ2BRowBlock, nr = std::min<int64_t>(kQ2BRowBlock, n - r0);
    for (int64_t j = 0; j < G; ++j) {
      for (int64_t r = 0; r < nr; ++r) {  // level 1
        const float* wg = w + (r0 + r) * k + j * kQ2BGroup;
        float lo = wg[0], hi = wg[0];
        for (int i = 1; i < kQ2BGroup; ++i) { lo = wg[i] < lo ? wg[i] : lo; hi = wg[i] > hi ? wg[i] : hi; }
        if (lo == hi) { lo = -1.f; hi = 1.f; }
        const float s = std::fmax((hi - lo) / 3.f, 1e-5f);
        s1[(size_t)r] = s;
        z1[(size_t)r] = (int)std::fmin(3.f, std::fmax(0.f, std::nearbyint(-lo / s)));
      }
      float lo2 = s1[0], hi2 = s1[0];  // level 2
      for (int64_t r = 1; r < nr; ++r) { lo2 = std::fmin(lo2, s1[(size_t)r]); hi2 = std::fmax(hi2, s1[(size_t)r]); }
      if (lo2 == hi2) { lo2 = -1.f; hi2 = 1.f; }
      const float dd = std::fmax((hi2 - lo2) / 15.f, 1e-5f);
      const float mm = -lo2 / dd;
      d[b * G + j] = dd;
      m[b * G + j] = mm;
      for (int64_t r = 0; r < nr; ++r) {
        const int c = (int)std::fmin(15.f, std::fmax(0.f, std::nearbyint(s1[(size_t)r] / std::fmax(dd, 1e-9f) + mm)));
        const int z = z1[(size_t)r];
        sc[(r0 + r) * scb + j / 2] |= (uint8_t)(c << (4 * (j & 1)));
        zp[(r0 + r) * zpb + j / 4] |= (uint8_t)(z << (2 * (j & 3)));
        const float S = dd * ((float)c - mm);
        const float div = std::fmax(S, 1e-9f);
        const float* wg = w + (r0 + r) * k + j * kQ2BGroup;
        uint8_t* cg = all_codes.data() + r * k + j * kQ2BGroup;
        for (int i = 0; i < kQ2BGroup; ++i)
          cg[i] = (uint8_t)std::fmin(3.f, std::fmax(0.f, std::nearbyint(wg[i] / div + (float)z)));
      }
    }
    for (int64_t r = 0; r < nr; ++r)
      pack_codes_q2(all_codes.data() + r * k, k, const_cast<uint8_t*>(v.row_qs(r0 + r)));
  }
}

// Rows [r0, r1) dequantized (the spec above) into out [(r1 - r0), K].
inline void dequant_rows_q2b(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
  std::vector<uint8_t> codes((size_t)w.k);
  for (int64_t r = r0; r < r1; ++r) {
    unpack_codes_q2(w.row_qs(r), w.k, codes.data());
    float* o = out + (r - r0) * w.k;
    for (int64_t j = 0; j < w.k / kQ2BGroup; ++j) {
      const float S = q2b_group_scale(w, r, j);
      const int z = q2b_zero(w, r, j);
      for (int i = 0; i < kQ2BGroup; ++i) {
        const int64_t e = j * kQ2BGroup + i;
        o[e] = S * (float)((int)codes[(size_t)e] - z);
      }
    }
  }
}

}  // namespace ev
