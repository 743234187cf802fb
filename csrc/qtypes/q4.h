// q4.h — 4-bit asymmetric weights: the code layout (the C++ side of the spec; the numpy
// twin is edgevlm/qtypes/q4.py) and the portable pack / unpack / dequant reference.
//
// A row of K codes is cut into units of 64 codes (32 bytes); when K % 64 == 32 the last
// unit holds 32 codes (16 bytes). In a unit of U codes, byte j holds two codes:
//
//          bit 7 ... 4        bit 3 ... 0
//   byte j [ q[j + U/2] ]     [ q[j] ]          j = 0 .. U/2-1
//
// Why: one 32-byte AVX2 load gives codes 0..31 as (v & 0xF) and codes 32..63 as
// (v >> 4) & 0xF, both in natural order, so int8 activations are used as they are; a
// NEON pair of 16-byte loads gives codes 0..15, 16..31 (low) and 32..47, 48..63 (high).
// No shuffles, no activation permutation. Cost: 4 bits/weight + 32 bits/group of
// scale+min = 4.25 / 4.5 / 5.0 bits per weight at group 128 / 64 / 32.
#pragma once

#include <cmath>

#include "qtype.h"

namespace ev {

constexpr int kQ4Unit = 64;
constexpr int kQ4UnitBytes = kQ4Unit / 2;
static_assert(kQ4UnitBytes * 8 == kQ4Unit * 4, "q4 unit must be exactly 4 bits per code");
static_assert(kQ4Unit % kGranule == 0, "a q4 unit is whole 32-code granules");

// q: [K] codes in [0, 15] -> qs: [K/2] bytes.
inline void pack_codes_q4(const uint8_t* q, int64_t k, uint8_t* qs) {
  for (int64_t u0 = 0; u0 < k; u0 += kQ4Unit) {
    const int64_t U = (k - u0) >= kQ4Unit ? kQ4Unit : (k - u0);
    for (int64_t j = 0; j < U / 2; ++j)
      qs[u0 / 2 + j] = (uint8_t)((q[u0 + j] & 0xF) | ((q[u0 + j + U / 2] & 0xF) << 4));
  }
}

// qs: [K/2] bytes -> q: [K] codes.
inline void unpack_codes_q4(const uint8_t* qs, int64_t k, uint8_t* q) {
  for (int64_t u0 = 0; u0 < k; u0 += kQ4Unit) {
    const int64_t U = (k - u0) >= kQ4Unit ? kQ4Unit : (k - u0);
    for (int64_t j = 0; j < U / 2; ++j) {
      q[u0 + j] = qs[u0 / 2 + j] & 0xF;
      q[u0 + j + U / 2] = qs[u0 / 2 + j] >> 4;
    }
  }
}

}  // namespace ev
