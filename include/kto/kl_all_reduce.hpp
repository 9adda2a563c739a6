// kl_all_reduce.hpp — the one collective of a data-parallel KTO step, fault-safe.
//
// Each rank reduces its KL batch to (S, C); the caller's all-reduce sums them
// (MPI_Allreduce, NCCL, gloo, ...) and every rank then computes the same z0.
// A rank that finds bad input before that point must still join the
// collective, or the others wait in it forever. So its failure travels with
// the partials: it contributes (0, 0, failures = 1) and rethrows its own error
// after the all-reduce; every other rank sees failures > 0 and throws
// kto::PeerError. Everything that can fail runs before the collective.
#pragma once

#include <exception>
#include <functional>
#include <sstream>
#include <utility>

#include "error.hpp"
#include "reference_point.hpp"

namespace kto {

/// Sums a KlPartial (all three fields) across data-parallel ranks in place.
using KlAllReduce = std::function<void(KlPartial&)>;

namespace detail {

/// Runs this rank's work before the collective (`local` returns its partial),
/// then the all-reduce; raises on every rank if any rank failed.
template <class Local>
KlPartial reduce_kl_or_fail(const KlAllReduce& all_reduce, const char* fn, Local&& local) {
  if (!all_reduce) return local();
  KlPartial partial;
  std::exception_ptr error;
  try {
    partial = local();
  } catch (...) {
    error = std::current_exception();
    partial = KlPartial{0.0, 0.0, 1.0};
  }
  all_reduce(partial);
  if (error) std::rethrow_exception(error);
  if (partial.failures != 0.0) {
    std::ostringstream os;
    os << fn << ": " << partial.failures
       << " data-parallel rank(s) failed before the KL all-reduce; their own errors name the "
          "cause (this rank's inputs passed every check)";
    throw PeerError(fn, partial.failures, os.str());
  }
  return partial;
}

}  // namespace detail
}  // namespace kto
