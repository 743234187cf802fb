// kernel_test.cc — standalone test of every linear kernel compiled into this build (no
// gtest, no Python), for native runs and for aarch64 runs under qemu-aarch64
// (tests/test_arm_qemu.py). Built by CMake with -DEDGEVLM_CPP_TESTS=ON as evlm_kernel_test.
//
// For each ISA the running CPU supports (ref always; avx2 / avxvnni / neon / neondot when
// compiled and the CPU has the features), every qtype (q2 q3 q4 q8) x group (32 64 128) x shape, and
// q2b (bilevel scales, group 16 only, int8 activations per group of 16) x shape:
//   * ev::linear (bias on/off, 1 and 2 threads) against ev::linear on the reference ISA,
//     within  sum_g (d[m,g]/2) * sum_{k in g} |w_deq[n,k]|  +  1e-5 * sum_k |x||w_deq|  + 1e-6
//     (d from quantize_acts_ref, w_deq from dequant_rows_ref; kernels.h explains the bound);
//   * the ISA's gemv/gemm called directly on an odd column slice [1, N-1): same bound inside
//     the slice, and columns outside it must be left untouched;
//   * avxvnni (when avx2 is supported too): every output above bit-identical to avx2's (the
//     same exact int32 dots; common_avx2.h);
// plus each int8 ISA's quantize_acts against quantize_acts_ref (identical, or differing only
// at exact .5 ties, which are counted and reported), and pack/unpack round trips of every
// code layout checked bit by bit against the diagrams in csrc/qtypes/qN.h.
//
// Also ev::attend_decode (the decode attention glue this build dispatches to: NEON on aarch64,
// AVX2 or portable on x86) with float32 and float16 KV caches against a double reference over
// the same cache values (half caches: the values rounded to half, which the store must produce
// bit for bit), 1 and 2 threads bit-identical.
//
// Usage: evlm_kernel_test [--expect-isa ref|avx2|avxvnni|neon|neondot] [--verbose]
//   --expect-isa X  also fail unless ev::default_isa() is X (checks runtime dispatch, e.g.
//                   neondot on qemu's default CPU, neon under -cpu cortex-a53).
// Prints the ISAs tested and skipped (with the reason), then a last line
// "<N> passed, <M> failed"; the exit status is non-zero on any failure.
#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "../../csrc/common.h"
#include "../../csrc/cpu_features.h"
#include "../../csrc/kernels/kernels.h"
#include "../../csrc/kernels/linear.h"
#include "../../csrc/ops/decode_ops.h"
#include "../../csrc/qtypes/q2.h"
#include "../../csrc/qtypes/q2b.h"
#include "../../csrc/qtypes/q3.h"
#include "../../csrc/qtypes/q4.h"
#include "../../csrc/qtypes/q8.h"
#include "../../csrc/threadpool.h"

namespace {

using namespace ev;

// ---- bookkeeping -------------------------------------------------------------------------

struct Stats {
  long passed = 0, failed = 0;
  int printed = 0;
  bool verbose = false;
  void check(bool ok, const std::string& what, const std::string& detail = "") {
    if (ok) {
      ++passed;
      if (verbose) std::printf("ok   %s\n", what.c_str());
      return;
    }
    ++failed;
    if (printed++ < 40) std::printf("FAIL %s%s%s\n", what.c_str(), detail.empty() ? "" : ": ", detail.c_str());
    else if (printed == 41) std::printf("... (further failures not printed)\n");
  }
};

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// splitmix64: deterministic on every platform.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 12345) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform() { return (float)((next() >> 40) * (1.0 / 16777216.0)) * 2.f - 1.f; }  // [-1, 1)
  int below(int n) { return (int)(next() % (uint64_t)n); }
};

const char* cpu_reason(Isa isa) {
  switch (isa) {
    case Isa::Avx2: return "CPU lacks AVX2/FMA/F16C";
    case Isa::AvxVnni: return "CPU lacks AVX-VNNI (or AVX2/FMA/F16C)";
    case Isa::Neon: return "CPU has no NEON";
    case Isa::NeonDot: return "CPU has no dotprod";
    default: return "CPU not supported";
  }
}

