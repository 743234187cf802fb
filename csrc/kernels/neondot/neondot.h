// neondot.h — AArch64 kernels using the dot-product extension (SDOT, vdotq_s32;
// armv8.2-a+dotprod: Cortex-A55/A76/A78, Pi 5's A76, Jetson Orin's A78AE). Each .cc here
// is compiled with -march=armv8.2-a+dotprod and only called when HWCAP_ASIMDDP is set.
// Activations come from quantize_acts_neon (neon/neon.h).
#pragma once

#include "../kernels.h"

namespace ev {

void gemv_q2_neondot(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q2_neondot(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q3_neondot(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q3_neondot(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q4_neondot(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q4_neondot(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q8_neondot(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q8_neondot(const LinearArgs& a, int64_t n0, int64_t n1);
void gemv_q2b_neondot(const LinearArgs& a, int64_t n0, int64_t n1);
void gemm_q2b_neondot(const LinearArgs& a, int64_t n0, int64_t n1);

}  // namespace ev
