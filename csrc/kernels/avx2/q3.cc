// q3.cc — 3-bit asymmetric kernels (layout: qtypes/q3.h). A full 128-code unit is 32
// bytes of low 2-bit planes (exactly q2) + 16 bytes of high bits. Codes 32c..32c+31 take
// their high bit from bit 2c (bytes 0..15) / bit 2c+1 (the same bytes, codes +16) of the
// high plane: broadcast it to both 128-bit lanes, shift each 64-bit element so that bit
// lands on bit 2 (per-lane counts, vpsllvq / vpsrlvq) and mask 0x04, then OR the low
// bits. Loops: common_avx2.h.
#include "../../qtypes/q3.h"

#include "common_avx2.h"

namespace ev {
namespace {

struct Q3Codes {
  static constexpr int64_t kSbBytes = 48;
  static constexpr bool kSigned = false;
  static EV_INLINE void load128(const uint8_t* row, int64_t k0, __m256i c[4]) {
    const __m256i m2 = _mm256_set1_epi8(0x03), m4 = _mm256_set1_epi8(0x04);
    const uint8_t* u = row + k0 * 3 / 8;
    const __m256i lo = avx2::ld(u);
    const __m256i hb = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + 32)));
    // chunk 0: bit 0 (lane 0) / bit 1 (lane 1) -> bit 2: left by 2 / 1.
    // chunk c >= 1: bit 2c / 2c+1 -> bit 2: right by 2c-2 / 2c-1.
    const __m256i h0 = _mm256_sllv_epi64(hb, _mm256_setr_epi64x(2, 2, 1, 1));
    const __m256i h1 = _mm256_srlv_epi64(hb, _mm256_setr_epi64x(0, 0, 1, 1));
    const __m256i h2 = _mm256_srlv_epi64(hb, _mm256_setr_epi64x(2, 2, 3, 3));
    const __m256i h3 = _mm256_srlv_epi64(hb, _mm256_setr_epi64x(4, 4, 5, 5));
    c[0] = _mm256_or_si256(_mm256_and_si256(lo, m2), _mm256_and_si256(h0, m4));
    c[1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo, 2), m2), _mm256_and_si256(h1, m4));
    c[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo, 4), m2), _mm256_and_si256(h2, m4));
    c[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo, 6), m2), _mm256_and_si256(h3, m4));
  }
  // The 32/64/96-code tail unit (low planes S = n/4 bytes, high plane n/8) is laid out
  // like a row of n codes.
  static void unpack_tail(const uint8_t* row, int64_t k0, int64_t n, uint8_t* buf) {
    unpack_codes_q3(row + k0 * 3 / 8, n, buf);
  }
  static EV_INLINE const uint8_t* prepare(const uint8_t* row, int64_t k0, int64_t k1, uint8_t* wb) {
    return avx2::unpack_range<Q3Codes>(row, k0, k1, wb);
  }
};

}  // namespace

void gemv_q3_avx2(const LinearArgs& a, int64_t n0, int64_t n1) { avx2::gemv<Q3Codes>(a, n0, n1); }
void gemm_q3_avx2(const LinearArgs& a, int64_t n0, int64_t n1) { avx2::gemm<Q3Codes>(a, n0, n1); }

}  // namespace ev
