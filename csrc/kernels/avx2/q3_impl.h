// q3_impl.h — 3-bit asymmetric kernels (layout: qtypes/q3.h). A full 128-code unit is 32
// bytes of low 2-bit planes (exactly q2) + 16 bytes of high bits. Codes 32c..32c+31 take
// their high bit from bit 2c (bytes 0..15) / bit 2c+1 (the same bytes, codes +16) of the
// high plane: broadcast to both 128-bit lanes and shift lane 1 right by one (vpsrlvq),
// so bit 2c serves chunk c in both lanes. The codes are assembled two per byte (nibble
// pairs) before the final split: 15 ALU ops per 128 codes instead of 19 for shift + mask
// + OR per chunk, which matters because q3 GEMV is ALU-bound on one core. Loops:
// common_avx2.h.
#pragma once

#include "../../qtypes/q3.h"

#include "common_avx2.h"

namespace ev {
namespace EV_X86_NS {

struct Q3Codes {
  static constexpr int64_t kSbBytes = 48;
  static constexpr bool kSigned = false;
  static EV_INLINE void load128(const uint8_t* row, int64_t k0, __m256i c[4]) {
    const __m256i m33 = _mm256_set1_epi8(0x33), m44 = _mm256_set1_epi8(0x44), m7 = _mm256_set1_epi8(0x07);
    const uint8_t* u = row + k0 * 3 / 8;
    const __m256i lo = ld(u);
    const __m256i hb = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + 32)));
    // h: bit 2c of every byte = high bit of chunk c's code (lane 1 shifted right by one).
    const __m256i h = _mm256_srlv_epi64(hb, _mm256_setr_epi64x(0, 0, 1, 1));
    // Two bytes of nibble pairs: e = code0 | code2 << 4, o = code1 | code3 << 4. The low
    // 2-bit fields sit at bits 0-1 / 4-5 (e: lo & 0x33, o: lo >> 2 & 0x33), leaving bits
    // 2 / 6 free for the high bits (e: h << 2 & 0x44, o: h & 0x44). 64-bit shifts move
    // bits across bytes only into positions the masks drop.
    const __m256i e = _mm256_or_si256(_mm256_and_si256(lo, m33), _mm256_and_si256(_mm256_slli_epi64(h, 2), m44));
    const __m256i o = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo, 2), m33), _mm256_and_si256(h, m44));
    c[0] = _mm256_and_si256(e, m7);
    c[1] = _mm256_and_si256(o, m7);
    c[2] = _mm256_and_si256(_mm256_srli_epi16(e, 4), m7);
    c[3] = _mm256_and_si256(_mm256_srli_epi16(o, 4), m7);
  }
  // The 32/64/96-code tail unit (low planes S = n/4 bytes, high plane n/8) is laid out
  // like a row of n codes.
  static void unpack_tail(const uint8_t* row, int64_t k0, int64_t n, uint8_t* buf) {
    unpack_codes_q3(row + k0 * 3 / 8, n, buf);
  }
  static EV_INLINE const uint8_t* prepare(const uint8_t* row, int64_t k0, int64_t k1, uint8_t* wb) {
    return unpack_range<Q3Codes>(row, k0, k1, wb);
  }
};

}  // namespace EV_X86_NS
}  // namespace ev
