// q4_impl.h — 4-bit asymmetric kernels (layout: qtypes/q4.h). A 64-code unit is 32 bytes:
// (v & 0xF) = codes 0..31, (v >> 4) & 0xF = codes 32..63, natural order, so a 128-code
// superblock is two loads, two shifts and four ands. Loops: common_avx2.h. Shared by the
// avx2 and avxvnni builds (namespace EV_X86_NS; see common_avx2.h).
#pragma once

#include "../../qtypes/q4.h"

#include "common_avx2.h"

namespace ev {
namespace EV_X86_NS {

struct Q4Codes {
  static constexpr int64_t kSbBytes = 64;
  static constexpr bool kSigned = false;
  // Codes [k0, k0+128) of a row, k0 % 128 == 0: two full units at byte k0/2.
  static EV_INLINE void load128(const uint8_t* row, int64_t k0, __m256i c[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i v0 = ld(row + k0 / 2), v1 = ld(row + k0 / 2 + 32);
    c[0] = _mm256_and_si256(v0, m4);
    c[1] = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
    c[2] = _mm256_and_si256(v1, m4);
    c[3] = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
  }
  // n = 32/64/96 codes from k0 (a unit boundary): the units from k0 are laid out exactly
  // like a row of n codes (a 32-code tail unit is low = q[j], high = q[j+16]).
  static void unpack_tail(const uint8_t* row, int64_t k0, int64_t n, uint8_t* buf) {
    unpack_codes_q4(row + k0 / 2, n, buf);
  }
  static EV_INLINE const uint8_t* prepare(const uint8_t* row, int64_t k0, int64_t k1, uint8_t* wb) {
    return unpack_range<Q4Codes>(row, k0, k1, wb);
  }
};

}  // namespace EV_X86_NS
}  // namespace ev
