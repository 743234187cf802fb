// encode_avx512.cc — csrc/ops/encode_impl.h compiled with this directory's AVX-512 flags:
// 16-float vectors in one zmm register (32 of them: larger attention tiles). Dispatched from
// csrc/ops/encode_ops.cc when the default ISA is avx512vnni.
#define EV_ENCODE_NS encode_avx512
#define EV_ENCODE_LANES 16
#include "../../ops/encode_impl.h"

namespace ev {

void gelu_inplace_avx512(float* x, int64_t n, Gelu kind, int threads) {
  encode_avx512::gelu_inplace(x, n, kind, threads);
}
void layer_norm_rows_avx512(const float* x, int64_t rows, int64_t d, const float* w, const float* b, float eps,
                            float* y, int threads) {
  encode_avx512::layer_norm_rows(x, rows, d, w, b, eps, y, threads);
}
void attend_encode_avx512(const AttnEncodeArgs& a, int threads) { encode_avx512::attend_encode(a, threads); }

}  // namespace ev
