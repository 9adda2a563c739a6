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
#include <new>
#include <system_error>
#include <thread>
#include <utility>
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

namespace detail {

/// parallel_for with the thread start as a parameter (tests make it fail).
/// A range whose thread cannot start (std::system_error: no memory for its
/// stack, a thread limit) runs on the calling thread instead, so the call
/// still completes with the same bits; no thread is ever left joinable.
template <class Body, class Start>
void parallel_for_with(index_t n, const ExecutionPolicy& policy, Body&& body, Start&& start) {
  if (n <= 0) return;
  const index_t min_rows = std::max<index_t>(1, policy.min_rows_per_thread);
  const index_t by_size = n / min_rows + (n % min_rows != 0 ? 1 : 0);  // no n + min_rows overflow
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
  index_t started = 1;  // range 0 always runs here
  try {
    pool.reserve(static_cast<size_t>(threads - 1));
    for (; started < threads; ++started) pool.push_back(start([&run, started] { run(started); }));
  } catch (const std::system_error&) {  // fewer threads: the rest run below
  } catch (const std::bad_alloc&) {
  }
  for (index_t t = started; t < threads; ++t) run(t);
  run(0);
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace detail

/// Calls body(begin, end) on disjoint ranges covering [0, n); rethrows the
/// exception of the lowest range if any body threw.
template <class Body>
void parallel_for(index_t n, const ExecutionPolicy& policy, Body&& body) {
  detail::parallel_for_with(n, policy, std::forward<Body>(body),
                            [](auto&& f) { return std::thread(std::forward<decltype(f)>(f)); });
}

}  // namespace cpu
}  // namespace kto
