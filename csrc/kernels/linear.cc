// linear.cc — see linear.h.
#include "linear.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../threadpool.h"

namespace ev {

namespace {

// Per-thread scratch for quantized activations, grown on demand and reused: a fresh
// allocation per call would page-fault on every prefill of a large M x K.
// q8 weights (two passes, see linear()): also the residual r [M, K] fp32, its int8 codes
// (q2, d2, s2) and the second pass's output y2 [M, N].
struct ActScratch {
  std::vector<int8_t> q, q2;
  std::vector<float> d, s, d2, s2, r, y2;
};
ActScratch& scratch() {
  thread_local ActScratch sc;
  return sc;
}

template <typename T>
T* grown(std::vector<T>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize((size_t)n);
  return v.data();
}

// Rows of W per work chunk: a multiple of every kernel's register tile (<= 8 rows), so a
// thread boundary never splits a tile, and small enough to balance 2-8 threads.
constexpr int64_t kRowAlign = 8;

// Below this many multiply-adds, waking a second thread costs more than it saves.
constexpr int64_t kMinParallelMacs = 1 << 16;

// Below this many activations one thread quantizes them all (197 x 768 is ~60 us on one core,
// not worth a second pool wake-up; 197 x 3072 is).
constexpr int64_t kMinParallelQuant = 1 << 18;

// Two-pass GEMV: bytes of packed W per sub-chunk of a thread's slice, run through both passes
// before the next, so the second pass reads W from L2 (>= 1 MiB per core on the x86 and ARM
// cores we target) instead of DRAM.
constexpr int64_t kTwoPassChunkBytes = 256 * 1024;

// Residual of rows [r0, r1): r = x - d[g] * q (the part the int8 codes miss, |r| <= d/2), exact:
// with d = hi + lo, hi = d's top 12 significant bits, hi*q and lo*q are exact in fp32 (<= 19
// bits), x - hi*q is exact (Sterbenz: x and hi*q within a factor 2 when q != 0; x itself when
// q == 0), and so is the last subtraction, whose exact result r is a multiple of ulp(d)/2 below
// d/2 in size, hence an fp32.  Every step exact, so FMA contraction cannot change a bit (ARM,
// -mfma builds) and tests rebuild r as float32(float64 x - float64 d * q).  (Assumes d is a
// normal float: activations below ~1e-36 could round in hi*q.)
void residual(const float* x, const int8_t* q, const float* d, int64_t r0, int64_t r1, int64_t k, int group,
              float* r) {
  const int64_t G = k / group;
  for (int64_t row = r0; row < r1; ++row)
    for (int64_t g = 0; g < G; ++g) {
      const float dg = d[row * G + g];
      uint32_t bits;
      std::memcpy(&bits, &dg, sizeof bits);
      bits &= 0xFFFFF000u;  // keep the sign, exponent and top 11 stored mantissa bits
      float hi;
      std::memcpy(&hi, &bits, sizeof hi);
      const float lo = dg - hi;  // exact: d's low 12 mantissa bits
      const int64_t o = row * k + g * group;
      for (int i = 0; i < group; ++i) {
        const float qf = (float)q[o + i];
        r[o + i] = (x[o + i] - hi * qf) - lo * qf;
      }
    }
}

}  // namespace

void linear(const float* x, int64_t m, const QMatrix& w, const float* bias, float* y, Isa isa,
            int threads) {
  const IsaKernels& kt = kernels_for(isa);
  const QKernels& qk = kt.q[(int)w.type];
  const int64_t K = w.k, N = w.n, G = K / w.group;
  // q8 weights on int8-activation ISAs: a second pass over the residual of the activations
  // (kernels.h): y = W.(d1 q1) + W.(d2 q2), an activation step of ~d1 / (2 * 127).
  const bool two_pass = kt.int8_acts && w.type == QType::Q8;

  QActs acts{}, racts{};
  float* y2 = nullptr;
  const float* rx = nullptr;
  if (kt.int8_acts) {
    ActScratch& sc = scratch();
    int8_t* q = grown(sc.q, m * K);
    float *d = grown(sc.d, m * G), *s = grown(sc.s, m * G);
    int8_t* q2 = two_pass ? grown(sc.q2, m * K) : nullptr;
    float *d2 = two_pass ? grown(sc.d2, m * G) : nullptr, *s2 = two_pass ? grown(sc.s2, m * G) : nullptr;
    float* r = two_pass ? grown(sc.r, m * K) : nullptr;
    if (two_pass) y2 = grown(sc.y2, m * N);
    // Rows split over the pool when there are many (a 197 x 3072 prefill is ~0.2 ms on one
    // core); each row's result is the same whichever thread quantizes it.
    const int qt = m * K >= kMinParallelQuant ? (int)std::min<int64_t>(m, threads > 0 ? threads : get_num_threads()) : 1;
    const int64_t qper = (m + qt - 1) / qt;
    parallel_for(qt, [&](int t) {
      const int64_t r0 = std::min(m, t * qper), r1 = std::min(m, r0 + qper);
      if (r0 >= r1) return;
      if (!two_pass) {
        kt.quantize_acts(x, r0, r1, K, w.group, q, d, s);
        return;
      }
      for (int64_t row = r0; row < r1; ++row) {  // row by row: x, r and the codes stay in L1/L2
        kt.quantize_acts(x, row, row + 1, K, w.group, q, d, s);
        residual(x, q, d, row, row + 1, K, w.group, r);
        kt.quantize_acts(r, row, row + 1, K, w.group, q2, d2, s2);
      }
    });
    acts = QActs{q, d, s, m, K, w.group};
    racts = QActs{q2, d2, s2, m, K, w.group};
    rx = r;
  }

  int nt = threads > 0 ? threads : get_num_threads();
  nt = (int)std::min<int64_t>(nt, (N + kRowAlign - 1) / kRowAlign);
  if (m * N * K < kMinParallelMacs) nt = 1;
  nt = std::max(nt, 1);
  // Contiguous, tile-aligned slices of N, one per thread.
  const int64_t per = ((N + nt - 1) / nt + kRowAlign - 1) / kRowAlign * kRowAlign;
  // Two-pass GEMV: W rows per sub-chunk (q8 row = K codes + G fp16 scales), tile-aligned.
  const int64_t sub = two_pass ? std::max<int64_t>(kRowAlign, kTwoPassChunkBytes / (K + 2 * G) / kRowAlign * kRowAlign)
                               : N;

  // One pass over columns [n0, n1): the first (x's codes, bias, into y) or, with res, the
  // residual's (no bias, into y2).
  auto pass = [&](int64_t n0, int64_t n1, bool res) {
    const float* xs = res ? rx : x;
    const QActs& qa = res ? racts : acts;
    const float* b = res ? nullptr : bias;
    float* ys = res ? y2 : y;
    if (m >= kt.gemm_min_m) {
      LinearArgs a{xs, kt.int8_acts ? &qa : nullptr, w, b, ys, m};
      qk.gemm(a, n0, n1);
      return;
    }
    for (int64_t r = 0; r < m; ++r) {  // few rows: one GEMV per row
      QActs row_acts{qa.q ? qa.q + r * K : nullptr, qa.d ? qa.d + r * G : nullptr,
                     qa.s ? qa.s + r * G : nullptr, 1, K, w.group};
      LinearArgs a{xs + r * K, kt.int8_acts ? &row_acts : nullptr, w, b, ys + r * N, 1};
      qk.gemv(a, n0, n1);
    }
  };

  auto run_slice = [&](int t) {
    const int64_t n0 = std::min<int64_t>(N, t * per), n1 = std::min<int64_t>(N, n0 + per);
    if (n0 >= n1) return;
    if (!two_pass) {
      pass(n0, n1, false);
      return;
    }
    // GEMM is compute-bound and blocks W itself: both passes over the whole slice. GEMV
    // streams W: both passes per L2-sized sub-chunk. y = y1 + y2 per element either way, so
    // the result does not depend on the split.
    const int64_t step = m >= kt.gemm_min_m ? n1 - n0 : sub;
    for (int64_t c0 = n0; c0 < n1; c0 += step) {
      const int64_t c1 = std::min(n1, c0 + step);
      pass(c0, c1, false);
      pass(c0, c1, true);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t n = c0; n < c1; ++n) y[r * N + n] += y2[r * N + n];
    }
  };
  parallel_for(nt, run_slice);
}

}  // namespace ev
