// ref.h — the portable reference kernels (always compiled; the test oracle).
#pragma once

#include "../kernels.h"

namespace ev {

// Exact-activation reference: dequantizes each weight row to fp32 and accumulates the
// dot product in double, so it is the most accurate result the packed weights allow.
void linear_ref(const LinearArgs& a, int64_t n0, int64_t n1);

}  // namespace ev