// ---- test data ---------------------------------------------------------------------------

// W[N, K]: rows of different magnitude with a per-group offset (so mins matter) and a few
// outliers; group (0, 0) all zero, group (N-1, G-1) constant.
std::vector<float> make_weights(int64_t n, int64_t k, int group, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> w((size_t)(n * k));
  const int64_t G = k / group;
  for (int64_t r = 0; r < n; ++r) {
    const float rs = 0.05f + 1.5f * (0.5f + 0.5f * rng.uniform());
    for (int64_t g = 0; g < G; ++g) {
      const float off = 0.5f * rng.uniform();
      for (int i = 0; i < group; ++i) {
        float v = rs * (rng.uniform() + off);
        if (rng.below(97) == 0) v *= 6.f;  // outlier
        w[(size_t)(r * k + g * group + i)] = v;
      }
    }
  }
  for (int i = 0; i < group; ++i) w[(size_t)i] = 0.f;
  if (n * G > 1)
    for (int i = 0; i < group; ++i) w[(size_t)((n - 1) * k + (G - 1) * group + i)] = -0.37f;
  return w;
}

// X[M, K]: rows of different magnitude; the first 32 values of the last row (M > 1) are
// zero, so with group 32 an all-zero activation group (d = 0) is covered.
std::vector<float> make_acts(int64_t m, int64_t k, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> x((size_t)(m * k));
  for (int64_t r = 0; r < m; ++r) {
    const float rs = 0.1f + 3.f * (0.5f + 0.5f * rng.uniform());
    for (int64_t i = 0; i < k; ++i) {
      float v = rs * rng.uniform();
      if (rng.below(61) == 0) v *= 10.f;
      x[(size_t)(r * k + i)] = v;
    }
  }
  if (m > 1)
    for (int i = 0; i < 32; ++i) x[(size_t)((m - 1) * k + i)] = 0.f;
  return x;
}

// ---- pack / unpack -----------------------------------------------------------------------

// Code k of a packed row, read straight from the bit diagrams in qtypes/qN.h (independent
// of pack_codes_qN / unpack_codes_qN).
int spec_code(QType t, const uint8_t* qs, int64_t K, int64_t k) {
  switch (t) {
    case QType::Q4: {
      const int64_t u0 = k / kQ4Unit * kQ4Unit, U = std::min<int64_t>(kQ4Unit, K - u0), j = k - u0;
      return j < U / 2 ? qs[u0 / 2 + j] & 0xF : qs[u0 / 2 + j - U / 2] >> 4;
    }
    case QType::Q2:
    case QType::Q2B: {  // q2b codes are the q2 stream
      const int64_t u0 = k / kQ2Unit * kQ2Unit, U = std::min<int64_t>(kQ2Unit, K - u0), S = U / 4;
      const int64_t j = k - u0;
      return (qs[u0 / 4 + j % S] >> (2 * (j / S))) & 3;
    }
    case QType::Q3: {
      const int64_t u0 = k / kQ3Unit * kQ3Unit, U = std::min<int64_t>(kQ3Unit, K - u0);
      const int64_t S = U / 4, H = U / 8, j = k - u0;
      const uint8_t* base = qs + u0 * 3 / 8;
      const int lo = (base[j % S] >> (2 * (j / S))) & 3;
      const int hi = (base[S + j % H] >> (j / H)) & 1;
      return lo | hi << 2;
    }
    case QType::Q8: return (int8_t)qs[k];
  }
  return -1000;
}

