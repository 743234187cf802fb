// membench.h — a streaming read used by the benchmark to measure the machine's memory
// read bandwidth with the same thread pool the kernels use (the GEMV roofline).
#pragma once

#include <cstdint>

namespace ev {

// Reads every byte of buf[0, nbytes) once, split over `threads` threads; returns a
// checksum so the compiler cannot drop the loads. nbytes is rounded down to 64.
uint64_t stream_read(const uint8_t* buf, int64_t nbytes, int threads);

}  // namespace ev
