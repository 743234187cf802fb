// avxvnni.h — AVX2 kernels with the VEX AVX-VNNI integer dot (x86-64: Intel Alder Lake+ /
// Sapphire Rapids+, AMD Zen 5). Compiled only into x86-64 builds whose compiler accepts
// -mavxvnni, each .cc in this directory with -mavx2 -mfma -mf16c -mavxvnni; called only
// when cpu_features() has AVX2/FMA/F16C and AVX-VNNI. The loops and code policies are the
// AVX2 ones (avx2/common_avx2.h, avx2/q*_impl.h) built with EV_VNNI; activations are
// quantized by quantize_acts_avx2 (same QActs). Contracts: kernels.h.
#pragma once

#include "../kernels.h"

namespace ev {

void gemv_q2_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q2_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q3_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q3_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q4_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q4_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q8_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q8_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q2b_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q2b_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1);

}  // namespace ev
