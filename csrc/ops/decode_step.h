// decode_step.h — one decode token through every layer of a Llama/Qwen2-family decoder in one
// call: for each layer RMSNorm, the seven packed GEMVs (ev::linear), attend_decode, SwiGLU and
// the residual adds; then the final RMSNorm. The LM head stays with the caller.
//
// Why: the per-layer glue ops (decode_ops.h) already run in C++, but driving them from Python
// costs ~11 binding calls per layer (argument checks, array allocations, the interpreter),
// tens of microseconds per layer — about a millisecond per token of a 28-layer 2B model and a
// large share of a small model's step. A plan built once per KV cache holds raw views of every
// weight and cache; each token is then a single call (llama.cpp's graph, without a graph).
#pragma once

#include <cstdint>
#include <vector>

#include "../kernels/kernels.h"

namespace ev {

struct StepLinear {
  QMatrix w;          // packed W [n, k]
  const float* bias;  // [n] or nullptr
};

struct StepLayer {
  StepLinear q, k, v, o, gate, up, down;
  const float* n1;  // [d] input RMSNorm
  const float* n2;  // [d] post-attention RMSNorm
  const float* qn;  // [hd] Qwen3 per-head q norm, or nullptr
  const float* kn;  // [hd] Qwen3 per-head k norm, or nullptr
  void* kc;         // [hkv, ctx, hd] key cache, float32 or half bits (StepModel::kv_f16); slot pos is written
  void* vc;         // [hkv, ctx, hd] value cache, same dtype
};

struct StepModel {
  std::vector<StepLayer> layers;
  const float* norm;  // [d] final RMSNorm
  int64_t d, hq, hkv, hd, ctx, inter;
  float eps, scale;  // RMSNorm eps; attention scale (hd^-0.5)
  Isa isa;           // kernel ISA of the GEMVs
  bool kv_f16 = false;  // every layer's caches hold IEEE halves (uint16_t bits)
};

// x [d]: the token's embedding in, the residual stream after the last layer out.
// h [d]: final_norm(x), the LM head's input. cos/sin [rot]: this position's RoPE factors.
// Shapes were validated by the caller (bindings/bind_ops.cc).
void decode_step(const StepModel& m, float* x, int64_t pos, const float* cos, const float* sin, int64_t rot,
                 int threads, float* h);

}  // namespace ev
