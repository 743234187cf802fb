// qtta_ops.cc — see qtta_ops.h. Portable C++ (built for the baseline target): the work is a
// few thousand MACs, so call overhead, not SIMD, is what this file removes.
#include "qtta_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../common.h"

namespace ev {

namespace {

// Smallest binary16 >= s for 0 < s <= 65504 (bits). fp16_ceil works on float: when (float)s
// rounded down below s the half it returns may be < s, hence the float64 check.
uint16_t half_ceil(double s) {
  uint16_t h = fp16_ceil((float)s);
  if ((double)fp16_to_fp32(h) < s) ++h;  // positive halves are ordered like their bits
  return h;
}

int32_t dot_i8(const int8_t* EV_RESTRICT a, const int8_t* EV_RESTRICT b, int64_t d) {
  int32_t acc = 0;  // |acc| <= 127^2 D: exact in int32 for D < 133k
  for (int64_t i = 0; i < d; ++i) acc += (int32_t)a[i] * (int32_t)b[i];
  return acc;
}

// sum_d W[d] * f[d] in float64; four partial sums so the loop is not one long dependency chain.
double dot_f32_f64(const float* EV_RESTRICT w, const double* EV_RESTRICT f, int64_t d) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= d; i += 4) {
    s0 += (double)w[i] * f[i];
    s1 += (double)w[i + 1] * f[i + 1];
    s2 += (double)w[i + 2] * f[i + 2];
    s3 += (double)w[i + 3] * f[i + 3];
  }
  for (; i < d; ++i) s0 += (double)w[i] * f[i];
  return (s0 + s1) + (s2 + s3);
}

// TDA's update_cache on the preallocated class list `cls`: sorted by ascending entropy (a
// newcomer goes after equal entries: upper_bound); append while below capacity, else replace
// the worst entry only if H is strictly smaller. mask may be null (positive cache).
void insert(QttaCache& c, int64_t d, int64_t mb, int64_t cls, const int8_t* key, uint16_t scale, float H,
            const uint8_t* mask) {
  const int64_t cap = c.cap;
  float* ent = c.ent + cls * cap;
  int64_t n = c.count[cls];
  if (n == cap) {
    if (!(H < ent[n - 1])) return;
    --n;  // drop the worst entry
  }
  const int64_t pos = std::upper_bound(ent, ent + n, H) - ent;
  const int64_t row = cls * cap;
  if (pos < n) {  // shift [pos, n) one slot right
    const int64_t m = n - pos;
    std::memmove(c.keys + (row + pos + 1) * d, c.keys + (row + pos) * d, (size_t)(m * d));
    std::memmove(ent + pos + 1, ent + pos, (size_t)m * sizeof(float));
    std::memmove(c.scale + row + pos + 1, c.scale + row + pos, (size_t)m * sizeof(uint16_t));
    if (c.masks) std::memmove(c.masks + (row + pos + 1) * mb, c.masks + (row + pos) * mb, (size_t)(m * mb));
  }
  std::memcpy(c.keys + (row + pos) * d, key, (size_t)d);
  ent[pos] = H;
  c.scale[row + pos] = scale;
  if (c.masks) std::memcpy(c.masks + (row + pos) * mb, mask, (size_t)mb);
  c.count[cls] = (int32_t)(n + 1);
}

// exp(-beta (1 - f.k)) of slot `slot` of class list `cls`; f.k from the int8 codes and scales.
inline double affinity_weight(const QttaCache& c, int64_t d, int64_t cls, int64_t slot, const int8_t* q, double sf,
                              double beta) {
  const int64_t i = cls * c.cap + slot;
  const double aff = (double)dot_i8(c.keys + i * d, q, d) * ((double)fp16_to_fp32(c.scale[i]) * sf);
  return std::exp(-beta * (1.0 - aff));
}

}  // namespace

