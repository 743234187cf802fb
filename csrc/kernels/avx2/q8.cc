// q8.cc — the 8-bit symmetric kernels (code policy and loops: avx2/q8_impl.h), AVX2 build.
#include "q8_impl.h"

namespace ev {

void gemv_q8_avx2(const LinearArgs& a, int64_t n0, int64_t n1) { avx2::gemv<avx2::Q8Codes>(a, n0, n1); }
void gemm_q8_avx2(const LinearArgs& a, int64_t n0, int64_t n1) { avx2::gemm<avx2::Q8Codes>(a, n0, n1); }

}  // namespace ev