void test_pack(Stats& st) {
  const int64_t Ks[] = {32, 64, 96, 128, 160, 192, 224, 256, 288, 384, 1024};
  for (int ti = 0; ti < kNumQTypes; ++ti) {
    const QType t = (QType)ti;
    for (int64_t K : Ks) {
      Rng rng(1000 + ti * 31 + K);
      std::vector<uint8_t> codes((size_t)K), back((size_t)K, 0xEE);
      const int qmax = (1 << qtype_bits(t)) - 1;
      for (auto& c : codes) c = t == QType::Q8 ? (uint8_t)(int8_t)(rng.below(255) - 127) : (uint8_t)rng.below(qmax + 1);
      const int64_t rb = row_bytes(t, K);
      std::vector<uint8_t> qs((size_t)rb + 16, 0xA5);
      switch (t) {
        case QType::Q2:
        case QType::Q2B: pack_codes_q2(codes.data(), K, qs.data()); unpack_codes_q2(qs.data(), K, back.data()); break;
        case QType::Q3: pack_codes_q3(codes.data(), K, qs.data()); unpack_codes_q3(qs.data(), K, back.data()); break;
        case QType::Q4: pack_codes_q4(codes.data(), K, qs.data()); unpack_codes_q4(qs.data(), K, back.data()); break;
        case QType::Q8:
          pack_codes_q8(reinterpret_cast<const int8_t*>(codes.data()), K, qs.data());
          unpack_codes_q8(qs.data(), K, reinterpret_cast<int8_t*>(back.data()));
          break;
      }
      bool guard = true;
      for (size_t i = (size_t)rb; i < qs.size(); ++i) guard = guard && qs[i] == 0xA5;
      int64_t bad_rt = -1, bad_spec = -1;
      for (int64_t k = 0; k < K; ++k) {
        if (bad_rt < 0 && back[(size_t)k] != codes[(size_t)k]) bad_rt = k;
        const int want = t == QType::Q8 ? (int)(int8_t)codes[(size_t)k] : (int)codes[(size_t)k];
        if (bad_spec < 0 && spec_code(t, qs.data(), K, k) != want) bad_spec = k;
      }
      const std::string what = fmt("pack %s K=%lld", qtype_name(t), (long long)K);
      st.check(guard && bad_rt < 0 && bad_spec < 0, what,
               fmt("guard=%d first round-trip mismatch=%lld first layout mismatch=%lld", (int)guard,
                   (long long)bad_rt, (long long)bad_spec));
    }
  }
}

// ---- activation quantization -------------------------------------------------------------

