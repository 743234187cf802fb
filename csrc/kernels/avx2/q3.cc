// q3.cc — the 3-bit asymmetric kernels (code policy and loops: avx2/q3_impl.h), AVX2 build.
#include "q3_impl.h"

namespace ev {

void gemv_q3_avx2(const LinearArgs& a, int64_t n0, int64_t n1) { avx2::gemv<avx2::Q3Codes>(a, n0, n1); }
void gemm_q3_avx2(const LinearArgs& a, int64_t n0, int64_t n1) { avx2::gemm<avx2::Q3Codes>(a, n0, n1); }

}  // namespace ev
