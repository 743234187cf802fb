// cpu_features.cc — runtime CPU feature detection. Only this file asks the hardware.
#include "cpu_features.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#elif defined(__aarch64__)
#include <sys/auxv.h>
#endif

namespace ev {

static CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (__get_cpuid(1, &a, &b, &c, &d)) {
    const bool osxsave = c & (1u << 27);
    f.fma = c & (1u << 12);
    f.f16c = c & (1u << 29);
    bool ymm_ok = false;
    bool zmm_ok = false;
    if (osxsave) {  // the OS must save YMM state, or AVX instructions fault
      unsigned lo, hi;
      __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
      ymm_ok = (lo & 0x6) == 0x6;
      zmm_ok = (lo & 0xE6) == 0xE6;  // + opmask, upper ZMM0-15, ZMM16-31 (AVX-512)
    }
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
      f.avx2 = ymm_ok && (b & (1u << 5));
      // Leaf 7 subleaf 0 EAX = the highest subleaf; subleaf 1 EAX bit 4 = AVX-VNNI.
      const unsigned max_sub = a;
      // EBX[16] AVX512F, EBX[30] AVX512BW, EBX[31] AVX512VL, ECX[11] AVX512_VNNI.
      f.avx512vnni = zmm_ok && (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31)) && (c & (1u << 11));
      if (max_sub >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avxvnni = ymm_ok && (a & (1u << 4));
    }
    f.fma = f.fma && ymm_ok;
    f.f16c = f.f16c && ymm_ok;
  }
#elif defined(__aarch64__)
  f.neon = true;  // Advanced SIMD is mandatory on AArch64
  const unsigned long hw = getauxval(AT_HWCAP);
  f.dotprod = hw & (1UL << 20);  // HWCAP_ASIMDDP
  const unsigned long hw2 = getauxval(AT_HWCAP2);
  f.i8mm = hw2 & (1UL << 13);  // HWCAP2_I8MM
#endif
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

}  // namespace ev
