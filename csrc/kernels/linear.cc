// linear.cc — see linear.h.
#include "linear.h"

#include <algorithm>
#include <vector>

#include "../threadpool.h"

namespace ev {

namespace {

// Per-thread scratch for quantized activations, grown on demand and reused: a fresh
// allocation per call would page-fault on every prefill of a large M x K.
struct ActScratch {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};
ActScratch& scratch() {
  thread_local ActScratch sc;
  return sc;
}

// Rows of W per work chunk: a multiple of every kernel's register tile (<= 8 rows), so a
// thread boundary never splits a tile, and small enough to balance 2-8 threads.
constexpr int64_t kRowAlign = 8;

// Below this many multiply-adds, waking a second thread costs more than it saves.
constexpr int64_t kMinParallelMacs = 1 << 16;

// Below this many activations one thread quantizes them all (197 x 768 is ~60 us on one core,
// not worth a second pool wake-up; 197 x 3072 is).
constexpr int64_t kMinParallelQuant = 1 << 18;

}  // namespace

void linear(const float* x, int64_t m, const QMatrix& w, const float* bias, float* y, Isa isa,
            int threads) {
  const IsaKernels& kt = kernels_for(isa);
  const QKernels& qk = kt.q[(int)w.type];
  const int64_t K = w.k, N = w.n, G = K / w.group;

  QActs acts{};
  if (kt.int8_acts) {
    ActScratch& sc = scratch();
    if ((int64_t)sc.q.size() < m * K) sc.q.resize((size_t)(m * K));
    if ((int64_t)sc.d.size() < m * G) { sc.d.resize((size_t)(m * G)); sc.s.resize((size_t)(m * G)); }
    // Rows split over the pool when there are many (a 197 x 3072 prefill is ~0.2 ms on one
    // core); each row's result is the same whichever thread quantizes it.
    const int qt = m * K >= kMinParallelQuant ? (int)std::min<int64_t>(m, threads > 0 ? threads : get_num_threads()) : 1;
    const int64_t qper = (m + qt - 1) / qt;
    parallel_for(qt, [&](int t) {
      const int64_t r0 = std::min(m, t * qper), r1 = std::min(m, r0 + qper);
      if (r0 < r1) kt.quantize_acts(x, r0, r1, K, w.group, sc.q.data(), sc.d.data(), sc.s.data());
    });
    acts = QActs{sc.q.data(), sc.d.data(), sc.s.data(), m, K, w.group};
  }

  int nt = threads > 0 ? threads : get_num_threads();
  nt = (int)std::min<int64_t>(nt, (N + kRowAlign - 1) / kRowAlign);
  if (m * N * K < kMinParallelMacs) nt = 1;
  nt = std::max(nt, 1);
  // Contiguous, tile-aligned slices of N, one per thread.
  const int64_t per = ((N + nt - 1) / nt + kRowAlign - 1) / kRowAlign * kRowAlign;

  auto run_slice = [&](int t) {
    const int64_t n0 = std::min<int64_t>(N, t * per), n1 = std::min<int64_t>(N, n0 + per);
    if (n0 >= n1) return;
    if (m >= kt.gemm_min_m) {
      LinearArgs a{x, kt.int8_acts ? &acts : nullptr, w, bias, y, m};
      qk.gemm(a, n0, n1);
      return;
    }
    for (int64_t r = 0; r < m; ++r) {  // few rows: one GEMV per row
      QActs row_acts{acts.q ? acts.q + r * K : nullptr, acts.d ? acts.d + r * G : nullptr,
                     acts.s ? acts.s + r * G : nullptr, 1, K, w.group};
      LinearArgs a{x + r * K, kt.int8_acts ? &row_acts : nullptr, w, bias, y + r * N, 1};
      qk.gemv(a, n0, n1);
    }
  };
  parallel_for(nt, run_slice);
}

}  // namespace ev
