// linear.h — one call of Y = X . dequant(W)^T (+ bias) on a chosen ISA and thread count:
// quantizes activations when the ISA wants int8, chooses GEMV or GEMM, splits N over
// the thread pool. Callers (bindings, C++ tests) have validated shapes already.
#pragma once

#include "kernels.h"

namespace ev {

// x: [M, K] fp32, y: [M, N] fp32, bias: [N] or nullptr. threads <= 0: the pool size.
void linear(const float* x, int64_t m, const QMatrix& w, const float* bias, float* y, Isa isa,
            int threads);

}  // namespace ev
