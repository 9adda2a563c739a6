// cpu/parallel.hpp — split rows over std::threads, deterministically.
//
// Each row is processed start to finish by one thread with the same code, so a
// row's result never depends on how many threads ran: outputs are bit-identical
// for any thread count. Rows go out as contiguous, equal ranges (every row of a
// logits matrix costs the same V exps). Plain std::thread rather than OpenMP:
// a header-only library should not require its users to add -fopenmp, and the
// thread count is an explicit argument the determinism tests can vary.
#pragma once

#include <algorithm>
#include <exception>
#include <thread>
#include <vector>

#include "../config.hpp"

namespace kto {
namespace cpu {

struct ExecutionPolicy {
  int num_threads = 0;  ///< 0: std::thread::hardware_concurrency()
  /// Rows below which an extra thread does not pay for its start (~20 µs).
  index_t min_rows_per_thread = 8;
};

inline int resolve_threads(const ExecutionPolicy& p) {
  if (p.num_threads > 0) return p.num_threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

/// Calls body(begin, end) on disjoint ranges covering [0, n); rethrows the
/// exception of the lowest range if any body threw.
template <class Body>
void parallel_for(index_t n, const ExecutionPolicy& policy, Body&& body) {
  if (n <= 0) return;
  const index_t min_rows = std::max<index_t>(1, policy.min_rows_per_thread);
  const index_t by_size = (n + min_rows - 1) / min_rows;
  const auto threads = static_cast<index_t>(
      std::max<index_t>(1, std::min<index_t>(resolve_threads(policy), by_size)));
  if (threads == 1) {
    body(index_t{0}, n);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  auto run = [&](index_t t) {
    const index_t begin = n * t / threads;
    const index_t end = n * (t + 1) / threads;
    try {
      body(begin, end);
    } catch (...) {
      errors[static_cast<size_t>(t)] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (index_t t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace cpu
}  // namespace kto
