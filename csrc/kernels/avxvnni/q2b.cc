// q2b.cc — the 2-bit bilevel-scale kernels of avx2/q2b_impl.h, built with the
// AVX-VNNI integer dot (EV_VNNI: vpdpbusd instead of maddubs + madd; common_avx2.h).
#define EV_VNNI 1
#include "../avx2/q2b_impl.h"
#include "avxvnni.h"

namespace ev {

void gemv_q2b_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1) { avxvnni::q2bk::gemv(a, n0, n1); }
void gemm_q2b_avxvnni(const LinearArgs& a, int64_t n0, int64_t n1) { avxvnni::q2bk::gemm(a, n0, n1); }

}  // namespace ev
