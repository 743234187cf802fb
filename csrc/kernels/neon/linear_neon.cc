// linear_neon.cc — armv8-a baseline (no dotprod) kernels: the shared body in neon_impl.h
// on a widening-multiply int8 dot. Also the NEON activation quantizer (used by neondot
// too) and the out-of-line tail unpack that both ISAs call.
#include <cstring>

#include "../../qtypes/q2.h"
#include "../../qtypes/q3.h"
#include "../../qtypes/q4.h"
#include "../../qtypes/q8.h"
#include "neon.h"
#include "neon_impl.h"

namespace ev {

namespace neon_detail {
void unpack_tail(QType t, const uint8_t* qs, int64_t ncodes, int8_t* out) {
  uint8_t* o = reinterpret_cast<uint8_t*>(out);
  switch (t) {
    case QType::Q2: unpack_codes_q2(qs, ncodes, o); break;
    case QType::Q3: unpack_codes_q3(qs, ncodes, o); break;
    case QType::Q4: unpack_codes_q4(qs, ncodes, o); break;
    case QType::Q8: std::memcpy(out, qs, (size_t)ncodes); break;
    case QType::Q2B: unpack_codes_q2(qs, ncodes, o); break;  // q2b codes are the q2 stream
  }
}
}  // namespace neon_detail

namespace {

// acc += a . b without SDOT: SMULL (low 8 lanes) + SMLAL2 (high 8 lanes) pairs product k
// with product k+8 in one int16 lane, then SADALP widens pairs into int32. The int16 pair
// sum cannot overflow: |code| <= 127 and |x| <= 127 (q8 never stores -128, activations
// are clamped to +-127), so |p_k + p_k+8| <= 2 * 127 * 127 = 32258 < 32768.
struct DotWiden {
  static EV_INLINE int32x4_t dot(int32x4_t acc, int8x16_t a, int8x16_t b) {
    const int16x8_t p = vmlal_high_s8(vmull_s8(vget_low_s8(a), vget_low_s8(b)), a, b);
    return vpadalq_s16(acc, p);
  }
};

}  // namespace

// Same math as quantize_acts_ref, lane for lane: amax by maxNum (NaN-ignoring like fmax),
// d = amax / 127, q = round-half-even(x * (1/d)) clamped to +-127, s = d * sum(q).
void quantize_acts_neon(const float* x, int64_t m0, int64_t m1, int64_t k, int group, int8_t* q,
                        float* d, float* s) {
  const int64_t G = k / group;
  const int32x4_t lo = vdupq_n_s32(-127), hi = vdupq_n_s32(127);
  for (int64_t r = m0; r < m1; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + r * k + g * group;
      int8_t* qg = q + r * k + g * group;
      float32x4_t mx0 = vdupq_n_f32(0.f), mx1 = mx0;
      for (int i = 0; i < group; i += 8) {
        mx0 = vmaxnmq_f32(mx0, vabsq_f32(vld1q_f32(xg + i)));
        mx1 = vmaxnmq_f32(mx1, vabsq_f32(vld1q_f32(xg + i + 4)));
      }
      const float amax = vmaxnmvq_f32(vmaxnmq_f32(mx0, mx1));
      const float dg = amax / 127.f;
      const float inv = dg > 0.f ? 1.f / dg : 0.f;
      int32x4_t sum = vdupq_n_s32(0);
      for (int i = 0; i < group; i += 16) {
        int32x4_t v[4];
        for (int j = 0; j < 4; ++j) {
          v[j] = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xg + i + 4 * j), inv));
          v[j] = vminq_s32(vmaxq_s32(v[j], lo), hi);
          sum = vaddq_s32(sum, v[j]);
        }
        const int16x8_t h0 = vcombine_s16(vmovn_s32(v[0]), vmovn_s32(v[1]));
        const int16x8_t h1 = vcombine_s16(vmovn_s32(v[2]), vmovn_s32(v[3]));
        vst1q_s8(qg + i, vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
      }
      d[r * G + g] = dg;
      s[r * G + g] = dg * (float)vaddvq_s32(sum);
    }
  }
}

}  // namespace ev

EV_NEON_DEFINE_KERNELS(neon, DotWiden)
