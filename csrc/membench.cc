// membench.cc — see membench.h. Plain C++ that compilers vectorise; eight independent
// accumulators keep enough loads in flight that DRAM, not latency, is the limit.
#include "membench.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "threadpool.h"

namespace ev {

uint64_t stream_read(const uint8_t* buf, int64_t nbytes, int threads) {
  const int64_t lines = nbytes / 64;
  if (threads <= 0) threads = get_num_threads();
  threads = std::max(1, std::min(threads, get_num_threads()));
  std::vector<uint64_t> sums((size_t)threads * 8, 0);  // 8 words apart: no false sharing
  parallel_for(threads, [&](int t) {
    const int64_t l0 = lines * t / threads, l1 = lines * (t + 1) / threads;
    uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t l = l0; l < l1; ++l) {
      uint64_t v[8];
      std::memcpy(v, buf + l * 64, 64);
      for (int i = 0; i < 8; ++i) acc[i] += v[i];
    }
    for (int i = 0; i < 8; ++i) sums[(size_t)t * 8 + i] = acc[i];
  });
  uint64_t total = 0;
  for (uint64_t v : sums) total += v;
  return total;
}

}  // namespace ev
