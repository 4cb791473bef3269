// The kernels' own threads: parallel_chunks(n, chunk, f) runs f(begin, end) over [0, n) in chunks that the calling
// thread and the pool's workers CLAIM one at a time, instead of at::parallel_for's one fixed block a thread.
//
// Why (issue "CPU decode that holds its speed on a busy machine"): a decode step is ~5 parallel regions a layer
// (150 a SmolLM2 token). With OpenMP's static blocks a thread the OS has descheduled holds its block, and every
// other thread spins at the region's end until it runs again: with one CPU hog beside two threads on two cores,
// SmolLM2 kept 0.18-0.24 of its quiet speed, less than one thread alone. Here:
// - work is claimed dynamically (a compare-and-swap on a word a block: WorkPool::run), so a thread that runs takes
//   more chunks and one that does not claims nothing: with every worker descheduled the caller computes the whole
//   region itself, as one thread would ("never worse than one thread");
// - a worker waits for the next region spinning at most kWorkerSpinNs (the gaps between a token's regions are
//   microseconds, between tokens ~100 us; an idle generator's workers sleep), then sleeps on a futex; the caller,
//   once no chunk is left to claim, spins at most kCallerSpinNs for the chunks still running, then sleeps until
//   the last one ends. Past a few hundred rounds a spin yields the core: nobody spins against a thread that is
//   waiting for it.
// - the caller wakes sleeping workers with one futex call, only when some sleep.
// Results do not depend on which thread computes a chunk, nor on the chunk size: every kernel computes whole
// outputs in a chunk (gemv_rows.h, attend.h), so the bits are the same with any number of threads.
//
// One pool a process (parallel_chunks' static), sized at every call to torch's thread count (torch.set_num_threads;
// or the count hold_threads kept while torch's is lowered):
// threads - 1 workers take part, the caller being the last. Serial where a region has one chunk, with one thread,
// inside a pool worker, or inside an OpenMP region. A forked child starts a pool of its own (the parent's workers
// do not exist there). f must not throw (the kernels check their arguments before their regions).
#pragma once

#include <ATen/Parallel.h>

#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <limits>
#include <mutex>
#include <thread>
#include <type_traits>

