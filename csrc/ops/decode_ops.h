// decode_ops.h — the float32 glue of one decoder layer for one new token (decode).
//
// Why in C++: between its seven GEMVs a Llama/Qwen2 layer runs RMSNorm, RoPE, the KV-cache
// write, grouped-query attention and SiLU-gating; in numpy that is ~60 small array calls per
// layer (~165 us measured on a 28-layer 2B model, ~4.6 ms per token), a large slice of a
// 20 ms 2-bit token and more on a Raspberry Pi's slower cores. Here it is three calls.
// Portable C++ (compiled for the baseline target like the reference kernels; the compiler
// vectorises the inner loops); the numpy code in edgevlm/runtime/decoder.py is its twin.
#pragma once

#include <cstdint>

namespace ev {

// y[D] = x[D] / sqrt(sum(x^2) / D + eps) * w[D]  (w == nullptr: no weight). The sum of
// squares accumulates in double, so the result is at least as accurate as numpy's float32
// pairwise mean. x and y may alias.
void rms_norm_row(const float* x, const float* w, int64_t d, float eps, float* y);

// out[n] = silu(g[n]) * u[n], silu(v) = v / (1 + exp(-v)) evaluated as v * 0.5 * (1 + tanh(v / 2))
// like the numpy twin (no overflow for large |v|).
void silu_mul(const float* g, const float* u, int64_t n, float* out);

// One query token against the KV cache, grouped-query attention.
//   q      [hq * hd]   the token's query heads (rotated in a scratch copy, q is not modified)
//   k, v   [hkv * hd]  the token's key / value heads
//   kc, vc [hkv, ctx, hd] float32 caches; slot `pos` of every KV head receives the rotated key
//          and the value, then every query head attends to slots [0, pos]
//   cos, sin [rot]     RoPE factors of this token's position (frequencies repeated twice, as
//          transformers builds them); rotate_half on the first `rot` dims of each head
//   qn, kn [hd] or nullptr: Qwen3's per-head RMSNorm on q / k before RoPE (eps `eps`)
//   out    [hq * hd]   softmax(q k^T * scale) v per head; query head h reads KV head h / (hq / hkv)
struct AttnDecodeArgs {
  const float* q;
  const float* k;
  const float* v;
  float* kc;
  float* vc;
  int64_t hq, hkv, hd, ctx, pos, rot;
  const float* cos;
  const float* sin;
  const float* qn;
  const float* kn;
  float eps;
  float scale;
  float* out;
};
void attend_decode(const AttnDecodeArgs& a, int threads);

}  // namespace ev
