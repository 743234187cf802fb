// cpu_features.h — what the CPU we run on can execute, detected once.
#pragma once

namespace ev {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;  // x86-64 (OS support for YMM state checked)
  bool avxvnni = false;  // x86-64: VEX-encoded AVX-VNNI (vpdpbusd on ymm), YMM state checked
  bool neon = false, dotprod = false, i8mm = false;  // aarch64
};

// Detected on first call (cpuid/xgetbv on x86-64, getauxval on aarch64), then cached.
const CpuFeatures& cpu_features();

}  // namespace ev
