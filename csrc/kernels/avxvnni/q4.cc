// q4.cc — the 4-bit asymmetric kernels of avx2/q4_impl.h, built with the
// AVX-VNNI integer dot (EV_VNNI: vpdpbusd instead of maddubs + madd; common_avx2.h).
#define EV_VNNI 1
#include "../avx2/q4_impl.h"
#include "avxvnni.h"

namespace ev {

void gemv_q4_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1) { avxvnni::gemv<avxvnni::Q4Codes>(a, n0, n1); }
void gemm_q4_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1) { avxvnni::gemm<avxvnni::Q4Codes>(a, n0, n1); }

}  // namespace ev
