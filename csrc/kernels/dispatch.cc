// dispatch.cc — fills the kernel table once per ISA and picks the default ISA. The only
// place that knows which ISAs exist; the EDGEVLM_HAVE_* macros come from CMakeLists.txt
// (set exactly when that ISA's files are compiled in).
#include <cstdlib>
#include <cstring>

#include "../cpu_features.h"
#include "kernels.h"
#include "ref/ref.h"
#ifdef EDGEVLM_HAVE_AVX2
#include "avx2/avx2.h"
#endif
#ifdef EDGEVLM_HAVE_AVXVNNI
#include "avxvnni/avxvnni.h"
#endif
#ifdef EDGEVLM_HAVE_AVX512VNNI
#include "avx512vnni/avx512vnni.h"
#endif
#ifdef EDGEVLM_HAVE_NEON
#include "neon/neon.h"
#include "neondot/neondot.h"
#endif

namespace ev {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Ref: return "ref";
    case Isa::Avx2: return "avx2";
    case Isa::Neon: return "neon";
    case Isa::NeonDot: return "neondot";
    case Isa::AvxVnni: return "avxvnni";
    case Isa::Avx512Vnni: return "avx512vnni";
  }
  return "?";
}

const char* isa_names() { return "ref|avx2|avxvnni|avx512vnni|neon|neondot"; }

bool isa_has_avx2(Isa isa) { return isa == Isa::Avx2 || isa == Isa::AvxVnni || isa == Isa::Avx512Vnni; }

bool parse_isa(const char* name, Isa* out) {
  for (int i = 0; i < kNumIsas; ++i)
    if (std::strcmp(name, isa_name((Isa)i)) == 0) { *out = (Isa)i; return true; }
  return false;
}

