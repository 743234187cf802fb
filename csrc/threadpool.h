// threadpool.h — a small persistent pool for splitting one kernel call over cores.
//
// Why not std::thread per call: creating threads costs ~20-50 us, more than a whole
// 4096x4096 4-bit GEMV. Workers spin briefly after a job (the next layer's call usually
// comes within microseconds during decoding) and then sleep on a condition variable.
#pragma once

#include <functional>

namespace ev {

// Threads used by kernels (caller included). Default: all online CPUs. n >= 1.
void set_num_threads(int n);
int get_num_threads();

// Runs fn(t) for every t in [0, n) and returns when all are done. The tasks are shared out
// dynamically: the calling thread and the pool's workers each claim the next unclaimed t, so
// any thread may run any task (and one thread several), and a descheduled worker delays
// nothing it has not started. Tasks must therefore not wait for each other. Calls from
// several threads are serialised. fn must not throw.
void parallel_for(int n, const std::function<void(int)>& fn);

}  // namespace ev
