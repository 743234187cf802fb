// threadpool.cc — see threadpool.h. A generation counter announces a job; each worker
// runs its slice and decrements `pending`; the caller waits for pending == 0.
#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define EV_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define EV_PAUSE() __asm__ __volatile__("yield")
#else
#define EV_PAUSE() ((void)0)
#endif

namespace ev {
namespace {

class Pool {
 public:
  explicit Pool(int n) { resize(n); }
  ~Pool() { stop_workers(); }

  int size() const { return n_threads_; }

  void resize(int n) {
    std::lock_guard<std::mutex> run_lock(run_mu_);
    stop_workers();
    n_threads_ = std::max(1, n);
    stop_ = false;
    // Each worker starts from the generation current NOW (no job can be published while
    // run_mu_ is held): reading it inside the new thread instead could skip a job posted
    // before the thread got scheduled, and the caller would wait for it forever.
    const uint64_t gen = generation_.load(std::memory_order_acquire);
    for (int t = 1; t < n_threads_; ++t) workers_.emplace_back([this, t, gen] { worker(t, gen); });
  }

  void run(int n, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> run_lock(run_mu_);
    n = std::max(1, std::min(n, n_threads_));
    if (n == 1) { fn(0); return; }
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &fn;
      active_ = n;
      pending_.store(n - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    fn(0);
    while (pending_.load(std::memory_order_acquire) != 0) EV_PAUSE();
  }

 private:
  void worker(int id, uint64_t seen) {
    for (;;) {
      // Spin ~100 us for the next job before sleeping: decode issues one call per layer
      // back to back, and a futex wake costs more than a small GEMV.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
      while (generation_.load(std::memory_order_acquire) == seen && !stop_.load()) {
        EV_PAUSE();
        if (std::chrono::steady_clock::now() > spin_until) {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return generation_.load() != seen || stop_.load(); });
        }
      }
      if (stop_.load()) return;
      const std::function<void(int)>* job;
      int active;
      {
        // generation, job and active are published together under mu_: reading them
        // together means a worker that was idle for a job never runs a later one twice.
        std::lock_guard<std::mutex> lk(mu_);
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
        active = active_;
      }
      if (id < active) {
        (*job)(id);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  std::mutex run_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int)>* job_ = nullptr;
  int active_ = 0;
  int n_threads_ = 1;
};

Pool& pool() {
  static Pool* p = new Pool((int)std::max(1u, std::thread::hardware_concurrency()));
  return *p;  // leaked on purpose: joining threads during static destruction can deadlock
}

}  // namespace

void set_num_threads(int n) {
  if (n != pool().size()) pool().resize(n);
}
int get_num_threads() { return pool().size(); }
void parallel_for(int n, const std::function<void(int)>& fn) { pool().run(n, fn); }

}  // namespace ev
