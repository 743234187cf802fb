// encode_ops_avx2.cc — encode_impl.h compiled with -mavx2 -mfma (cmake/sources.cmake, x86-64
// only): 8-float vectors in one ymm register, fused multiply-adds. Dispatched from encode_ops.cc.
#define EV_ENCODE_NS encode_avx2
#define EV_ENCODE_LANES 8
#include "encode_impl.h"

namespace ev {

void gelu_inplace_avx2(float* x, int64_t n, Gelu kind, int threads) { encode_avx2::gelu_inplace(x, n, kind, threads); }
void layer_norm_rows_avx2(const float* x, int64_t rows, int64_t d, const float* w, const float* b, float eps,
                          float* y, int threads) {
  encode_avx2::layer_norm_rows(x, rows, d, w, b, eps, y, threads);
}
void attend_encode_avx2(const AttnEncodeArgs& a, int threads) { encode_avx2::attend_encode(a, threads); }

}  // namespace ev
