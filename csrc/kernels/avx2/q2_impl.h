// q2_impl.h — 2-bit asymmetric kernels (layout: qtypes/q2.h). A full 128-code unit is 32
// bytes and (v >> 2i) & 3 is codes 32i..32i+31 in natural order: one load, three shifts,
// four ands per superblock. Loops: common_avx2.h. Shared by the
// avx2 and avxvnni builds (namespace EV_X86_NS; see common_avx2.h).
#pragma once

#include "../../qtypes/q2.h"

#include "common_avx2.h"

namespace ev {
namespace EV_X86_NS {

struct Q2Codes {
  static constexpr int64_t kSbBytes = 32;
  static constexpr bool kSigned = false;
  static EV_INLINE void load128(const uint8_t* row, int64_t k0, __m256i c[4]) {
    const __m256i m2 = _mm256_set1_epi8(0x03);
    const __m256i v = ld(row + k0 / 4);
    c[0] = _mm256_and_si256(v, m2);
    c[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m2);
    c[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m2);
    c[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), m2);
  }
  // The 32/64/96-code tail unit (S = n/4 bytes per plane) is laid out like a row of n codes.
  static void unpack_tail(const uint8_t* row, int64_t k0, int64_t n, uint8_t* buf) {
    unpack_codes_q2(row + k0 / 4, n, buf);
  }
  static EV_INLINE const uint8_t* prepare(const uint8_t* row, int64_t k0, int64_t k1, uint8_t* wb) {
    return unpack_range<Q2Codes>(row, k0, k1, wb);
  }
};

}  // namespace EV_X86_NS
}  // namespace ev
