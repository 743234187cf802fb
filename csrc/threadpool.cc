// threadpool.cc — see threadpool.h. A generation counter announces a job; the caller and the
// workers claim its tasks from one atomic counter; the caller waits until all are done.
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
    for (int t = 1; t < n_threads_; ++t) workers_.emplace_back([this, gen] { worker(gen); });
  }

  // Tasks are claimed from one atomic word, (generation << 32) | next task, so any thread
  // runs any task: the caller keeps claiming until none is left and then waits only for the
  // tasks others have started. Why: on a shared or oversubscribed CPU (a robot's other
  // processes, a busy CI box) a worker can be descheduled for a whole time slice; with fixed
  // task-to-thread slices the caller spun for it (SmolVLM-256M decode: 255 tok/s idle, 6 tok/s
  // next to four busy processes on 2 cores). Now a late worker finds nothing to claim.
  void run(int n, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> run_lock(run_mu_);
    if (n <= 0) return;
    if (n == 1 || n_threads_ == 1) {
      for (int t = 0; t < n; ++t) fn(t);
      return;
    }
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &fn;
      ntasks_ = n;
      done_.store(0, std::memory_order_relaxed);
      gen = (generation_.load(std::memory_order_relaxed) + 1) & 0xffffffffu;
      claim_.store(gen << 32, std::memory_order_relaxed);
      generation_.store(gen, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    work(gen, fn, n);
    // Wait for tasks started by workers: spin briefly, then yield the core to them.
    for (int spins = 0; done_.load(std::memory_order_acquire) != n; ++spins) {
      if (spins < 2000) EV_PAUSE();
      else std::this_thread::yield();
    }
  }

 private:
  // Claims and runs tasks of generation gen until none is left. A claim succeeds only while
  // the word still carries gen, so a worker waking late never runs a task of another job, and
  // fn is only called for a claimed task (its job cannot have returned yet: run() waits for
  // every claimed task).
  void work(uint64_t gen, const std::function<void(int)>& fn, int n) {
    for (;;) {
      uint64_t c = claim_.load(std::memory_order_acquire);
      int t;
      for (;;) {
        if ((c >> 32) != gen) return;
        t = (int)(c & 0xffffffffu);
        if (t >= n) return;
        if (claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) break;
      }
      fn(t);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void worker(uint64_t seen) {
    for (;;) {
      // Spin ~100 us for the next job before sleeping: decode issues one call per layer
      // back to back, and a futex wake costs more than a small GEMV.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
      while (generation_.load(std::memory_order_acquire) == seen && !stop_.load()) {
        EV_PAUSE();
        if (std::chrono::steady_clock::now() > spin_until) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_.fetch_add(1, std::memory_order_acq_rel);
          cv_.wait(lk, [&] { return generation_.load() != seen || stop_.load(); });
          sleepers_.fetch_sub(1, std::memory_order_acq_rel);
        }
      }
      if (stop_.load()) return;
      const std::function<void(int)>* job;
      int n;
      {
        // generation, job and task count are published together under mu_.
        std::lock_guard<std::mutex> lk(mu_);
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
        n = ntasks_;
      }
      work(seen, *job, n);
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
  std::atomic<uint64_t> claim_{0};  // (generation << 32) | next unclaimed task
  std::atomic<int> done_{0};        // tasks of the current job finished
  std::atomic<int> sleepers_{0};    // workers blocked on cv_ (notify only when > 0)
  std::atomic<bool> stop_{false};
  const std::function<void(int)>* job_ = nullptr;
  int ntasks_ = 0;
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