void test_quantize(Stats& st, Isa isa, long* ties_total) {
  const IsaKernels& kt = kernels_for(isa);
  if (!kt.int8_acts || kt.quantize_acts == quantize_acts_ref) return;
  struct Shape { int64_t m, k; };
  const Shape shapes[] = {{1, 128}, {3, 384}, {5, 1024}, {2, 96}, {4, 160}};
  for (int group : {16, 32, 64, 128}) {  // 16: q2b's activation groups
    for (const Shape& sh : shapes) {
      if (sh.k % group) continue;
      const int64_t M = sh.m, K = sh.k, G = K / group;
      std::vector<float> x = make_acts(M, K, 77 + M * 1000 + K + group);
      // Row 0, group 0: amax = 127 makes d = 1 and 1/d = 1, so x.5 values are exact ties.
      x[0] = 127.f;
      for (int i = 1; i < group; ++i) x[(size_t)i] = (float)((i * 37) % 253 - 126) + 0.5f;
      if (M > 2)  // an all-zero group (d = 0) at row 2's last group
        for (int i = 0; i < group; ++i) x[(size_t)(2 * K + (G - 1) * group + i)] = 0.f;
      std::vector<int8_t> qr((size_t)(M * K)), qi((size_t)(M * K), 99);
      std::vector<float> dr((size_t)(M * G)), sr((size_t)(M * G)), di((size_t)(M * G), -1.f),
          si((size_t)(M * G), -1.f);
      quantize_acts_ref(x.data(), 0, M, K, group, qr.data(), dr.data(), sr.data());
      // Two calls ([0, 1) and [1, M)) check that m0 > 0 addresses the right rows.
      kt.quantize_acts(x.data(), 0, 1, K, group, qi.data(), di.data(), si.data());
      kt.quantize_acts(x.data(), 1, M, K, group, qi.data(), di.data(), si.data());
      long ties = 0, bad = 0;
      std::string first;
      for (int64_t r = 0; r < M; ++r)
        for (int64_t g = 0; g < G; ++g) {
          const size_t gi = (size_t)(r * G + g);
          int group_ties = 0;
          int32_t sum_i = 0;
          const float inv = dr[gi] > 0.f ? 1.f / dr[gi] : 0.f;
          for (int i = 0; i < group; ++i) {
            const size_t e = (size_t)(r * K + g * group + i);
            sum_i += qi[e];
            if (qi[e] == qr[e]) continue;
            const float v = x[e] * inv;
            const bool tie = std::fabs(v - std::trunc(v)) == 0.5f && std::abs(qi[e] - qr[e]) == 1;
            if (tie) { ++group_ties; continue; }
            if (bad++ == 0) first = fmt("q[%lld,%lld]=%d ref %d (x=%g)", (long long)r, (long long)(g * group + i), qi[e], qr[e], x[e]);
          }
          ties += group_ties;
          const bool d_ok = std::memcmp(&di[gi], &dr[gi], sizeof(float)) == 0;
          const bool s_ok = group_ties == 0 ? std::memcmp(&si[gi], &sr[gi], sizeof(float)) == 0
                                            : si[gi] == di[gi] * (float)sum_i;
          if (!d_ok || !s_ok) {
            if (bad++ == 0) first = fmt("row %lld group %lld: d=%.9g (ref %.9g) s=%.9g (ref %.9g)", (long long)r, (long long)g, di[gi], dr[gi], si[gi], sr[gi]);
          }
        }
      *ties_total += ties;
      st.check(bad == 0, fmt("quantize_acts %s g%d M=%lld K=%lld", isa_name(isa), group, (long long)M, (long long)K),
               fmt("%ld mismatches, first: %s", bad, first.c_str()));
    }
  }
}

// ---- linear ------------------------------------------------------------------------------

struct Case {
  QType t;
  int group;
  int64_t m, n, k;
};

struct Problem {
  Case c;
  std::vector<uint8_t> blob;
  QMatrix w{};
  std::vector<float> x, bias, yref, yref_bias, bound;
};

// Largest |y - ref| / bound over the columns [n0, n1); columns outside must equal `fill`.
bool compare(const Problem& p, const std::vector<float>& y, const std::vector<float>& ref, int64_t n0,
             int64_t n1, float fill, std::string* detail) {
  const int64_t M = p.c.m, N = p.c.n;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const size_t i = (size_t)(m * N + n);
      if (n < n0 || n >= n1) {
        if (!(y[i] == fill)) {
          *detail = fmt("y[%lld,%lld]=%g written outside slice [%lld,%lld)", (long long)m, (long long)n, y[i], (long long)n0, (long long)n1);
          return false;
        }
        continue;
      }
      const float err = std::fabs(y[i] - ref[i]);
      if (!(err <= p.bound[i])) {  // also catches NaN
        *detail = fmt("y[%lld,%lld]=%.8g ref %.8g |err| %.3g > bound %.3g", (long long)m, (long long)n, y[i], ref[i], err, p.bound[i]);
        return false;
      }
    }
  return true;
}

