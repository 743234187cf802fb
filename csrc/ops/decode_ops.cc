// decode_ops.cc — see decode_ops.h. Portable C++; parallel over query heads.
#include "decode_ops.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "../threadpool.h"

namespace ev {

namespace {

// Without -ffast-math a single running sum cannot be vectorised (the compiler keeps the
// order); eight independent partial sums can, and break the add latency chain.
float dot(const float* a, const float* b, int64_t n) {
  float p[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) p[j] += a[i + j] * b[i + j];
  float d = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; i < n; ++i) d += a[i] * b[i];
  return d;
}

}  // namespace

void rms_norm_row(const float* x, const float* w, int64_t d, float eps, float* y) {
  double p[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= d; i += 4)
    for (int j = 0; j < 4; ++j) p[j] += (double)x[i + j] * (double)x[i + j];
  double ss = (p[0] + p[1]) + (p[2] + p[3]);
  for (; i < d; ++i) ss += (double)x[i] * (double)x[i];
  const float inv = 1.0f / std::sqrt((float)(ss / (double)d) + eps);
  if (w) {
    for (int64_t i = 0; i < d; ++i) y[i] = x[i] * inv * w[i];
  } else {
    for (int64_t i = 0; i < d; ++i) y[i] = x[i] * inv;
  }
}

void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] * (0.5f * (1.0f + std::tanh(0.5f * g[i]))) * u[i];
}

namespace {

// x[hd] -> y[hd]: optional per-head RMSNorm, then rotate_half RoPE on the first rot dims.
void norm_rope(const float* x, const AttnDecodeArgs& a, const float* norm_w, float* y) {
  const int64_t hd = a.hd, half = a.rot / 2;
  if (norm_w) rms_norm_row(x, norm_w, hd, a.eps, y);
  else std::copy(x, x + hd, y);
  for (int64_t i = 0; i < half; ++i) {
    const float lo = y[i], hi = y[i + half];
    y[i] = lo * a.cos[i] - hi * a.sin[i];
    y[i + half] = hi * a.cos[i + half] + lo * a.sin[i + half];
  }
}

}  // namespace

void attend_decode(const AttnDecodeArgs& a, int threads) {
  const int64_t hd = a.hd, n = a.pos + 1, rep = a.hq / a.hkv;
  // The new token's K (normed, rotated) and V into cache slot pos, head by head.
  for (int64_t g = 0; g < a.hkv; ++g) {
    norm_rope(a.k + g * hd, a, a.kn, a.kc + (g * a.ctx + a.pos) * hd);
    std::copy(a.v + g * hd, a.v + (g + 1) * hd, a.vc + (g * a.ctx + a.pos) * hd);
  }
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>({(int64_t)std::max(threads, 1), a.hq,
                                                              // < ~16k MACs per head: one thread
                                                              n * hd >= 16384 ? a.hq : 1}));
  const int64_t per = (a.hq + nt - 1) / nt;
  parallel_for(nt, [&](int t) {
    std::vector<float> qh((size_t)hd), s((size_t)n), acc((size_t)hd);
    for (int64_t h = t * per; h < std::min(a.hq, (t + 1) * per); ++h) {
      const int64_t g = h / rep;
      const float* kg = a.kc + g * a.ctx * hd;
      const float* vg = a.vc + g * a.ctx * hd;
      norm_rope(a.q + h * hd, a, a.qn, qh.data());
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        s[j] = dot(qh.data(), kg + j * hd, hd) * a.scale;
        mx = std::max(mx, s[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
      }
      const float inv = 1.0f / sum;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float p = s[j] * inv;
        const float* vj = vg + j * hd;
        for (int64_t i = 0; i < hd; ++i) acc[i] += p * vj[i];
      }
      std::copy(acc.begin(), acc.end(), a.out + h * hd);
    }
  });
}

}  // namespace ev
