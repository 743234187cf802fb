// q2b.cc — the 2-bit bilevel-scale kernels (code policy and loops: avx2/q2b_impl.h), AVX2 build.
#include "q2b_impl.h"

namespace ev {

void gemv_q2b_avx2(const LinearArgs& a, int64_t n0, int64_t n1) { avx2::q2bk::gemv(a, n0, n1); }
void gemm_q2b_avx2(const LinearArgs& a, int64_t n0, int64_t n1) { avx2::q2bk::gemm(a, n0, n1); }

}  // namespace ev