uint16_t qtta_quantize_int8(const double* x, int64_t d, int8_t* q) {
  double m = 0.0;
  for (int64_t i = 0; i < d; ++i) m = std::max(m, std::fabs(x[i]));
  if (m == 0.0) {
    std::memset(q, 0, (size_t)d);
    return 0x3C00u;  // 1.0
  }
  const uint16_t h = half_ceil(m / 127.0);
  const double s = (double)fp16_to_fp32(h);
  for (int64_t i = 0; i < d; ++i) {
    const double r = std::nearbyint(x[i] / s);  // default rounding mode: half to even, as np.rint
    q[i] = (int8_t)std::min(127.0, std::max(-127.0, r));
  }
  return h;
}

void qtta_step(const QttaParams& prm, const float* W, const double* f, QttaCache& pos, QttaCache& neg,
               QttaMode mode, QttaScratch& s, float* out) {
  const int64_t C = prm.classes, D = prm.dim, MB = (C + 7) / 8;
  double* z0 = s.z0;
  for (int64_t c = 0; c < C; ++c) z0[c] = prm.logit_scale * dot_f32_f64(W + c * D, f, D);
  if (mode == QttaMode::ZeroShot) {
    for (int64_t c = 0; c < C; ++c) out[c] = (float)z0[c];
    return;
  }
  const uint16_t sf_bits = qtta_quantize_int8(f, D, s.q);
  const double sf = (double)fp16_to_fp32(sf_bits);
  if (mode == QttaMode::Adapt) {
    // softmax, entropy H (nats) and pseudo-label: the first argmax, as np.argmax
    int64_t pred = 0;
    for (int64_t c = 1; c < C; ++c)
      if (z0[c] > z0[pred]) pred = c;
    const double zmax = z0[pred];
    double tot = 0.0;
    for (int64_t c = 0; c < C; ++c) tot += (s.p[c] = std::exp(z0[c] - zmax));
    const double logtot = std::log(tot);
    double H = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double p = s.p[c] / tot;
      H -= p * ((z0[c] - zmax) - logtot);
      s.p[c] = p;
    }
    const double h = H / std::log2((double)C);  // TDA's gate: nats / log2(C)
    if (pos.cap) insert(pos, D, MB, pred, s.q, sf_bits, (float)H, nullptr);
    if (neg.cap && prm.ent_lo < h && h < prm.ent_hi) {
      std::memset(s.mask, 0, (size_t)MB);
      for (int64_t c = 0; c < C; ++c)
        if (s.p[c] > prm.mask_lo && s.p[c] < prm.mask_hi) s.mask[c >> 3] |= (uint8_t)(0x80u >> (c & 7));
      insert(neg, D, MB, pred, s.q, sf_bits, (float)H, s.mask);
    }
  }
  // z = z0 + z_p - z_n (z0 is reused as z)
  if (pos.cap) {
    for (int64_t c = 0; c < C; ++c) {
      double w = 0.0;
      for (int64_t k = 0; k < pos.count[c]; ++k) w += affinity_weight(pos, D, c, k, s.q, sf, prm.beta_p);
      z0[c] += prm.alpha_p * w;
    }
  }
  if (neg.cap) {
    double* zn = s.p;  // the probabilities are no longer needed
    std::fill(zn, zn + C, 0.0);
    bool any = false;
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = 0; k < neg.count[c]; ++k) {
        const double w = affinity_weight(neg, D, c, k, s.q, sf, prm.beta_n);
        const uint8_t* m = neg.masks + (c * neg.cap + k) * MB;
        for (int64_t j = 0; j < C; ++j)
          if (m[j >> 3] & (0x80u >> (j & 7))) zn[j] += w;
        any = true;
      }
    }
    if (any)
      for (int64_t c = 0; c < C; ++c) z0[c] -= prm.alpha_n * zn[c];
  }
  for (int64_t c = 0; c < C; ++c) out[c] = (float)z0[c];
}

}  // namespace ev
