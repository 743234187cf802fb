// q2.h — 2-bit asymmetric weights: code layout and portable pack / unpack (numpy twin:
// edgevlm/qtypes/q2.py).
//
// A row of K codes is cut into units of 128 codes (32 bytes); the last unit may hold
// U = 32, 64 or 96 codes (U/4 bytes). In a unit of U codes with S = U/4, byte j holds
//
//          bits 7-6        5-4            3-2          1-0
//   byte j [ q[j + 3S] ] [ q[j + 2S] ]  [ q[j + S] ] [ q[j] ]        j = 0 .. S-1
//
// Why: one 32-byte AVX2 load + four (shift, and 3) give codes 0..31, 32..63, 64..95,
// 96..127 each in natural order, matching 32 contiguous int8 activations; on NEON two
// 16-byte loads do the same in halves. Cost: 2 bits/weight + 32 bits/group of scale+min
// = 2.25 / 2.5 / 3.0 bits per weight at group 128 / 64 / 32.
#pragma once

#include "qtype.h"

namespace ev {

constexpr int kQ2Unit = 128;
constexpr int kQ2UnitBytes = kQ2Unit / 4;
static_assert(kQ2UnitBytes * 8 == kQ2Unit * 2, "q2 unit must be exactly 2 bits per code");

inline void pack_codes_q2(const uint8_t* q, int64_t k, uint8_t* qs) {
  for (int64_t u0 = 0; u0 < k; u0 += kQ2Unit) {
    const int64_t U = (k - u0) >= kQ2Unit ? kQ2Unit : (k - u0), S = U / 4;
    for (int64_t j = 0; j < S; ++j) {
      uint8_t b = 0;
      for (int i = 0; i < 4; ++i) b |= (uint8_t)((q[u0 + j + i * S] & 3) << (2 * i));
      qs[u0 / 4 + j] = b;
    }
  }
}

inline void unpack_codes_q2(const uint8_t* qs, int64_t k, uint8_t* q) {
  for (int64_t u0 = 0; u0 < k; u0 += kQ2Unit) {
    const int64_t U = (k - u0) >= kQ2Unit ? kQ2Unit : (k - u0), S = U / 4;
    for (int64_t j = 0; j < S; ++j)
      for (int i = 0; i < 4; ++i) q[u0 + j + i * S] = (qs[u0 / 4 + j] >> (2 * i)) & 3;
  }
}

}  // namespace ev
