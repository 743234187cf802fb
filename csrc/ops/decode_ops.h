// decode_ops.h — the float32 glue of one decoder layer for one new token (decode).
//
// Why in C++: between its seven GEMVs a Llama/Qwen2 layer runs RMSNorm, RoPE, the KV-cache
// write, grouped-query attention and SiLU-gating; in numpy that is ~60 small array calls per
// layer (~165 us measured on a 28-layer 2B model, ~4.6 ms per token), a large slice of a
// 20 ms 2-bit token and more on a Raspberry Pi's slower cores. Here it is three calls.
// Plain C++ loops (decode_impl.h) built for the baseline target and, on x86-64, for AVX2+FMA;
// the numpy code in edgevlm/runtime/decoder.py is their twin.
#pragma once

#include <cstdint>

namespace ev {

// y[D] = x[D] / sqrt(sum(x^2) / D + eps) * w[D]  (w == nullptr: no weight). The sum of
// squares accumulates in double, so the result is at least as accurate as numpy's float32
// pairwise mean. x and y may alias.
void rms_norm_row(const float* x, const float* w, int64_t d, float eps, float* y);

// out[n] = silu(g[n]) * u[n] = g u / (1 + e^-g), e^x by a polynomial (relative error < 2e-7).
void silu_mul(const float* g, const float* u, int64_t n, float* out);

// One query token against the KV cache, grouped-query attention.
//   q      [hq * hd]   the token's query heads (rotated in a scratch copy, q is not modified)
//   k, v   [hkv * hd]  the token's key / value heads
//   kc, vc [hkv, ctx, hd] caches, float32 or (kv_f16) IEEE half bits as uint16_t; slot `pos` of
//          every KV head receives the rotated key and the value (rounded to nearest even when
//          half), then every query head attends to slots [0, pos] (computing in float32)
//   cos, sin [rot]     RoPE factors of this token's position (frequencies repeated twice, as
//          transformers builds them); rotate_half on the first `rot` dims of each head
//   qn, kn [hd] or nullptr: Qwen3's per-head RMSNorm on q / k before RoPE (eps `eps`)
//   out    [hq * hd]   softmax(q k^T * scale) v per head; query head h reads KV head h / (hq / hkv)
struct AttnDecodeArgs {
  const float* q;
  const float* k;
  const float* v;
  void* kc;
  void* vc;
  int64_t hq, hkv, hd, ctx, pos, rot;
  const float* cos;
  const float* sin;
  const float* qn;
  const float* kn;
  float eps;
  float scale;
  float* out;
  bool kv_f16;  // kc / vc hold halves: half the bytes per position to store and to read each token
};
void attend_decode(const AttnDecodeArgs& a, int threads);

// The AVX2+FMA builds (csrc/kernels/avx2/decode_avx2.cc), chosen by the functions above.
void rms_norm_row_avx2(const float* x, const float* w, int64_t d, float eps, float* y);
void silu_mul_avx2(const float* g, const float* u, int64_t n, float* out);
void attend_decode_avx2(const AttnDecodeArgs& a, int threads);

}  // namespace ev
