// encode_ops.cc — the portable build of encode_impl.h (8-float vectors: two SSE2 / NEON
// registers) and the dispatch of encode_ops.h: the AVX-512 build runs when the kernels' default
// ISA is avx512vnni, the AVX2+FMA build when it is avx2 or avxvnni (EDGEVLM_ISA=ref gives the
// portable code, as for the decode glue).
#define EV_ENCODE_NS encode_portable
#define EV_ENCODE_LANES 8
#include "encode_impl.h"

#include "../kernels/kernels.h"

namespace ev {

namespace {
enum class Build { Portable, Avx2, Avx512 };
Build build() {
#if defined(EDGEVLM_HAVE_AVX512VNNI)
  if (default_isa() == Isa::Avx512Vnni) return Build::Avx512;
#endif
#if defined(EDGEVLM_HAVE_AVX2)
  if (isa_has_avx2(default_isa())) return Build::Avx2;
#endif
  return Build::Portable;
}
}  // namespace

void gelu_inplace(float* x, int64_t n, Gelu kind, int threads) {
  switch (build()) {
#if defined(EDGEVLM_HAVE_AVX512VNNI)
    case Build::Avx512: return gelu_inplace_avx512(x, n, kind, threads);
#endif
#if defined(EDGEVLM_HAVE_AVX2)
    case Build::Avx2: return gelu_inplace_avx2(x, n, kind, threads);
#endif
    default: return encode_portable::gelu_inplace(x, n, kind, threads);
  }
}

void layer_norm_rows(const float* x, int64_t rows, int64_t d, const float* w, const float* b, float eps, float* y,
                     int threads) {
  switch (build()) {
#if defined(EDGEVLM_HAVE_AVX512VNNI)
    case Build::Avx512: return layer_norm_rows_avx512(x, rows, d, w, b, eps, y, threads);
#endif
#if defined(EDGEVLM_HAVE_AVX2)
    case Build::Avx2: return layer_norm_rows_avx2(x, rows, d, w, b, eps, y, threads);
#endif
    default: return encode_portable::layer_norm_rows(x, rows, d, w, b, eps, y, threads);
  }
}

void attend_encode(const AttnEncodeArgs& a, int threads) {
  switch (build()) {
#if defined(EDGEVLM_HAVE_AVX512VNNI)
    case Build::Avx512: return attend_encode_avx512(a, threads);
#endif
#if defined(EDGEVLM_HAVE_AVX2)
    case Build::Avx2: return attend_encode_avx2(a, threads);
#endif
    default: return encode_portable::attend_encode(a, threads);
  }
}

}  // namespace ev
