// neon.h — baseline AArch64 Advanced SIMD kernels (armv8-a, no dotprod): widening
// multiplies (vmull_s8 / vpadalq_s16). Compiled only into aarch64 builds.
// Contracts: kernels.h. All use int8 activations (QActs) from quantize_acts_neon.
#pragma once

#include "../kernels.h"

namespace ev {

void quantize_acts_neon(const float* x, int64_t m0, int64_t m1, int64_t k, int group, int8_t* q,
                        float* d, float* s);

void gemv_q2_neon(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q2_neon(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q3_neon(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q3_neon(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q4_neon(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q4_neon(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q8_neon(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q8_neon(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q2b_neon(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q2b_neon(const LinearArgs& a, int64_t n0, int64_t n1);

}  // namespace ev
