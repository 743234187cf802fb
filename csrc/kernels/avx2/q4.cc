// q4.cc — the 4-bit asymmetric kernels (code policy and loops: avx2/q4_impl.h), AVX2 build.
#include "q4_impl.h"

namespace ev {

void gemv_q4_avx2(const LinearArgs& a, int64_t n0, int64_t n1) { avx2::gemv<avx2::Q4Codes>(a, n0, n1); }
void gemm_q4_avx2(const LinearArgs& a, int64_t n0, int64_t n1) { avx2::gemm<avx2::Q4Codes>(a, n0, n1); }

}  // namespace ev
