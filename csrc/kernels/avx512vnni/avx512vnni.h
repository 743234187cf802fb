// avx512vnni.h — GEMM (M >= 2) with the AVX-512 VNNI integer dot (EVEX vpdpbusd on zmm; Intel
// Cascade Lake / Ice Lake / Sapphire Rapids+, AMD Zen 4+). Compiled only into x86-64 builds
// whose compiler accepts -mavx512vnni, each .cc in this directory with -mavx2 -mfma -mf16c
// -mavx512f -mavx512bw -mavx512vl -mavx512vnni; called only when cpu_features() has AVX2/FMA/
// F16C and AVX-512 F/BW/VL/VNNI. Activations: quantize_acts_avx2 (same QActs as avx2).
// GEMV and q2b come from the avxvnni / avx2 builds (dispatch.cc). Contracts: kernels.h.
#pragma once

#include "../kernels.h"

namespace ev {

void gemm_q2_avx512vnni(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q3_avx512vnni(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q4_avx512vnni(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q8_avx512vnni(const LinearArgs& a, int64_t n0, int64_t n1);

}  // namespace ev
