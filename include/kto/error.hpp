// error.hpp — how kto reports bad input.
//
// Every check names the argument, what was expected and what came, so that a
// caller who passed a wrong shape or a negative weight learns which one from the
// message alone. The CPU path and the throwing convenience layers raise
// kto::Error; non-finite logits raise kto::NonFiniteLogitsError, which also
// carries the sequence and row where the forward pass found them.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

#include "config.hpp"

namespace kto {

/// Base exception of the library: an argument failed validation.
class Error : public std::invalid_argument {
 public:
  Error(std::string function, std::string argument, const std::string& message)
      : std::invalid_argument(message),
        function_(std::move(function)),
        argument_(std::move(argument)) {}
  /// The API function that rejected the input (e.g. "kto::cpu::kto_step").
  const std::string& function() const noexcept { return function_; }
  /// The argument that was rejected (e.g. "options.beta").
  const std::string& argument() const noexcept { return argument_; }

 private:
  std::string function_;
  std::string argument_;
};

/// The forward pass met a NaN or ±inf that would make the loss non-finite.
class NonFiniteLogitsError : public Error {
 public:
  NonFiniteLogitsError(std::string function, std::string argument, index_t sequence, index_t row,
                       const std::string& message)
      : Error(std::move(function), std::move(argument), message), sequence_(sequence), row_(row) {}
  index_t sequence() const noexcept { return sequence_; }
  index_t row() const noexcept { return row_; }

 private:
  index_t sequence_;
  index_t row_;
};

/// Another data-parallel rank failed before the KL all-reduce: its own error
/// names the cause; this rank's inputs passed every check.
class PeerError : public Error {
 public:
  PeerError(std::string function, double failed_ranks, const std::string& message)
      : Error(std::move(function), "peer ranks", message), failed_ranks_(failed_ranks) {}
  /// How many ranks reported a failure through the all-reduce.
  double failed_ranks() const noexcept { return failed_ranks_; }

 private:
  double failed_ranks_;
};

namespace detail {

template <class Got>
[[noreturn]] inline void fail(const char* function, const std::string& argument,
                              const std::string& expectation, const Got& got) {
  std::ostringstream os;
  os << function << ": argument '" << argument << "' must " << expectation << "; got " << got;
  throw Error(function, argument, os.str());
}

/// Throws kto::Error unless `ok`: "<function>: argument '<arg>' must <expectation>; got <got>".
template <class Got>
inline void require(bool ok, const char* function, const std::string& argument,
                    const std::string& expectation, const Got& got) {
  if (!ok) fail(function, argument, expectation, got);
}

}  // namespace detail
}  // namespace kto
