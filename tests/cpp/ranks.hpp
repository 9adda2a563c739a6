// ranks.hpp — threads standing in for the ranks of a data-, context- or vocabulary-parallel
// group: an all-reduce (sum) and an all-gather of row partials between them, and a runner
// that keeps each rank's exception.
#pragma once

#include <kto/fused_linear.hpp>
#include <kto/layout.hpp>
#include <kto/reference_point.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace test {

/// Sums arrays of doubles in place between threads standing in for the ranks of one
/// group; every rank gets the same sum.
class ThreadSum {
 public:
  explicit ThreadSum(int ranks) : ranks_(ranks) {}
  void operator()(double* values, kto::index_t count) {
    std::unique_lock<std::mutex> lock(m_);
    const int round = round_;
    if (sum_.empty()) sum_.assign(static_cast<size_t>(count), 0.0);
    if (sum_.size() != static_cast<size_t>(count))
      throw std::runtime_error("ranks disagree on the all-reduce's count");
    for (kto::index_t i = 0; i < count; ++i) sum_[static_cast<size_t>(i)] += values[i];
    if (++arrived_ == ranks_) {
      result_.swap(sum_);
      sum_.clear();
      arrived_ = 0;
      ++round_;
      cv_.notify_all();
    } else {
      // Bounded: a rank that never arrives fails the test instead of hanging it.
      if (!cv_.wait_for(lock, std::chrono::seconds(20), [&] { return round_ != round; }))
        throw std::runtime_error("all-reduce timed out: a rank never joined");
    }
    std::copy(result_.begin(), result_.end(), values);
  }
  void operator()(kto::KlPartial& p) {
    double v[3] = {p.sum, p.count, p.failures};
    (*this)(v, 3);
    p = kto::KlPartial{v[0], v[1], v[2]};
  }

 private:
  int ranks_, arrived_ = 0, round_ = 0;
  std::vector<double> sum_, result_;
  std::mutex m_;
  std::condition_variable cv_;
};

/// All-gathers each rank's row partials (a vocabulary-parallel step's collective) between
/// threads standing in for `ranks` ranks; every rank gets all of them in rank order.
template <class Acc>
class GatherBoard {
 public:
  explicit GatherBoard(int ranks) : parts_(static_cast<size_t>(ranks)), ranks_(ranks) {}
  void gather(int rank, const std::vector<kto::RowPartial<Acc>>& local,
              std::vector<kto::RowPartial<Acc>>& all) {
    std::unique_lock<std::mutex> lock(m_);
    parts_[static_cast<size_t>(rank)] = local;
    if (++arrived_ == ranks_) cv_.notify_all();
    cv_.wait(lock, [&] { return arrived_ == ranks_; });
    all.clear();
    for (const auto& p : parts_) all.insert(all.end(), p.begin(), p.end());
  }

 private:
  std::vector<std::vector<kto::RowPartial<Acc>>> parts_;
  int ranks_, arrived_ = 0;
  std::mutex m_;
  std::condition_variable cv_;
};

/// Runs body(rank) on `ranks` threads; returns each rank's exception (or null).
template <class Body>
std::vector<std::exception_ptr> run_ranks(int ranks, Body body) {
  std::vector<std::exception_ptr> errors(static_cast<size_t>(ranks));
  std::vector<std::thread> threads;
  for (int k = 0; k < ranks; ++k)
    threads.emplace_back([&, k] {
      try {
        body(k);
      } catch (...) {
        errors[static_cast<size_t>(k)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

}  // namespace test
