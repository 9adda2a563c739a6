// bind/message.hpp — a library failure as one message, and back.
//
// The library reports bad input as kto::Error (the CPU path, the throwing layers)
// or as a kto::cuda::Status (the CUDA host API, read_status) whose message has the
// same form: "<function>: argument '<name>' must ...; got ...", with "sequence S"
// and "row R" where a non-finite logit was found. A binding carries the message
// across its boundary as a string (empty: success) and raises it in its
// framework's words. message_of() runs a call and gives its message;
// raise_library_error() turns a message back into the exception the CPU path
// throws for the same input, so a CUDA failure reads as the CPU one.
#pragma once

#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <string>

#include "../error.hpp"

namespace kto {
namespace bind {

/// Runs fn() (a call returning its message, empty on success) and returns that message;
/// a kto::Error or other exception thrown on the way becomes its what().
template <class Fn>
std::string message_of(Fn&& fn) noexcept {
  try {
    return fn();
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "kto: an unknown exception";
  }
}

/// The argument a library message names ("argument '<name>'"), or "" if none.
inline std::string argument_of(const std::string& message) {
  const auto at = message.find("argument '");
  if (at == std::string::npos) return std::string();
  const auto begin = at + 10, end = message.find('\'', begin);
  return end == std::string::npos ? std::string() : message.substr(begin, end - begin);
}

/// Whether a message is a failure of the CUDA runtime itself (no argument named), not of
/// the caller's input.
inline bool is_runtime_failure(const std::string& message) {
  return argument_of(message).empty() && message.find("CUDA error") != std::string::npos;
}

/// Throws a library message as the CPU path would have: kto::NonFiniteLogitsError for a
/// non-finite logit (with the sequence and row the message gives, -1 where it gives none),
/// kto::Error for any other; a failure of the CUDA runtime itself (no argument named) as
/// the std::runtime_error it is.
[[noreturn]] inline void raise_library_error(const std::string& message) {
  if (is_runtime_failure(message)) throw std::runtime_error(message);
  const std::string argument = argument_of(message);
  const auto number_after = [&](const char* key) -> index_t {
    const auto k = message.find(key);
    if (k == std::string::npos) return -1;
    return std::strtoll(message.c_str() + k + std::string(key).size(), nullptr, 10);
  };
  const std::string function = message.substr(0, message.find(": "));
  if (argument == "logits" && message.find("finite") != std::string::npos)
    throw NonFiniteLogitsError(function, argument, number_after("sequence "), number_after("row "),
                               message);
  throw Error(function, argument, message);
}

}  // namespace bind
}  // namespace kto
