// cuda/status.hpp — what the CUDA host API returns instead of throwing.
//
// Host-visible problems (shapes, strides, options, workspace size, a failed
// launch) come back from the call itself. Problems only the device can see
// (a target id out of range, a non-finite logit, bad offsets) are recorded by
// the kernels in the workspace and come back from read_status(), which
// synchronises the stream: call it when you would read the loss anyway.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "../error.hpp"

namespace kto {
namespace cuda {

enum class StatusCode : int {
  success = 0,
  invalid_argument,     ///< a host-visible argument failed validation
  workspace_too_small,  ///< the workspace is smaller than the query said
  cuda_error,           ///< a CUDA runtime call or launch failed
  target_out_of_range,  ///< device: a target id outside [0, V) and not ignore_index
  non_finite_logits,    ///< device: NaN/inf on a scored row
  invalid_offsets,      ///< device: offsets negative, decreasing or past the rows
  non_finite_input,     ///< device: a non-finite reference/KL log-prob
  invalid_label,        ///< device: a label other than 0 or 1
  peer_failure,         ///< device: another data-parallel rank failed (via the all-reduce)
};

struct Status {
  StatusCode code = StatusCode::success;
  char message[400] = {};
  bool ok() const { return code == StatusCode::success; }
  explicit operator bool() const { return ok(); }

  static Status success() { return Status{}; }
  template <class... Args>
  static Status make(StatusCode code, const char* format, Args... args) {
    Status s;
    s.code = code;
    std::snprintf(s.message, sizeof(s.message), format, args...);
    return s;
  }
  static Status from(const kto::Error& e) {
    return make(StatusCode::invalid_argument, "%s", e.what());
  }
  static Status from(cudaError_t err, const char* where) {
    return make(StatusCode::cuda_error, "%s: CUDA error %s (%s)", where, cudaGetErrorName(err),
                cudaGetErrorString(err));
  }
};

/// Convenience for callers who prefer exceptions: throws kto::Error.
inline void throw_if_error(const Status& s) {
  if (!s.ok()) throw kto::Error("kto::cuda", "status", s.message);
}

}  // namespace cuda
}  // namespace kto
