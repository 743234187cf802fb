// linear_neondot.cc — armv8.2-a+dotprod kernels: the shared body in ../neon/neon_impl.h on
// SDOT (vdotq_s32: each int32 lane += the dot of 4 int8 pairs). Compiled with
// -march=armv8.2-a+dotprod (cmake/sources.cmake); dispatch calls it only when the CPU
// reports HWCAP_ASIMDDP. Activations come from quantize_acts_neon.
#include "neondot.h"

#include "../neon/neon_impl.h"

#if !defined(__ARM_FEATURE_DOTPROD)
#error "neondot kernels must be compiled with -march=armv8.2-a+dotprod"
#endif

namespace ev {
namespace {

struct DotSdot {
  static EV_INLINE int32x4_t dot(int32x4_t acc, int8x16_t a, int8x16_t b) {
    return vdotq_s32(acc, a, b);
  }
};

}  // namespace
}  // namespace ev

EV_NEON_DEFINE_KERNELS(neondot, DotSdot)
