// q3.h — 3-bit asymmetric weights: code layout and portable pack / unpack (numpy twin:
// edgevlm/qtypes/q3.py).
//
// Each code is split into its low 2 bits and its high bit, stored as two planes per unit.
// A row of K codes is cut into units of 128 codes (48 bytes); the last unit may hold
// U = 32, 64 or 96 codes (3U/8 bytes). In a unit of U codes, with S = U/4 and H = U/8:
//
//   bytes [0, S)      low planes, exactly the q2 layout of (q & 3):
//                     byte j = lo(q[j]) | lo(q[j+S]) << 2 | lo(q[j+2S]) << 4 | lo(q[j+3S]) << 6
//   bytes [S, S + H)  high plane: bit i of byte j = q[j + i*H] >> 2      (i = 0..7)
//
//        high byte j:  bit 7          ...     bit 1       bit 0
//                      [hi(q[j+7H])]  ...   [hi(q[j+H])] [hi(q[j])]
//
// Why: the low planes unpack exactly like q2 (shift + and 3); the high bits of codes
// 32c..32c+31 are bits (2c, 2c+1) of the 16 high bytes of a full unit: broadcast the
// 16 bytes to both 128-bit lanes, shift lane 0 by 2c and lane 1 by 2c+1, and 1, then
// shift 2 and OR — three cheap ops per 32 codes, no table lookups or byte shuffles.
// Cost: 3 bits/weight + 32 bits/group = 3.25 / 3.5 / 4.0 bits per weight.
#pragma once

#include "qtype.h"

namespace ev {

constexpr int kQ3Unit = 128;
constexpr int kQ3UnitBytes = kQ3Unit * 3 / 8;
static_assert(kQ3UnitBytes == 48, "q3 unit: 32 bytes of low bits + 16 bytes of high bits");

inline void pack_codes_q3(const uint8_t* q, int64_t k, uint8_t* qs) {
  for (int64_t u0 = 0; u0 < k; u0 += kQ3Unit) {
    const int64_t U = (k - u0) >= kQ3Unit ? kQ3Unit : (k - u0), S = U / 4, H = U / 8;
    uint8_t* lo = qs + u0 * 3 / 8;
    uint8_t* hi = lo + S;
    for (int64_t j = 0; j < S; ++j) {
      uint8_t b = 0;
      for (int i = 0; i < 4; ++i) b |= (uint8_t)((q[u0 + j + i * S] & 3) << (2 * i));
      lo[j] = b;
    }
    for (int64_t j = 0; j < H; ++j) {
      uint8_t b = 0;
      for (int i = 0; i < 8; ++i) b |= (uint8_t)(((q[u0 + j + i * H] >> 2) & 1) << i);
      hi[j] = b;
    }
  }
}

inline void unpack_codes_q3(const uint8_t* qs, int64_t k, uint8_t* q) {
  for (int64_t u0 = 0; u0 < k; u0 += kQ3Unit) {
    const int64_t U = (k - u0) >= kQ3Unit ? kQ3Unit : (k - u0), S = U / 4, H = U / 8;
    const uint8_t* lo = qs + u0 * 3 / 8;
    const uint8_t* hi = lo + S;
    for (int64_t j = 0; j < S; ++j)
      for (int i = 0; i < 4; ++i) q[u0 + j + i * S] = (lo[j] >> (2 * i)) & 3;
    for (int64_t j = 0; j < H; ++j)
      for (int i = 0; i < 8; ++i) q[u0 + j + i * H] |= (uint8_t)(((hi[j] >> i) & 1) << 2);
  }
}

}  // namespace ev
