// decode_avx2.cc — decode_impl.h compiled with -mavx2 -mfma (this directory's flags): the
// same loops, 8-wide with fused multiply-adds. Dispatched from csrc/ops/decode_ops.cc.
#define EV_DECODE_NS avx2_glue
#include "../../ops/decode_impl.h"

namespace ev {

void rms_norm_row_avx2(const float* x, const float* w, int64_t d, float eps, float* y) {
  avx2_glue::rms_norm_row(x, w, d, eps, y);
}
void silu_mul_avx2(const float* g, const float* u, int64_t n, float* out) { avx2_glue::silu_mul(g, u, n, out); }
void attend_decode_avx2(const AttnDecodeArgs& a, int threads) { avx2_glue::attend_decode(a, threads); }

}  // namespace ev