namespace torchchat_cpu {

namespace pool_detail {

inline void futex_wait(std::atomic<uint32_t> *word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t *>(word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

inline void futex_wake(std::atomic<uint32_t> *word, int n) {
  syscall(SYS_futex, reinterpret_cast<uint32_t *>(word), FUTEX_WAKE_PRIVATE, n, nullptr, nullptr, 0);
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Spin until ready() or max_ns have passed; returns ready()'s last answer. The first kPauseSpins rounds pause (the
// answer usually comes within a microsecond or two), later ones yield the core (sched_yield) to whatever else is
// runnable on it: the thread this one waits for, or another process.
constexpr int kPauseSpins = 256;
template <typename Ready>
inline bool spin_until(Ready &&ready, int64_t max_ns) {
  if (ready()) return true;
  const int64_t start = now_ns();
  for (int i = 1;; i++) {
    if (i < kPauseSpins)
      _mm_pause();
    else
      sched_yield();
    if (ready()) return true;
    if ((i >= kPauseSpins || (i & 63) == 0) && now_ns() - start > max_ns) return false;
  }
}

inline thread_local bool in_worker = false;  // this thread is a pool worker

// Where a worker may run. On a busy machine (WorkPool::judge) a sleeping worker is woken for each long region, and
// Linux often wakes it onto the waker's CPU (wake-affine placement: no CPU is idle) where it queues behind the
// caller, while the other process has a core to itself: sampled beside one CPU hog, the caller and the woken worker
// were mostly runnable on the same CPU. A worker woken there moves off it: its affinity becomes the CPUs it started
// with but the caller's (SmolLM2 fp32 beside one hog 25-26 -> 28.3 tokens/s, int4 146-151 -> 157). The original
// affinity comes back once the machine is no longer judged busy.
class WorkerPlacement {
 public:
  WorkerPlacement() { pthread_getaffinity_np(pthread_self(), sizeof(allowed_), &allowed_); }

  void follow(bool busy, int caller_cpu) {
    if (!busy) {
      if (moved_) pthread_setaffinity_np(pthread_self(), sizeof(allowed_), &allowed_);
      moved_ = false;
      return;
    }
    if (caller_cpu < 0 || sched_getcpu() != caller_cpu) return;
    cpu_set_t others = allowed_;
    CPU_CLR(caller_cpu, &others);
    if (CPU_COUNT(&others) == 0) return;  // nowhere else to go
    pthread_setaffinity_np(pthread_self(), sizeof(others), &others);
    moved_ = true;
  }

 private:
  cpu_set_t allowed_;
  bool moved_ = false;
};

}  // namespace pool_detail

// How a chunk is run: fn(context, begin, end).
using ChunkFn = void (*)(void *context, int64_t begin, int64_t end);

// What the pool has done since the last reset: regions run in parallel, and chunks computed by the calling
// threads and by workers (tests and benchmarks read them: torch.ops.torchchat.work_pool_counts).
struct PoolCounts {
  int64_t regions = 0, caller_chunks = 0, worker_chunks = 0;
  int64_t caller_wait_ns = 0, caller_sleeps = 0;  // the caller's waits for chunks still running, and futex sleeps
  int64_t solo_regions = 0;  // run by the caller alone because the workers were not helping (WorkPool::judge)
  int64_t woken_regions = 0;  // then, long enough to wake the sleeping workers for (kWakeMinChunks)
};

class WorkPool {
 public:
  // How long a worker waits for the next region before it sleeps: the gaps between a step's regions are
  // microseconds, between two steps (sampling, Python) ~100 us or more. Past the first kPauseSpins rounds the wait
  // yields the core, so it costs a busy machine little; an idle generator's workers are asleep within 2 ms.
  static constexpr int64_t kWorkerSpinNs = 2'000'000;
  static constexpr int64_t kCallerSpinNs = 20'000;   // the caller's wait for running chunks before it sleeps
  static constexpr int64_t kMaxChunks = 0xFFFF;      // a region's chunks (16 bits of a claim word)
  static constexpr int kMaxBlocks = 64;              // threads that own a block; more only steal

  // fn over [0, n) in chunks of `chunk` (made larger where there would be more than kMaxChunks); returns when
  // every chunk has run. One region at a time: callers are serialized. long_chunks: each chunk is long (a prompt's
  // GEMM, ~100 us or more), so on a busy machine the region wakes the workers however few its chunks are.
  //
  // The chunks are dealt in contiguous blocks, one a thread (the caller's first), as OpenMP's static split: a
  // thread streams its own block front to back, claiming each chunk with an atomic on a cache line of its own (no
  // other thread touches it unless it steals; the hardware prefetcher sees one stream a thread). A thread whose
  // block is done steals the others' chunks from their back ends, one at a time, so a block whose owner is late
  // (descheduled, or not yet awake) is finished by whoever runs.
  void run(int64_t n, int64_t chunk, ChunkFn fn, void *context, bool long_chunks = false) {
    if (n <= 0) return;
    chunk = std::max<int64_t>({chunk, 1, (n + kMaxChunks - 1) / kMaxChunks});
    const int64_t total = (n + chunk - 1) / chunk;
    const int held = held_threads_.load(std::memory_order_relaxed);
    const int threads = held > 0 ? held : at::get_num_threads();
    if (total == 1 || threads <= 1 || pool_detail::in_worker || at::in_parallel_region()) {
      fn(context, 0, n);
      return;
    }
    std::lock_guard<std::mutex> one_region(region_mutex_);
    const bool busy = solo_left_ > 0;  // the workers were not helping (judge)
    if (busy) {
      solo_left_--;
      if (solo_left_ == 0) busy_.store(false, std::memory_order_relaxed);  // spin again, and be judged afresh
      if (total < kWakeMinChunks && !long_chunks) {  // a short region: the caller alone, the workers asleep
        counts_.solo_regions++;
        fn(context, 0, n);
        last_region_ns_.store(pool_detail::now_ns(), std::memory_order_relaxed);
        return;
      }
      counts_.woken_regions++;  // a long one: the workers are woken for it, and sleep again after it
    }
    ensure_workers(threads - 1);
    n_ = n, chunk_ = chunk, fn_ = fn, context_ = context;
    const int blocks = static_cast<int>(std::min<int64_t>({total, threads, kMaxBlocks}));
    blocks_.store(blocks, std::memory_order_relaxed);
    total_.store(static_cast<uint32_t>(total), std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint32_t g = ++generation_count_;
    for (int b = 0; b < blocks; b++) {  // block b: chunks [front, back)
      const uint64_t front = total * b / blocks, back = total * (b + 1) / blocks;
      claims_[b].word.store((static_cast<uint64_t>(g) << 32) | (front << 16) | back, std::memory_order_relaxed);
    }
    caller_cpu_.store(sched_getcpu(), std::memory_order_relaxed);  // WorkerPlacement keeps woken workers off it
    generation_.store(g, std::memory_order_seq_cst);  // publish (the claims and fields before it): workers wait on it
    if (sleepers_.load(std::memory_order_seq_cst) > 0) pool_detail::futex_wake(&generation_, INT_MAX);
    counts_.regions++;
    const int64_t start = pool_detail::now_ns();
    const int64_t own = work(g, 0, static_cast<uint32_t>(total));
    const int64_t worked = pool_detail::now_ns();
    wait_for_chunks(static_cast<uint32_t>(total));
    counts_.caller_chunks += own;
    const int64_t end = pool_detail::now_ns();
    if (!busy) judge(own, total - own, worked - start, end - worked, threads - 1);
    last_region_ns_.store(end, std::memory_order_relaxed);
  }

  // "Never worse than one thread": over each window of kJudgeRegions regions, the time the workers saved the caller
  // (their chunks, at the caller's own time a chunk) against the time it waited for them at the regions' ends. A
  // worker that shares its core with another busy process runs in the scheduler's slices (milliseconds) and is
  // often descheduled holding a chunk, and one that shares the caller's core takes the caller's time (its waits are
  // short, but it computes little). If waiting cost more than the workers saved, or they computed less than
  // kMinWorkerShare of their even share, in two windows running, the next kSoloRegions regions (~27 SmolLM2 tokens,
  // ~1 s when busy: the two bad windows that precede them are then 3% of the regions, not 11% at 1024) run as on a
  // busy machine: the workers sleep between regions, short regions run on the caller alone and long ones
  // (kWakeMinChunks) wake the workers; then the workers spin again and are judged afresh. (One bad window is often
  // a worker waking from its sleep between two generations.)
  static constexpr int64_t kJudgeRegions = 64, kSoloRegions = 4096;
  // On a busy machine, regions of at least this many chunks (~1 MB of weights, ~50 us) wake the workers: the
  // futex wake-up costs a few us and the woken worker preempts whoever shares its core (SmolLM2 fp32 beside one
  // CPU hog: 25-26 tokens/s against 22.7 on the caller alone); shorter ones run on the caller alone (int4's: a
  // wake-up for each cost 149 -> 133 tokens/s).
  static constexpr int64_t kWakeMinChunks = 32;
  static constexpr double kMinWorkerShare = 0.25;

  void judge(int64_t own_chunks, int64_t worker_chunks, int64_t work_ns, int64_t wait_ns, int workers) {
    window_.own_chunks += own_chunks, window_.worker_chunks += worker_chunks;
    window_.work_ns += work_ns, window_.wait_ns += wait_ns;
    if (++window_.regions < kJudgeRegions) return;
    const double ns_a_chunk = static_cast<double>(window_.work_ns) / std::max<int64_t>(window_.own_chunks, 1);
    const double chunks = static_cast<double>(window_.own_chunks + window_.worker_chunks);
    const bool bad = static_cast<double>(window_.worker_chunks) * ns_a_chunk < static_cast<double>(window_.wait_ns) ||
                     window_.worker_chunks < kMinWorkerShare * chunks * workers / (workers + 1);
    if (bad && last_window_bad_) return run_as_busy();
    last_window_bad_ = bad;
    window_ = {};
  }

  // The next kSoloRegions regions run as on a busy machine; then the workers are judged afresh. Under the region lock.
  void run_as_busy() {
    window_ = {}, last_window_bad_ = false;
    solo_left_ = kSoloRegions;
    busy_.store(true, std::memory_order_relaxed);
  }

  // Is the pool running as on a busy machine (judge)? Callers may cut their work finer then (prompt_linear.cpp).
  bool busy() const { return busy_.load(std::memory_order_relaxed); }

  // Seconds since the last region ended (infinity before the first): how old the judgement is, and whether the
  // workers are asleep by now (they sleep within ~2 ms of the last region).
  double idle_s() const {
    const int64_t last = last_region_ns_.load(std::memory_order_relaxed);
    return last == 0 ? std::numeric_limits<double>::infinity() : (pool_detail::now_ns() - last) * 1e-9;
  }

  // Run as on a busy machine from the next region, as judge would have decided, for the same kSoloRegions: for a
  // caller that saw the machine busy before the pool had regions to judge it by (the first prompt of a run:
  // torchchat.cpu.kernels.one_torch_thread_when_busy).
  void assume_busy() {
    std::lock_guard<std::mutex> one_region(region_mutex_);
    run_as_busy();
  }

  PoolCounts counts() const {
    PoolCounts c = counts_;
    c.worker_chunks = worker_chunks_.load(std::memory_order_relaxed);
    return c;
  }

  // Counts from zero, and the workers judged afresh (judge), as if no region had run. Takes the region lock: no
  // region is running.
  void reset() {
    std::lock_guard<std::mutex> one_region(region_mutex_);
    window_ = {}, solo_left_ = 0, last_window_bad_ = false;
    busy_.store(false, std::memory_order_relaxed);
    last_region_ns_.store(0, std::memory_order_relaxed);
    counts_ = {};
    worker_chunks_.store(0, std::memory_order_relaxed);
  }

  // The pool's thread count while torch's own is lowered (torchchat.cpu.kernels.one_torch_thread_when_busy: a
  // prompt's elementwise ops and attention on one OpenMP thread on a busy machine, its GEMMs still on the pool);
  // 0: torch's again.
  void hold_threads(int n) { held_threads_.store(std::max(n, 0), std::memory_order_relaxed); }

  // Testing: each worker sleeps this long after seeing a region before it claims (a thread that starts late).
  void set_worker_delay_us(int64_t us) { worker_delay_us_.store(us, std::memory_order_relaxed); }

 private:
  struct alignas(64) Claim {
    std::atomic<uint64_t> word{0};  // (region number << 32) | (front chunk << 16) | back chunk (exclusive)
  };

  // Claims one chunk of block b of region g, from its front (the owner) or its back (a thief); -1 if none is left.
  int64_t claim(uint32_t g, int b, bool front) {
    std::atomic<uint64_t> &word = claims_[b].word;
    uint64_t c = word.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t first = (c >> 16) & 0xFFFF, last = c & 0xFFFF;
      if (static_cast<uint32_t>(c >> 32) != g || first >= last) return -1;
      const uint64_t taken = front ? c + (1u << 16) : c - 1;
      if (word.compare_exchange_weak(c, taken, std::memory_order_acquire, std::memory_order_relaxed))
        return static_cast<int64_t>(front ? first : last - 1);
    }
  }

  // Participant p's share of region g (total chunks): its own block (block p, if there is one), then the others'
  // leftovers; returns how many chunks it computed, after adding them to done_.
  int64_t work(uint32_t g, int p, uint32_t total) {
    int64_t computed = 0;
    auto compute = [&](int64_t index) {
      // The chunk is ours: the region's fields stay as they are until every chunk is counted in done_.
      const int64_t begin = index * chunk_, end = std::min(n_, begin + chunk_);
      fn_(context_, begin, end);
      computed++;
    };
    const int blocks = blocks_.load(std::memory_order_relaxed);  // a later region's if g is over: claims fail then
    if (p < blocks)
      for (int64_t i; (i = claim(g, p, true)) >= 0;) compute(i);
    for (int k = 1; k <= blocks; k++) {
      const int b = (p + k) % blocks;
      for (int64_t i; (i = claim(g, b, false)) >= 0;) compute(i);
    }
    if (computed > 0 && done_.fetch_add(static_cast<uint32_t>(computed), std::memory_order_acq_rel) + computed ==
                            total && caller_waiting_.load(std::memory_order_seq_cst))
      pool_detail::futex_wake(&done_, 1);
    return computed;
  }

  void wait_for_chunks(uint32_t total) {
    auto all_done = [&] { return done_.load(std::memory_order_acquire) == total; };
    if (all_done()) return;
    const int64_t start = pool_detail::now_ns();
    if (!pool_detail::spin_until(all_done, kCallerSpinNs)) {
      counts_.caller_sleeps++;
      caller_waiting_.store(1, std::memory_order_seq_cst);
      for (uint32_t d; (d = done_.load(std::memory_order_seq_cst)) != total;) pool_detail::futex_wait(&done_, d);
      caller_waiting_.store(0, std::memory_order_relaxed);
    }
    counts_.caller_wait_ns += pool_detail::now_ns() - start;
  }

  void ensure_workers(int wanted) {
    active_workers_.store(wanted, std::memory_order_relaxed);
    while (static_cast<int>(workers_started_) < wanted) {
      const int index = workers_started_++;
      std::thread([this, index] { worker_loop(index); }).detach();  // the pool lives as long as the process
    }
  }

  void worker_loop(int index) {
    pool_detail::in_worker = true;
    pthread_setname_np(pthread_self(), "torchchat-pool");  // tests find the workers by it
    pool_detail::WorkerPlacement placement;
    uint32_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      const bool active = index < active_workers_.load(std::memory_order_relaxed);
      auto next_region = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      // on a busy machine (judge) a worker sleeps at once: the next long region wakes it, and a woken thread
      // preempts the process it shares its core with, where a yielding one hands it the core
      const bool sleep_now = busy_.load(std::memory_order_relaxed);
      if (!active || sleep_now || !pool_detail::spin_until(next_region, kWorkerSpinNs)) {
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        while (generation_.load(std::memory_order_seq_cst) == seen) pool_detail::futex_wait(&generation_, seen);
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index >= active_workers_.load(std::memory_order_relaxed)) continue;  // torch's thread count went down
      placement.follow(busy_.load(std::memory_order_relaxed), caller_cpu_.load(std::memory_order_relaxed));
      if (const int64_t us = worker_delay_us_.load(std::memory_order_relaxed); us > 0)
        std::this_thread::sleep_for(std::chrono::microseconds(us));
      // total_ is region `seen`'s whenever this worker computes one of its chunks (it is only read then)
      worker_chunks_.fetch_add(work(seen, index + 1, total_.load(std::memory_order_relaxed)),
                               std::memory_order_relaxed);
    }
  }

  // The region being run: written by the caller before it publishes the region, read by whoever claims a chunk.
  int64_t n_ = 0, chunk_ = 1;
  ChunkFn fn_ = nullptr;
  void *context_ = nullptr;
  std::atomic<int> blocks_{0};        // blocks of the last region (claims_[0 .. blocks_))
  std::atomic<uint32_t> total_{0};    // its chunks

  Claim claims_[kMaxBlocks];
  std::atomic<uint32_t> generation_{0};    // the last region's number; workers futex-wait on it
  std::atomic<uint32_t> done_{0};          // chunks of the region done; the caller futex-waits on it
  std::atomic<uint32_t> sleepers_{0};      // workers asleep on generation_
  std::atomic<uint32_t> caller_waiting_{0};
  std::atomic<int> active_workers_{0};
  std::atomic<int> caller_cpu_{-1};  // the CPU the caller published the last region from
  std::atomic<int64_t> last_region_ns_{0};  // when the last region ended (idle_s)

  std::atomic<int64_t> worker_delay_us_{0};
  std::atomic<int> held_threads_{0};  // hold_threads
  std::atomic<int64_t> worker_chunks_{0};
  uint32_t generation_count_ = 0;
  unsigned workers_started_ = 0;
  PoolCounts counts_;
  struct Window {
    int64_t regions = 0, own_chunks = 0, worker_chunks = 0, work_ns = 0, wait_ns = 0;
  } window_;               // judge's
  int64_t solo_left_ = 0;  // regions still to run as on a busy machine (judge)
  std::atomic<bool> busy_{false};  // solo_left_ > 0: workers sleep between regions, woken by the long ones
  bool last_window_bad_ = false;
  std::mutex region_mutex_;
};

// The process's pool (a new one in a forked child; the old one, whose threads the child lacks, is left behind).
inline WorkPool &work_pool() {
  static std::atomic<WorkPool *> pool{nullptr};
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, [] { pool.store(nullptr); }); });
  WorkPool *p = pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    static std::mutex creating;
    std::lock_guard<std::mutex> lock(creating);
    p = pool.load(std::memory_order_acquire);
    if (p == nullptr) pool.store(p = new WorkPool(), std::memory_order_release);
  }
  return *p;
}

// f(begin, end) over [0, n) in chunks of `chunk` (the last may be shorter), on the pool: see the file's header.
// long_chunks: see WorkPool::run.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, F &&f, bool long_chunks = false) {
  using Fn = std::remove_reference_t<F>;
  const ChunkFn run_chunk = [](void *context, int64_t begin, int64_t end) {
    (*static_cast<Fn *>(context))(begin, end);
  };
  work_pool().run(n, chunk, run_chunk, const_cast<void *>(static_cast<const void *>(&f)), long_chunks);
}

}  // namespace torchchat_cpu
