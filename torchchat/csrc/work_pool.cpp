// The pool's counters and its testing knob as ops (work_pool.h):
//   torch.ops.torchchat.work_pool_counts() -> [regions, caller_chunks, worker_chunks, caller_wait_ns, caller_sleeps,
//   solo_regions, woken_regions] since the last reset (PoolCounts);
//   torch.ops.torchchat.work_pool_reset(): counts from zero, workers judged afresh (work_pool.h: WorkPool::judge);
//   torch.ops.torchchat.work_pool_worker_delay(us): each worker sleeps us microseconds after seeing a region, before
//   it claims (tests: a thread that starts late; 0 to stop);
//   torch.ops.torchchat.work_pool_busy(): is the pool running as on a busy machine (WorkPool::judge)?
//   torch.ops.torchchat.work_pool_hold_threads(n): the pool keeps n threads whatever torch's count (0: torch's);
//   torch.ops.torchchat.work_pool_idle_s(): seconds since the last region ended (inf before the first);
//   torch.ops.torchchat.work_pool_assume_busy(): run as on a busy machine from the next region, as if judged so.

#include <torch/library.h>

#include "work_pool.h"

#include <vector>

namespace {

using namespace torchchat_cpu;

std::vector<int64_t> work_pool_counts() {
  const PoolCounts c = work_pool().counts();
  return {c.regions,       c.caller_chunks, c.worker_chunks, c.caller_wait_ns,
          c.caller_sleeps, c.solo_regions,  c.woken_regions};
}

void work_pool_reset() { work_pool().reset(); }

void work_pool_worker_delay(int64_t us) { work_pool().set_worker_delay_us(us); }

bool work_pool_busy() { return work_pool().busy(); }

void work_pool_hold_threads(int64_t n) { work_pool().hold_threads(static_cast<int>(n)); }

double work_pool_idle_s() { return work_pool().idle_s(); }

void work_pool_assume_busy() { work_pool().assume_busy(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchchat, m) {  // no tensor arguments: one kernel for every dispatch key
  m.def("work_pool_counts() -> int[]", &work_pool_counts);
  m.def("work_pool_reset() -> ()", &work_pool_reset);
  m.def("work_pool_worker_delay(int us) -> ()", &work_pool_worker_delay);
  m.def("work_pool_busy() -> bool", &work_pool_busy);
  m.def("work_pool_hold_threads(int n) -> ()", &work_pool_hold_threads);
  m.def("work_pool_idle_s() -> float", &work_pool_idle_s);
  m.def("work_pool_assume_busy() -> ()", &work_pool_assume_busy);
}
