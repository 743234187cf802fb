// decode_step.cc — see decode_step.h. The same sequence of calls as Decoder._step in
// edgevlm/runtime/decoder.py (its twin), so both give bit-identical results.
#include "decode_step.h"

#include <vector>

#include "../kernels/linear.h"
#include "decode_ops.h"

namespace ev {

namespace {

// Per-thread scratch for one token's activations, grown on demand (no allocation per token).
struct StepScratch {
  std::vector<float> h, q, k, v, a, t, g, u;
};

void resize(std::vector<float>& b, int64_t n) {
  if ((int64_t)b.size() < n) b.resize((size_t)n);
}

void gemv(const StepLinear& l, const float* x, float* y, Isa isa, int threads) {
  linear(x, 1, l.w, l.bias, y, isa, threads);
}

// x += y; h = rms_norm(x) * w
void add_norm(float* x, const float* y, const float* w, int64_t d, float eps, float* h) {
  for (int64_t i = 0; i < d; ++i) x[i] += y[i];
  rms_norm_row(x, w, d, eps, h);
}

}  // namespace

void decode_step(const StepModel& m, float* x, int64_t pos, const float* cos, const float* sin, int64_t rot,
                 int threads, float* hout) {
  thread_local StepScratch s;
  const int64_t d = m.d, nq = m.hq * m.hd, nkv = m.hkv * m.hd;
  resize(s.h, d);
  resize(s.t, d);
  resize(s.q, nq);
  resize(s.a, nq);
  resize(s.k, nkv);
  resize(s.v, nkv);
  resize(s.g, m.inter);
  resize(s.u, m.inter);
  float* h = s.h.data();
  rms_norm_row(x, m.layers.empty() ? m.norm : m.layers[0].n1, d, m.eps, h);
  for (size_t li = 0; li < m.layers.size(); ++li) {
    const StepLayer& L = m.layers[li];
    gemv(L.q, h, s.q.data(), m.isa, threads);
    gemv(L.k, h, s.k.data(), m.isa, threads);
    gemv(L.v, h, s.v.data(), m.isa, threads);
    AttnDecodeArgs at{s.q.data(), s.k.data(), s.v.data(), L.kc, L.vc, m.hq, m.hkv, m.hd, m.ctx, pos, rot,
                      cos, sin, L.qn, L.kn, m.eps, m.scale, s.a.data(), m.kv_f16};
    attend_decode(at, threads);
    gemv(L.o, s.a.data(), s.t.data(), m.isa, threads);
    add_norm(x, s.t.data(), L.n2, d, m.eps, h);
    gemv(L.gate, h, s.g.data(), m.isa, threads);
    gemv(L.up, h, s.u.data(), m.isa, threads);
    silu_mul(s.g.data(), s.u.data(), m.inter, s.g.data());
    gemv(L.down, s.g.data(), s.t.data(), m.isa, threads);
    add_norm(x, s.t.data(), li + 1 < m.layers.size() ? m.layers[li + 1].n1 : m.norm, d, m.eps, h);
  }
  for (int64_t i = 0; i < d; ++i) hout[i] = h[i];
}

}  // namespace ev
