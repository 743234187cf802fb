// linear_ref.cc — portable reference for every quant type: RTN quantization of weights,
// dequantization, int8 activation quantization and the linear kernel. No SIMD, no
// assumptions beyond C++17; every ISA kernel is tested against these.
#include <cmath>
#include <vector>

#include "../../qtypes/q2.h"
#include "../../qtypes/q2b.h"
#include "../../qtypes/q3.h"
#include "../../qtypes/q4.h"
#include "../../qtypes/q8.h"
#include "ref.h"

namespace ev {

namespace {

void pack_codes(QType t, const uint8_t* q, int64_t k, uint8_t* qs) {
  switch (t) {
    case QType::Q2: pack_codes_q2(q, k, qs); break;
    case QType::Q3: pack_codes_q3(q, k, qs); break;
    case QType::Q4: pack_codes_q4(q, k, qs); break;
    case QType::Q8: pack_codes_q8(reinterpret_cast<const int8_t*>(q), k, qs); break;
    case QType::Q2B: pack_codes_q2(q, k, qs); break;
  }
}

void unpack_codes(QType t, const uint8_t* qs, int64_t k, uint8_t* q) {
  switch (t) {
    case QType::Q2: unpack_codes_q2(qs, k, q); break;
    case QType::Q3: unpack_codes_q3(qs, k, q); break;
    case QType::Q4: unpack_codes_q4(qs, k, q); break;
    case QType::Q8: unpack_codes_q8(qs, k, reinterpret_cast<int8_t*>(q)); break;
    case QType::Q2B: unpack_codes_q2(qs, k, q); break;
  }
}

// w: [K] one row; out: the row's codes and its per-group scale/min (fp16 bits).
void quantize_row(QType t, const float* w, int64_t k, int group, uint8_t* codes, uint16_t* scales,
                  uint16_t* mins) {
  for (int64_t g = 0; g < k / group; ++g) {
    const float* wg = w + g * group;
    uint8_t* cg = codes + g * group;
    if (t == QType::Q8) {  // symmetric: scale = fp16_ceil(max|w| / 127)
      float amax = 0.f;
      for (int i = 0; i < group; ++i) amax = std::fmax(amax, std::fabs(wg[i]));
      scales[g] = fp16_ceil(amax / 127.f);
      const float s = fp16_to_fp32(scales[g]);
      for (int i = 0; i < group; ++i) {
        const float r = s > 0.f ? std::nearbyint(wg[i] / s) : 0.f;
        cg[i] = (uint8_t)(int8_t)std::fmin(127.f, std::fmax(-127.f, r));
      }
      continue;
    }
    const int qmax = (1 << qtype_bits(t)) - 1;
    const AsymParams p = asym_params(wg, group, qmax);
    scales[g] = p.scale;
    mins[g] = p.min;
    for (int i = 0; i < group; ++i) {
      const float r = p.fscale > 0.f ? std::nearbyint((wg[i] - p.fmin) / p.fscale) : 0.f;
      cg[i] = (uint8_t)std::fmin((float)qmax, std::fmax(0.f, r));
    }
  }
}

}  // namespace

void quantize_rows_ref(QType t, const float* w, int64_t n, int64_t k, int group, uint8_t* blob) {
  if (t == QType::Q2B) {  // bilevel: the level-2 groups span 16 rows (q2b.h)
    quantize_q2b(w, n, k, blob);
    return;
  }
  const QMatrix v = qmatrix_view(t, n, k, group, blob);
  std::vector<uint8_t> codes((size_t)k);
  for (int64_t r = 0; r < n; ++r) {
    uint16_t* sc = const_cast<uint16_t*>(v.row_scales(r));
    uint16_t* mn = const_cast<uint16_t*>(v.row_mins(r));
    quantize_row(t, w + r * k, k, group, codes.data(), sc, mn);
    pack_codes(t, codes.data(), k, const_cast<uint8_t*>(v.row_qs(r)));
  }
}

void dequant_rows_ref(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
  if (w.type == QType::Q2B) {
    dequant_rows_q2b(w, r0, r1, out);
    return;
  }
  std::vector<uint8_t> codes((size_t)w.k);
  for (int64_t r = r0; r < r1; ++r) {
    unpack_codes(w.type, w.row_qs(r), w.k, codes.data());
    const uint16_t* sc = w.row_scales(r);
    const uint16_t* mn = w.row_mins(r);
    float* o = out + (r - r0) * w.k;
    for (int64_t i = 0; i < w.k; ++i) {
      const int64_t g = i / w.group;
      const float s = fp16_to_fp32(sc[g]);
      if (w.type == QType::Q8)
        o[i] = s * (float)(int8_t)codes[(size_t)i];
      else
        o[i] = s * (float)codes[(size_t)i] + fp16_to_fp32(mn[g]);
    }
  }
}

void quantize_acts_ref(const float* x, int64_t m0, int64_t m1, int64_t k, int group, int8_t* q,
                       float* d, float* s) {
  const int64_t G = k / group;
  for (int64_t r = m0; r < m1; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + r * k + g * group;
      int8_t* qg = q + r * k + g * group;
      float amax = 0.f;
      for (int i = 0; i < group; ++i) amax = std::fmax(amax, std::fabs(xg[i]));
      const float dg = amax / 127.f;
      const float inv = dg > 0.f ? 1.f / dg : 0.f;
      int32_t sum = 0;
      for (int i = 0; i < group; ++i) {
        // x * (1/d) rather than x / d: what the SIMD versions compute, so all agree.
        const int32_t v = (int32_t)std::nearbyint(xg[i] * inv);
        qg[i] = (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
        sum += qg[i];
      }
      d[r * G + g] = dg;
      s[r * G + g] = dg * (float)sum;
    }
  }
}

void linear_ref(const LinearArgs& a, int64_t n0, int64_t n1) {
  const int64_t K = a.w.k, N = a.w.n;
  std::vector<float> row((size_t)K);
  for (int64_t n = n0; n < n1; ++n) {
    dequant_rows_ref(a.w, n, n + 1, row.data());
    for (int64_t m = 0; m < a.m; ++m) {
      const float* x = a.x + m * K;
      double acc = 0.0;
      for (int64_t i = 0; i < K; ++i) acc += (double)x[i] * (double)row[(size_t)i];
      if (a.bias) acc += a.bias[n];
      a.y[m * N + n] = (float)acc;
    }
  }
}

}  // namespace ev
