// A small persistent thread pool for the CPU kernels: parallel_for over independent tasks.
// Own pool instead of OpenMP so the thread count is ours to set, nested calls are safe, and a
// forked child (DataLoader workers) starts with a fresh pool instead of a dead one.
#pragma once

#include <cstdint>
#include <functional>

namespace edpairs::cpu {

int num_threads();
void set_num_threads(int n);

// Runs fn(task, thread) for every task in [0, n_tasks), dynamically scheduled on at most
// min(num_threads(), max_width) threads; `thread` is in [0, min(parallel_width(n_tasks),
// max_width)). Callers that size per-thread state pass the width they sized it for, so a
// concurrent set_num_threads() cannot outgrow it. Returns when all tasks are done; rethrows
// the first exception a task threw. Nested calls run serially.
void parallel_for(int64_t n_tasks, const std::function<void(int64_t task, int thread)>& fn,
                  int max_width = 1 << 30);

// Number of distinct `thread` values parallel_for(n_tasks, ...) may use.
int parallel_width(int64_t n_tasks);

}  // namespace edpairs::cpu
