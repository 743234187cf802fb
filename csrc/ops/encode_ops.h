// encode_ops.h — the float32 glue of a transformer encoder layer (CLIP / SigLIP towers).
//
// Why in C++: around its six GEMMs a ViT-B/16 layer at 197 tokens spends, in numpy, ~3 ms on
// the MLP activation (a sigmoid/tanh of 600k floats), ~3 ms on softmax attention and ~1 ms on
// two LayerNorms (session 3 cProfile: 40 ms + 33 ms of a 333 ms encode), all single-threaded.
// Here each is one call, vectorised (encode_impl.h, built for the baseline target, AVX2+FMA
// and AVX-512) and split over the thread pool. The numpy functions in
// edgevlm/runtime/layers.py are the twins (tests/test_encode_ops.py).
#pragma once

#include <cstdint>

namespace ev {

// x[n] <- act(x[n]) in place.
//   Quick: x * sigmoid(1.702 x)                     (quick_gelu, OpenAI CLIP)
//   Tanh:  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (gelu_pytorch_tanh, SigLIP)
//   Erf:   0.5 x (1 + erf(x / sqrt 2))              (exact gelu)
enum class Gelu : int { Quick = 0, Tanh = 1, Erf = 2 };
void gelu_inplace(float* x, int64_t n, Gelu kind, int threads);

// y[r, :] = (x[r, :] - mean) / sqrt(var + eps) * w + b for rows r < rows, row width d (biased
// variance, two passes in fp32 with 8/16-lane partial sums). w, b: [d] or nullptr. y may be x.
void layer_norm_rows(const float* x, int64_t rows, int64_t d, const float* w, const float* b, float eps, float* y,
                     int threads);

// Multi-head softmax attention of an encoder (projections are the caller's):
//   out[b, i, h*hd : (h+1)*hd] = softmax_j(scale * q_bih . k_bjh  | mask) v_bjh
// q [B, Tq, *] (row stride ldq floats), k / v [B, Tk, *] (ldk / ldv), out [B, Tq, *] (ldo);
// head h reads columns [h*hd, (h+1)*hd). Masks: key_mask [B, Tk] (nonzero = attend) and, if
// causal, key j <= position of query i (q_pos [B, Tq], or Tk - Tq + i when null). A masked
// score is float's lowest value (as edgevlm.runtime.layers.attention), so a fully masked row
// averages all keys instead of giving NaN. Threads split the B * heads (batch, head) pairs.
struct AttnEncodeArgs {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  int64_t b, tq, tk, heads, hd;
  int64_t ldq, ldk, ldv, ldo;
  float scale;
  bool causal;
  const int64_t* q_pos;
  const uint8_t* key_mask;
};
void attend_encode(const AttnEncodeArgs& a, int threads);

// The vectorised builds, chosen by the functions above: AVX2+FMA (csrc/ops/encode_ops_avx2.cc)
// when the kernels' default ISA runs AVX2, AVX-512 (csrc/kernels/avx512vnni/encode_avx512.cc)
// when it is avx512vnni.
void gelu_inplace_avx2(float* x, int64_t n, Gelu kind, int threads);
void layer_norm_rows_avx2(const float* x, int64_t rows, int64_t d, const float* w, const float* b, float eps,
                          float* y, int threads);
void attend_encode_avx2(const AttnEncodeArgs& a, int threads);
void gelu_inplace_avx512(float* x, int64_t n, Gelu kind, int threads);
void layer_norm_rows_avx512(const float* x, int64_t rows, int64_t d, const float* w, const float* b, float eps,
                            float* y, int threads);
void attend_encode_avx512(const AttnEncodeArgs& a, int threads);

}  // namespace ev
