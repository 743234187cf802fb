// q8.cc — the 8-bit symmetric kernels of avx2/q8_impl.h, built with the
// AVX-VNNI integer dot (EV_VNNI: vpdpbusd instead of maddubs + madd; common_avx2.h).
#define EV_VNNI 1
#include "../avx2/q8_impl.h"
#include "avxvnni.h"

namespace ev {

void gemv_q8_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1) { avxvnni::gemv<avxvnni::Q8Codes>(a, n0, n1); }
void gemm_q8_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1) { avxvnni::gemm<avxvnni::Q8Codes>(a, n0, n1); }

}  // namespace ev
