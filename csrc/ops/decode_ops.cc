// decode_ops.cc — the portable build of decode_impl.h and the dispatch of decode_ops.h:
// the AVX2+FMA build (csrc/kernels/avx2/decode_avx2.cc) runs when the kernels' default ISA is
// avx2 or avxvnni (so EDGEVLM_ISA=ref gives the portable glue too).
#define EV_DECODE_NS portable
#include "decode_impl.h"

#include "../kernels/kernels.h"

namespace ev {

namespace {
bool use_avx2() {
#if defined(EDGEVLM_HAVE_AVX2)
  return isa_has_avx2(default_isa());  // avx2 or avxvnni: both CPUs run the AVX2+FMA glue
#else
  return false;
#endif
}
}  // namespace

void rms_norm_row(const float* x, const float* w, int64_t d, float eps, float* y) {
#if defined(EDGEVLM_HAVE_AVX2)
  if (use_avx2()) return rms_norm_row_avx2(x, w, d, eps, y);
#endif
  portable::rms_norm_row(x, w, d, eps, y);
}

void silu_mul(const float* g, const float* u, int64_t n, float* out) {
#if defined(EDGEVLM_HAVE_AVX2)
  if (use_avx2()) return silu_mul_avx2(g, u, n, out);
#endif
  portable::silu_mul(g, u, n, out);
}

void attend_decode(const AttnDecodeArgs& a, int threads) {
#if defined(EDGEVLM_HAVE_AVX2)
  if (use_avx2()) return attend_decode_avx2(a, threads);
#endif
  portable::attend_decode(a, threads);
}

}  // namespace ev
