// q8_impl.h — 8-bit symmetric kernels (layout: qtypes/q8.h): codes are int8 in natural
// order, used in place (no unpack). maddubs needs an unsigned operand, so each 32-code
// step is |w| x sign(x, w) (= w*x per byte); pair sums reach 127*127*2 = 32258, so each
// maddubs result is widened to int32 at once (VNNI: vpdpbusd takes the same |w|, sign(x, w)
// operands into int32 directly). No mins. Loops: common_avx2.h. Shared by the
// avx2 and avxvnni builds (namespace EV_X86_NS; see common_avx2.h).
#pragma once

#include <cstring>

#include "common_avx2.h"

namespace ev {
namespace EV_X86_NS {

struct Q8Codes {
  static constexpr int64_t kSbBytes = 128;
  static constexpr bool kSigned = true;
  static EV_INLINE void load128(const uint8_t* row, int64_t k0, __m256i c[4]) {
    for (int j = 0; j < 4; ++j) c[j] = ld(row + k0 + 32 * j);
  }
  static void unpack_tail(const uint8_t* row, int64_t k0, int64_t n, uint8_t* buf) {
    std::memcpy(buf, row + k0, (size_t)n);
  }
  // The GEMM reads the codes where they are.
  static EV_INLINE const uint8_t* prepare(const uint8_t* row, int64_t k0, int64_t, uint8_t*) {
    return row + k0;
  }
};

}  // namespace EV_X86_NS
}  // namespace ev
