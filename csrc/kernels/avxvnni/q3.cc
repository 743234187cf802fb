// q3.cc — the 3-bit asymmetric kernels of avx2/q3_impl.h, built with the
// AVX-VNNI integer dot (EV_VNNI: vpdpbusd instead of maddubs + madd; common_avx2.h).
#define EV_VNNI 1
#include "../avx2/q3_impl.h"
#include "avxvnni.h"

namespace ev {

void gemv_q3_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1) { avxvnni::gemv<avxvnni::Q3Codes>(a, n0, n1); }
void gemm_q3_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1) { avxvnni::gemm<avxvnni::Q3Codes>(a, n0, n1); }

}  // namespace ev
