// q8.h — 8-bit symmetric weights, for layers kept at higher precision (numpy twin:
// edgevlm/qtypes/q8.py).
//
// Codes are int8 in [-127, 127] stored one per byte in natural order; -128 is never
// produced so that |q| * |x| products fit the SIMD 16-bit pair sums (127*127*2 < 2^15).
// Per group: one fp16 scale, no min:  w = scale * q.
//
//   byte j [ q[j] as int8 ]     j = 0 .. K-1
//
// Cost: 8 bits/weight + 16 bits/group = 8.125 / 8.25 / 8.5 bits per weight.
#pragma once

#include "qtype.h"

namespace ev {

constexpr int kQ8Unit = 32;
static_assert(sizeof(int8_t) == 1, "q8 stores one byte per code");

inline void pack_codes_q8(const int8_t* q, int64_t k, uint8_t* qs) { std::memcpy(qs, q, (size_t)k); }
inline void unpack_codes_q8(const uint8_t* qs, int64_t k, int8_t* q) { std::memcpy(q, qs, (size_t)k); }

}  // namespace ev
