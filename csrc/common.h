// common.h — error handling, alignment and fp16 helpers shared by every csrc file.
//
// Kernels never abort: a violated precondition throws std::invalid_argument with an
// "[op] expected X, got Y" message, which pybind11 turns into a Python ValueError.
// Nothing here depends on Python or on an ISA.
#pragma once

#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__GNUC__) || defined(__clang__)
#define EV_RESTRICT __restrict__
#define EV_INLINE inline __attribute__((always_inline))
#else
#define EV_RESTRICT
#define EV_INLINE inline
#endif

namespace ev {

// 64 bytes: one cache line and the widest SIMD load we might ever use (AVX-512).
// Buffers we allocate start on a line so a row's first load never splits a line;
// the .evlm format aligns every tensor blob to the same value (edgevlm/format.py).
constexpr std::size_t kAlign = 64;

// Builds "[op] <message parts...>" and throws std::invalid_argument.
template <typename... Args>
[[noreturn]] void fail(const char* op, const Args&... parts) {
  std::ostringstream os;
  os << "[" << op << "] ";
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

#define EV_CHECK(cond, op, ...)              \
  do {                                       \
    if (!(cond)) ::ev::fail(op, __VA_ARGS__); \
  } while (0)

// ---- IEEE binary16 <-> binary32, portable (the reference must not need F16C) ----
// fp16 scales are stored as raw uint16_t so every ISA reads the same bits.

inline float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;  // +-0
    } else {        // subnormal: renormalise
      int e = -1;
      do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FFu) << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round-to-nearest-even, like numpy's astype(float16). Overflow -> inf.
inline uint16_t fp32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u);
  if (ax >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                        // below the smallest normal half: subnormal
    if (ax < 0x33000000u) return sign;           // < 2^-25 rounds to 0
    const uint32_t e = ax >> 23;
    const uint32_t man = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;              // 14 + (113 - e)
    uint32_t h = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return sign | (uint16_t)h;
  }
  uint32_t h = ((ax - 0x38000000u) >> 13);  // rebias exponent 127 -> 15
  const uint32_t rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | (uint16_t)h;
}

// Smallest / largest half >= / <= f (f finite, |f| <= 65504). Used by the RTN
// quantizer so the stored scale covers the group's range (see qtypes/qtype.h).
inline uint16_t fp16_ceil(float f) {
  uint16_t h = fp32_to_fp16(f);
  if (fp16_to_fp32(h) < f) h = (h & 0x8000u) ? (uint16_t)(h == 0x8000u ? 0x0001u : h - 1) : (uint16_t)(h + 1);
  return h;
}
inline uint16_t fp16_floor(float f) {
  uint16_t h = fp32_to_fp16(f);
  if (fp16_to_fp32(h) > f) h = (h & 0x8000u) ? (uint16_t)(h + 1) : (uint16_t)(h == 0 ? 0x8001u : h - 1);
  return h;
}

}  // namespace ev
