// avx2.h — AVX2+FMA+F16C kernels (x86-64). Compiled only into x86-64 builds, each .cc in
// this directory with -mavx2 -mfma -mf16c; called only when cpu_features() has them.
// Contracts: kernels.h (LinearFn / QuantizeActsFn). All use int8 activations (QActs).
#pragma once

#include "../kernels.h"

namespace ev {

void quantize_acts_avx2(const float* x, int64_t m0, int64_t m1, int64_t k, int group, int8_t* q,
                        float* d, float* s);

void gemv_q2_avx2(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q2_avx2(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q3_avx2(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q3_avx2(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q4_avx2(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q4_avx2(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q8_avx2(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q8_avx2(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q2b_avx2(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q2b_avx2(const LinearArgs& a, int64_t n0, int64_t n1);

}  // namespace ev