void make_problem(Problem& p, uint64_t seed) {
  const Case& c = p.c;
  const int64_t G = c.k / c.group;
  const std::vector<float> wf = make_weights(c.n, c.k, c.group, seed);
  p.blob.assign((size_t)packed_size(c.t, c.n, c.k, c.group), 0);
  quantize_rows_ref(c.t, wf.data(), c.n, c.k, c.group, p.blob.data());
  p.w = qmatrix_view(c.t, c.n, c.k, c.group, p.blob.data());
  std::vector<float> wd((size_t)(c.n * c.k));
  dequant_rows_ref(p.w, 0, c.n, wd.data());
  std::vector<float> absw((size_t)(c.n * G), 0.f);
  for (int64_t n = 0; n < c.n; ++n)
    for (int64_t k = 0; k < c.k; ++k) absw[(size_t)(n * G + k / c.group)] += std::fabs(wd[(size_t)(n * c.k + k)]);

  p.x = make_acts(c.m, c.k, seed + 1);
  Rng rng(seed + 2);
  p.bias.resize((size_t)c.n);
  for (auto& b : p.bias) b = rng.uniform();
  p.yref.assign((size_t)(c.m * c.n), 0.f);
  p.yref_bias.assign((size_t)(c.m * c.n), 0.f);
  linear(p.x.data(), c.m, p.w, nullptr, p.yref.data(), Isa::Ref, 1);
  linear(p.x.data(), c.m, p.w, p.bias.data(), p.yref_bias.data(), Isa::Ref, 1);

  std::vector<int8_t> q((size_t)(c.m * c.k));
  std::vector<float> d((size_t)(c.m * G)), s((size_t)(c.m * G));
  quantize_acts_ref(p.x.data(), 0, c.m, c.k, c.group, q.data(), d.data(), s.data());
  p.bound.assign((size_t)(c.m * c.n), 0.f);
  for (int64_t m = 0; m < c.m; ++m)
    for (int64_t n = 0; n < c.n; ++n) {
      double b = 1e-6, xw = 0.0;
      for (int64_t g = 0; g < G; ++g) b += 0.5 * d[(size_t)(m * G + g)] * absw[(size_t)(n * G + g)];
      const float* xr = &p.x[(size_t)(m * c.k)];
      const float* wr = &wd[(size_t)(n * c.k)];
      for (int64_t k = 0; k < c.k; ++k) xw += std::fabs(xr[k] * wr[k]);
      p.bound[(size_t)(m * c.n + n)] = (float)(b + 1e-5 * xw);
    }
}

void test_linear(Stats& st, const Problem& p, Isa isa) {
  const Case& c = p.c;
  const std::string tag = fmt("linear %s g%d %s M=%lld N=%lld K=%lld", qtype_name(c.t), c.group, isa_name(isa),
                              (long long)c.m, (long long)c.n, (long long)c.k);
  const float nan = std::nanf("");
  std::vector<float> y((size_t)(c.m * c.n));
  std::string detail;
  for (int with_bias = 0; with_bias < 2; ++with_bias)
    for (int threads = 1; threads <= 2; ++threads) {
      // The oracle itself: only its threaded, biased driver path, on small problems.
      if (isa == Isa::Ref && !(with_bias && threads == 2 && c.m <= 5)) continue;
      std::fill(y.begin(), y.end(), nan);
      bool ok = true;
      try {
        linear(p.x.data(), c.m, p.w, with_bias ? p.bias.data() : nullptr, y.data(), isa, threads);
        ok = compare(p, y, with_bias ? p.yref_bias : p.yref, 0, c.n, nan, &detail);
        if (ok && isa == Isa::AvxVnni && isa_supported(Isa::Avx2)) {  // exact int32 dots: same bits
          std::vector<float> y2(y.size(), nan);
          linear(p.x.data(), c.m, p.w, with_bias ? p.bias.data() : nullptr, y2.data(), Isa::Avx2, threads);
          ok = std::memcmp(y.data(), y2.data(), y.size() * sizeof(float)) == 0;
          if (!ok) detail = "not bit-identical to avx2";
        }
      } catch (const std::exception& e) {
        ok = false;
        detail = e.what();
      }
      st.check(ok, fmt("%s bias=%d threads=%d", tag.c_str(), with_bias, threads), detail);
    }

  // The kernels directly on an odd slice: gemm (M >= 2) and, for few rows, gemv per row.
  if (isa == Isa::Ref && c.m > 5) return;
  const IsaKernels& kt = kernels_for(isa);
  const QKernels& qk = kt.q[(int)c.t];
  const int64_t n0 = c.n >= 3 ? 1 : 0, n1 = c.n >= 3 ? c.n - 1 : c.n, G = c.k / c.group;
  std::vector<int8_t> q((size_t)(c.m * c.k));
  std::vector<float> d((size_t)(c.m * G)), s((size_t)(c.m * G));
  if (kt.int8_acts) kt.quantize_acts(p.x.data(), 0, c.m, c.k, c.group, q.data(), d.data(), s.data());
  const float fill = 12345.f;
  for (int path = 0; path < 2; ++path) {
    const bool gemv = path == 0;
    if (gemv ? c.m > 5 : c.m < 2) continue;
    std::fill(y.begin(), y.end(), fill);
    if (gemv) {
      for (int64_t r = 0; r < c.m; ++r) {
        QActs ra{q.data() + r * c.k, d.data() + r * G, s.data() + r * G, 1, c.k, c.group};
        LinearArgs a{p.x.data() + r * c.k, kt.int8_acts ? &ra : nullptr, p.w, p.bias.data(), y.data() + r * c.n, 1};
        qk.gemv(a, n0, n1);
      }
    } else {
      QActs xa{q.data(), d.data(), s.data(), c.m, c.k, c.group};
      LinearArgs a{p.x.data(), kt.int8_acts ? &xa : nullptr, p.w, p.bias.data(), y.data(), c.m};
      qk.gemm(a, n0, n1);
    }
    const bool ok = compare(p, y, p.yref_bias, n0, n1, fill, &detail);
    st.check(ok, fmt("%s %s slice [%lld,%lld)", tag.c_str(), gemv ? "gemv" : "gemm", (long long)n0, (long long)n1), detail);
  }
}



