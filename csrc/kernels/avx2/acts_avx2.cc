// acts_avx2.cc — int8 activation quantization for the AVX2 kernels (contract: kernels.h
// QActs). Same math as quantize_acts_ref, in the same order, so the results are
// bit-identical: d = amax / 127, inv = 1 / d (scalar), q = round-half-even(x * inv)
// (cvtps_epi32 under the default MXCSR mode = nearbyint), clamped to [-127, 127],
// s = d * sum(q) with an exact integer sum. Groups 32/64/128, and 16 (q2b's).
#include "common_avx2.h"

namespace ev {

void quantize_acts_avx2(const float* x, int64_t m0, int64_t m1, int64_t k, int group, int8_t* q,
                        float* d, float* s) {
  const int64_t G = k / group;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  // packs work per 128-bit lane: after two packs the 32 bytes are ordered by dword
  // blocks 0,2,4,6,1,3,5,7 of the input; this permutation restores natural order.
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t r = m0; r < m1; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + r * k + g * group;
      int8_t* qg = q + r * k + g * group;
      __m256 mx = _mm256_setzero_ps();
      for (int i = 0; i < group; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xg + i), absmask));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float dg = _mm_cvtss_f32(m4) / 127.f;
      const float inv = dg > 0.f ? 1.f / dg : 0.f;
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i sum = _mm256_setzero_si256();
      if (group == 16) {  // q2b: 16 values, packed within 128-bit halves (already in order)
        __m256i v[2];
        for (int j = 0; j < 2; ++j) {
          const __m256i t = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + 8 * j), vinv));
          v[j] = _mm256_min_epi32(_mm256_max_epi32(t, lo), hi);
          sum = _mm256_add_epi32(sum, v[j]);
        }
        const __m128i h0 = _mm_packs_epi32(_mm256_castsi256_si128(v[0]), _mm256_extracti128_si256(v[0], 1));
        const __m128i h1 = _mm_packs_epi32(_mm256_castsi256_si128(v[1]), _mm256_extracti128_si256(v[1], 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qg), _mm_packs_epi16(h0, h1));
      }
      for (int i = 0; group % 32 == 0 && i < group; i += 32) {
        __m256i v[4];
        for (int j = 0; j < 4; ++j) {
          const __m256i t = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i + 8 * j), vinv));
          v[j] = _mm256_min_epi32(_mm256_max_epi32(t, lo), hi);
          sum = _mm256_add_epi32(sum, v[j]);
        }
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qg + i), _mm256_permutevar8x32_epi32(p, perm));
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      d[r * G + g] = dg;
      s[r * G + g] = dg * (float)_mm_cvtsi128_si32(s4);
    }
  }
}

}  // namespace ev
