// qtta_ops.h — one streaming step of LQA's Q-TTA (TDA's cache adapter with INT8 keys) on
// preallocated caches.
//
// Why in C++: on the demo CLIP (C = 10 classes, D = 128) the step is ~6k int8 MACs and a few
// dozen exps, but its numpy form (edgevlm/adapt/qtta.py, QTTA._step: the twin and the
// definition) makes ~40 numpy calls, ~75 us per image against a ~1 ms image encode. Here it
// is one call of a few microseconds. tests/test_adapt.py checks that both give the same
// predictions and cache contents on streams, and logits within float64 rounding.
//
// Layout (row-major, all owned by the caller, updated in place):
//   W           [C, D]       float32   L2-normalised class embeddings
//   keys        [C, cap, D]  int8      symmetric per-key int8 codes
//   scale       [C, cap]     uint16    IEEE binary16 bits of each key's scale
//   ent         [C, cap]     float32   entropy (nats) of each entry; a class list is sorted ascending
//   count       [C]          int32     filled slots per class (slots [0, count) are valid)
//   masks       [C, cap, MB] uint8     negative cache only: np.packbits order (class c is bit
//                                      7 - c % 8 of byte c / 8), MB = ceil(C / 8)
#pragma once

#include <cstdint>

namespace ev {

// One cache (positive or negative). masks == nullptr for the positive cache.
struct QttaCache {
  int8_t* keys;
  uint16_t* scale;
  float* ent;
  int32_t* count;
  uint8_t* masks;
  int64_t cap;
};

// Hyperparameters as in edgevlm.adapt.QTTAConfig (float64, as the numpy twin computes).
struct QttaParams {
  int64_t classes, dim;
  double logit_scale, alpha_p, beta_p, alpha_n, beta_n;
  double ent_lo, ent_hi;    // open interval of H / log2(C) admitting a negative entry
  double mask_lo, mask_hi;  // open interval of p_c that sets class c in a negative entry's mask
};

// What a step does: zero-shot logits only; adapted logits from the caches as they are; or
// insert the feature first (TDA's order), then the adapted logits.
enum class QttaMode : int { ZeroShot = 0, Read = 1, Adapt = 2 };

// Scratch of one step, sized by the caller: q [D] int8, z0 / p [C] float64, mask [MB] uint8.
struct QttaScratch {
  int8_t* q;
  double* z0;
  double* p;
  uint8_t* mask;
};

// Symmetric per-vector int8 code of x [D] (float64), as edgevlm.adapt.quantize_int8: the scale
// is max|x| / 127 rounded *up* to binary16 (returned as its bits), q = clip(rint(x / s), ±127);
// an all-zero x gets scale 1.0 and q = 0.
uint16_t qtta_quantize_int8(const double* x, int64_t d, int8_t* q);

// One step for the unit feature f [D] (float64): out [C] float32 logits (see QttaMode).
// z = z0 + alpha_p * sum_pos exp(-beta_p (1 - f.k)) - alpha_n * sum_neg exp(-beta_n (1 - f.k)) mask,
// with f.k = (q_f . q_k) * s_k * s_f (int32 dot, float64 scales), z0 = logit_scale * W f.
void qtta_step(const QttaParams& prm, const float* W, const double* f, QttaCache& pos, QttaCache& neg,
               QttaMode mode, QttaScratch& scratch, float* out);

}  // namespace ev