// ---- decode attention with float32 / float16 KV caches -------------------------------------

void test_attend(Stats& st) {
  struct AttnCase { int64_t hq, hkv, hd, pos; };
  for (const AttnCase c : {AttnCase{12, 2, 128, 77}, AttnCase{18, 1, 64, 40}, AttnCase{3, 3, 24, 9}}) {
    for (bool f16 : {false, true}) {
      const int64_t hd = c.hd, ctx = c.pos + 2, n = c.pos + 1, rep = c.hq / c.hkv;
      uint64_t seed = (uint64_t)(c.hq * 131 + c.hd * 7 + c.pos + f16);
      auto rnd = [&seed] {  // uniform in [-1, 1)
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        return (float)((seed >> 40) * (1.0 / (1ull << 24)) * 2.0 - 1.0);
      };
      std::vector<float> q(c.hq * hd), k(c.hkv * hd), v(c.hkv * hd), cs(hd, 1.f), sn(hd, 0.f);
      std::vector<float> kc32(c.hkv * ctx * hd), vc32(c.hkv * ctx * hd);  // cache values (as stored)
      for (auto* a : {&q, &k, &v, &kc32, &vc32})
        for (float& x : *a) x = 2.f * rnd();
      std::vector<uint16_t> kc16(kc32.size()), vc16(vc32.size());
      for (size_t i = 0; i < kc32.size(); ++i) {
        kc16[i] = fp32_to_fp16(kc32[i]), vc16[i] = fp32_to_fp16(vc32[i]);
        if (f16) kc32[i] = fp16_to_fp32(kc16[i]), vc32[i] = fp16_to_fp32(vc16[i]);
      }
      for (int64_t g = 0; g < c.hkv; ++g)  // slot pos as the op stores it (cos 1, sin 0: no rotation)
        for (int64_t i = 0; i < hd; ++i) {
          const int64_t at = (g * ctx + c.pos) * hd + i;
          kc32[at] = f16 ? fp16_to_fp32(fp32_to_fp16(k[g * hd + i])) : k[g * hd + i];
          vc32[at] = f16 ? fp16_to_fp32(fp32_to_fp16(v[g * hd + i])) : v[g * hd + i];
        }
      const float scale = 1.f / std::sqrt((float)hd);
      double worst = 0;
      std::vector<float> out[2];
      bool stored = true;
      for (int threads : {1, 2}) {
        std::vector<float> kf = kc32, vf = vc32;
        std::vector<uint16_t> kh = kc16, vh = vc16;
        out[threads - 1].assign(c.hq * hd, 0.f);
        AttnDecodeArgs a{q.data(), k.data(), v.data(), f16 ? (void*)kh.data() : (void*)kf.data(),
                         f16 ? (void*)vh.data() : (void*)vf.data(), c.hq, c.hkv, hd, ctx, c.pos, hd, cs.data(),
                         sn.data(), nullptr, nullptr, 1e-6f, scale, out[threads - 1].data(), f16};
        attend_decode(a, threads);
        for (int64_t g = 0; g < c.hkv; ++g)
          for (int64_t i = 0; i < hd; ++i) {
            const int64_t at = (g * ctx + c.pos) * hd + i;
            const float ks = f16 ? fp16_to_fp32(kh[at]) : kf[at], vs = f16 ? fp16_to_fp32(vh[at]) : vf[at];
            stored = stored && ks == kc32[at] && vs == vc32[at];
          }
      }
      for (int64_t h = 0; h < c.hq; ++h) {  // double reference over the stored values
        const int64_t g = h / rep;
        std::vector<double> s(n);
        double mx = -1e300, sum = 0;
        for (int64_t j = 0; j < n; ++j) {
          double d = 0;
          for (int64_t i = 0; i < hd; ++i) d += (double)q[h * hd + i] * kc32[(g * ctx + j) * hd + i];
          s[j] = d * scale;
          mx = std::max(mx, s[j]);
        }
        for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
        for (int64_t i = 0; i < hd; ++i) {
          double o = 0;
          for (int64_t j = 0; j < n; ++j) o += s[j] / sum * vc32[(g * ctx + j) * hd + i];
          worst = std::max(worst, std::fabs(o - out[0][h * hd + i]));
        }
      }
      // |v| <= 2 and |q.k| <= 4 hd: float32 scores/softmax/sums stay within ~1e-5 of double here
      const std::string what = fmt("attend_decode %s hq=%lld hkv=%lld hd=%lld pos=%lld", f16 ? "f16" : "f32",
                                   (long long)c.hq, (long long)c.hkv, (long long)hd, (long long)c.pos);
      st.check(stored && worst <= 1e-4 && out[0] == out[1], what,
               fmt("stored slot exact: %d, max |out - ref| %.3g, threads 1 == 2: %d", (int)stored, worst,
                   (int)(out[0] == out[1])));
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  using namespace ev;
  const auto t_start = std::chrono::steady_clock::now();
  Stats st;
  const char* expect = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--expect-isa") && i + 1 < argc) {
      expect = argv[++i];
    } else if (!std::strcmp(argv[i], "--verbose")) {
      st.verbose = true;
    } else {
      std::fprintf(stderr, "usage: %s [--expect-isa %s] [--verbose]\n", argv[0], isa_names());
      return 2;
    }
  }

  const CpuFeatures& f = cpu_features();
#if defined(__aarch64__)
  std::printf("arch: aarch64  neon=%d dotprod=%d i8mm=%d\n", (int)f.neon, (int)f.dotprod, (int)f.i8mm);
#elif defined(__x86_64__)
  std::printf("arch: x86-64  avx2=%d fma=%d f16c=%d avx_vnni=%d\n", (int)f.avx2, (int)f.fma, (int)f.f16c,
              (int)f.avxvnni);
#else
  std::printf("arch: other\n");
#endif

  std::vector<Isa> isas;
  std::string tested, skipped;
  for (int i = 0; i < kNumIsas; ++i) {
    const Isa isa = (Isa)i;
    if (isa_supported(isa)) {
      isas.push_back(isa);
      tested += std::string(" ") + isa_name(isa);
    } else {
      skipped += fmt("\n  %s: %s", isa_name(isa), isa_compiled(isa) ? cpu_reason(isa) : "not compiled into this build");
    }
  }
  std::printf("ISAs tested:%s\n", tested.c_str());
  std::printf("ISAs skipped:%s\n", skipped.empty() ? " none" : skipped.c_str());

  try {
    const Isa def = default_isa();
    std::printf("default ISA: %s\n", isa_name(def));
    if (expect) {
      Isa want;
      if (!parse_isa(expect, &want)) {
        st.check(false, fmt("--expect-isa %s", expect), fmt("unknown ISA name (%s)", isa_names()));
      } else {
        st.check(def == want, fmt("default ISA is %s", expect), fmt("dispatch chose %s", isa_name(def)));
      }
    }
  } catch (const std::exception& e) {
    st.check(false, "default_isa()", e.what());
  }

  set_num_threads(2);  // so threads=2 really splits N, whatever the host's core count

  test_pack(st);
  test_attend(st);

  long ties = 0;
  for (Isa isa : isas) {
    try {
      test_quantize(st, isa, &ties);
    } catch (const std::exception& e) {
      st.check(false, fmt("quantize_acts %s", isa_name(isa)), e.what());
    }
  }
  std::printf("quantize_acts: %ld differences at exact .5 ties\n", ties);

  const int64_t Ms[] = {1, 2, 3, 5, 16, 17, 197};
  const int64_t Ns[] = {1, 7, 8, 9, 33, 100};
  // K covers every partial-unit case: K % 128 = 32 / 64 / 96 (q2/q3 tails, g32/g64),
  // K % 64 = 32 (q4 tail, g32), G % 4 != 0, several whole chunks plus a tail.
  const int64_t Ks[] = {32, 64, 96, 128, 160, 192, 224, 256, 384, 1024};
  long cases = 0;
  double t_setup = 0, t_isa[kNumIsas] = {};
  for (int ti = 0; ti < kNumQTypes; ++ti)
    for (int group : {16, 32, 64, 128})
      for (int64_t K : Ks) {
        if (K % group || !valid_group((QType)ti, group)) continue;  // q2b: group 16 only
        for (int64_t N : Ns)
          for (int64_t M : Ms) {
            // Keeps the qemu run short: K = 1024 only with N = 8 and 33; M = 197 (many row
            // tiles, a ragged last one, several GEMM row blocks at K = 1024) only with N = 9.
            if (M == 197 ? N != 9 : (K == 1024 && N != 8 && N != 33)) continue;
            const auto t0 = std::chrono::steady_clock::now();
            Problem p;
            p.c = Case{(QType)ti, group, M, N, K};
            const uint64_t seed = (uint64_t)(ti * 7919 + group * 104729 + K * 31 + N * 1009 + M * 17);
            try {
              make_problem(p, seed);
            } catch (const std::exception& e) {
              st.check(false, "make_problem", e.what());
              continue;
            }
            ++cases;
            const auto t1 = std::chrono::steady_clock::now();
            t_setup += std::chrono::duration<double>(t1 - t0).count();
            for (Isa isa : isas) {
              const auto ti0 = std::chrono::steady_clock::now();
              try {
                test_linear(st, p, isa);
              } catch (const std::exception& e) {
                st.check(false, fmt("linear %s", isa_name(isa)), e.what());
              }
              t_isa[(int)isa] += std::chrono::duration<double>(std::chrono::steady_clock::now() - ti0).count();
            }
          }
      }

  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::printf("%ld linear problems x %zu ISAs in %.1f s (reference + bounds %.1f s", cases, isas.size(), secs, t_setup);
  for (Isa isa : isas) std::printf(", %s %.1f s", isa_name(isa), t_isa[(int)isa]);
  std::printf(")\n");
  std::printf("%ld passed, %ld failed\n", st.passed, st.failed);
  return st.failed ? 1 : 0;
}
