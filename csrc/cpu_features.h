// cpu_features.h — what the CPU we run on can execute, detected once.
#pragma once

namespace ev {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;  // x86-64 (OS support for YMM state checked)
  bool avxvnni = false;  // x86-64: VEX-encoded AVX-VNNI (vpdpbusd on ymm), YMM state checked
  // x86-64: AVX-512 F + BW + VL + VNNI (vpdpbusd on zmm), ZMM/opmask state checked (XCR0 bits 1,2,5-7).
  bool avx512vnni = false;
  bool neon = false, dotprod = false, i8mm = false;  // aarch64
};

// Detected on first call (cpuid/xgetbv on x86-64, getauxval on aarch64), then cached.
const CpuFeatures& cpu_features();

}  // namespace ev