namespace {

IsaKernels make_ref() {
  IsaKernels t;
  t.isa = Isa::Ref;
  t.int8_acts = false;
  t.gemm_min_m = 2;
  t.quantize_acts = quantize_acts_ref;
  for (auto& q : t.q) q = {linear_ref, linear_ref};
  return t;
}

#define EV_QTABLE(t, isa)                           \
  t.q[(int)QType::Q2] = {gemv_q2_##isa, gemm_q2_##isa}; \
  t.q[(int)QType::Q3] = {gemv_q3_##isa, gemm_q3_##isa}; \
  t.q[(int)QType::Q4] = {gemv_q4_##isa, gemm_q4_##isa}; \
  t.q[(int)QType::Q8] = {gemv_q8_##isa, gemm_q8_##isa}; \
  t.q[(int)QType::Q2B] = {gemv_q2b_##isa, gemm_q2b_##isa};

const IsaKernels* table(Isa isa) {
  static const IsaKernels ref = make_ref();
#ifdef EDGEVLM_HAVE_AVX2
  static const IsaKernels avx2 = [] {
    IsaKernels t;
    t.isa = Isa::Avx2;
    t.int8_acts = true;
    t.gemm_min_m = 2;
    t.quantize_acts = quantize_acts_avx2;
    EV_QTABLE(t, avx2)
    return t;
  }();
#endif
#ifdef EDGEVLM_HAVE_AVXVNNI
  static const IsaKernels avxvnni = [] {  // the AVX2 loops with vpdpbusd; AVX2 quantizer
    IsaKernels t;
    t.isa = Isa::AvxVnni;
    t.int8_acts = true;
    t.gemm_min_m = 2;
    t.quantize_acts = quantize_acts_avx2;
    EV_QTABLE(t, avxvnni)
    return t;
  }();
#endif
#ifdef EDGEVLM_HAVE_AVX512VNNI
  static const IsaKernels avx512vnni = [] {
    // zmm GEMM for q2/q3/q4/q8; GEMV (bandwidth-bound: zmm brings nothing) and q2b from the
    // AVX-VNNI build when the CPU has AVX-VNNI (Sapphire Rapids+), else from AVX2 (Ice Lake,
    // Cascade Lake: AVX-512 VNNI without the VEX form).
    IsaKernels t;
    t.isa = Isa::Avx512Vnni;
    t.int8_acts = true;
    t.gemm_min_m = 2;
    t.quantize_acts = quantize_acts_avx2;
#ifdef EDGEVLM_HAVE_AVXVNNI
    const bool vex = cpu_features().avxvnni;
#else
    const bool vex = false;
#endif
    if (vex) {
#ifdef EDGEVLM_HAVE_AVXVNNI
      EV_QTABLE(t, avxvnni)
#endif
    } else {
      EV_QTABLE(t, avx2)
    }
    t.q[(int)QType::Q2].gemm = gemm_q2_avx512vnni;
    t.q[(int)QType::Q3].gemm = gemm_q3_avx512vnni;
    t.q[(int)QType::Q4].gemm = gemm_q4_avx512vnni;
    t.q[(int)QType::Q8].gemm = gemm_q8_avx512vnni;
    return t;
  }();
#endif
#ifdef EDGEVLM_HAVE_NEON
  static const IsaKernels neon = [] {
    IsaKernels t;
    t.isa = Isa::Neon;
    t.int8_acts = true;
    t.gemm_min_m = 2;
    t.quantize_acts = quantize_acts_neon;
    EV_QTABLE(t, neon)
    return t;
  }();
  static const IsaKernels neondot = [] {
    IsaKernels t;
    t.isa = Isa::NeonDot;
    t.int8_acts = true;
    t.gemm_min_m = 2;
    t.quantize_acts = quantize_acts_neon;
    EV_QTABLE(t, neondot)
    return t;
  }();
#endif
  switch (isa) {
    case Isa::Ref: return &ref;
#ifdef EDGEVLM_HAVE_AVX2
    case Isa::Avx2: return &avx2;
#endif
#ifdef EDGEVLM_HAVE_AVXVNNI
    case Isa::AvxVnni: return &avxvnni;
#endif
#ifdef EDGEVLM_HAVE_AVX512VNNI
    case Isa::Avx512Vnni: return &avx512vnni;
#endif
#ifdef EDGEVLM_HAVE_NEON
    case Isa::Neon: return &neon;
    case Isa::NeonDot: return &neondot;
#endif
    default: return nullptr;
  }
}

bool cpu_has(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::Ref: return true;
    case Isa::Avx2: return f.avx2 && f.fma && f.f16c;
    case Isa::Neon: return f.neon;
    case Isa::NeonDot: return f.neon && f.dotprod;
    case Isa::AvxVnni: return f.avx2 && f.fma && f.f16c && f.avxvnni;
    case Isa::Avx512Vnni: return f.avx2 && f.fma && f.f16c && f.avx512vnni;
  }
  return false;
}

Isa detect_default() {
  if (const char* env = std::getenv("EDGEVLM_ISA")) {
    Isa want;
    if (!parse_isa(env, &want))
      fail("EDGEVLM_ISA", "expected one of ", isa_names(), ", got '", env, "'");
    if (!isa_supported(want))
      fail("EDGEVLM_ISA", "ISA '", env, "' is ", isa_compiled(want) ? "not supported by this CPU" : "not compiled into this build",
           "; unset EDGEVLM_ISA or choose another");
    return want;
  }
  for (Isa isa : {Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2, Isa::NeonDot, Isa::Neon})
    if (isa_supported(isa)) return isa;
  return Isa::Ref;
}

}  // namespace

bool isa_compiled(Isa isa) { return table(isa) != nullptr; }
bool isa_supported(Isa isa) { return isa_compiled(isa) && cpu_has(isa); }

Isa default_isa() {
  static const Isa isa = detect_default();  // once; a bad EDGEVLM_ISA throws every call
  return isa;
}

const IsaKernels& kernels_for(Isa isa) {
  if (!isa_supported(isa))
    fail("kernels", "ISA '", isa_name(isa), "' is ",
         isa_compiled(isa) ? "not supported by this CPU" : "not compiled into this build");
  return *table(isa);
}

}  // namespace ev
