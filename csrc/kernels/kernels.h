// kernels.h — the kernel table: one set of function pointers per (ISA, quant type).
//
// Contract of every linear kernel (reference and SIMD alike):
//   Y[M, N] = X[M, K] . dequant(W)[N, K]^T (+ bias[N]),  fp32 in / fp32 out,
// computed for output columns n in [n0, n1) only (threads split N; see linear.cc).
// X and Y are row-major and contiguous (row strides K and N). K is a multiple of the
// group size. Kernels never allocate, never throw and never touch Python.
//
// SIMD kernels may use activations quantized to int8 per (row, group) by the ISA's
// quantize_acts (QActs below); the reference always uses the exact fp32 X. The error
// this adds is bounded per output by  sum_g (d[m,g] / 2) * sum_{k in g} |w[n,k]|
// (round-to-nearest of x / d), which tests/test_kernels.py checks.
// q8 weights (linear.cc, every int8 ISA): the kernels run twice, on x's codes and on those
// of its residual r = x - d*q (|r| <= d/2, exact in fp32; quantized alike: d2 = max|r over
// the group| / 127 <= d/254), y = pass 1 (+ bias) + pass 2 (one fp32 add), so the term is
// sum_g (d2[m,g] / 2) * sum_{k in g} |w[n,k]|: ~15-bit activations, so 8-bit files match fp32
// to cosine >= 0.9999. Costs a second pass: ~2.1x q8 GEMM time; GEMV runs both passes per
// L2-sized chunk of W, so W is streamed from memory once (~1.35x; 2.0x streaming it twice).
#pragma once

#include <cstdint>

#include "../qtypes/qtype.h"

namespace ev {

// AvxVnni: the AVX2 kernels with the AVX-VNNI integer dot (a superset of Avx2: same
// QActs, same results bit for bit). Appended, so the existing values stay stable.
// Avx512Vnni: GEMM with zmm vpdpbusd (csrc/kernels/avx512vnni); GEMV and q2b from avxvnni
// (or avx2 where the CPU lacks AVX-VNNI); same QActs as Avx2.
enum class Isa : int { Ref = 0, Avx2 = 1, Neon = 2, NeonDot = 3, AvxVnni = 4, Avx512Vnni = 5 };
constexpr int kNumIsas = 6;
const char* isa_name(Isa isa);
// "ref|avx2|avxvnni|avx512vnni|neon|neondot": every ISA name, for error messages.
const char* isa_names();
// True for the ISAs whose CPUs run the AVX2+FMA code (avx2, avxvnni, avx512vnni): callers with only an
// AVX2 build of their own code (e.g. the decode glue) use it for both.
bool isa_has_avx2(Isa isa);

// X quantized per group along K (group = the weight group size, so one int8 dot per
// weight group is scaled once):  x[m, k] ~= d[m, g] * q[m, k],  q in [-127, 127],
// d = max|x over the group| / 127;  s[m, g] = d[m, g] * sum_{k in g} q[m, k]
// (the group sum of the dequantized activations, which multiplies the weight min).
struct QActs {
  const int8_t* q;  // [M, K]
  const float* d;   // [M, G]
  const float* s;   // [M, G]
  int64_t m, k;
  int group;
};

struct LinearArgs {
  const float* x;     // [M, K] fp32
  const QActs* xq;    // int8 activations; nullptr for kernels that don't use them
  QMatrix w;          // packed W[N, K]
  const float* bias;  // [N] or nullptr
  float* y;           // [M, N]
  int64_t m;
};

using LinearFn = void (*)(const LinearArgs& a, int64_t n0, int64_t n1);
// Quantizes rows [m0, m1) of x (layout above) into the QActs buffers.
using QuantizeActsFn = void (*)(const float* x, int64_t m0, int64_t m1, int64_t k, int group,
                                int8_t* q, float* d, float* s);

struct QKernels {
  LinearFn gemv = nullptr;  // M == 1: streams W once
  LinearFn gemm = nullptr;  // M >= 2: register/cache-blocked over M and N
};

struct IsaKernels {
  Isa isa = Isa::Ref;
  bool int8_acts = false;  // true: gemv/gemm read LinearArgs::xq
  // Smallest M for which gemm beats running gemv per row; below it gemv is used.
  int64_t gemm_min_m = 2;
  QuantizeActsFn quantize_acts = nullptr;
  QKernels q[kNumQTypes];
};

// dispatch.cc: the best compiled ISA the CPU supports, chosen once (preference: avx512vnni,
// avxvnni, avx2, neondot, neon, ref; EDGEVLM_ISA overrides: ref|avx2|avxvnni|avx512vnni|neon|neondot).
Isa default_isa();
bool isa_compiled(Isa isa);
bool isa_supported(Isa isa);  // compiled and the CPU has the features
const IsaKernels& kernels_for(Isa isa);
bool parse_isa(const char* name, Isa* out);

// Reference helpers used by tests, bindings and the fallback path (kernels/ref).
void quantize_acts_ref(const float* x, int64_t m0, int64_t m1, int64_t k, int group, int8_t* q,
                       float* d, float* s);
void quantize_rows_ref(QType t, const float* w, int64_t n, int64_t k, int group, uint8_t* blob);
void dequant_rows_ref(const QMatrix& w, int64_t r0, int64_t r1, float* out);

}  // namespace ev
