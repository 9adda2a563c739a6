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
#include <vector>

#include <kto/device/device_errors.cuh>

#include "../error.hpp"
#include "../layout.hpp"

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
  empty_kl_batch,       ///< device: reference_point kl_batch, but the KL batch had no example
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

/// Synchronises `stream` and reports the first error the kernels recorded in
/// `workspace` (any call's workspace). With `sequences` (device offsets of the
/// batch that workspace served), a bad row is also mapped to its sequence.
inline Status read_status(const void* workspace, cudaStream_t stream,
                          const SequencesView& sequences = {}) {
  const char* fn = "kto::cuda::read_status";
  cudaError_t err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return Status::from(err, fn);
  unsigned long long key = 0;
  err = cudaMemcpy(&key, workspace, sizeof(key), cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) return Status::from(err, fn);
  if (key == device::kNoError) return Status::success();
  const long long index = device::error_index(key);
  const unsigned kind = static_cast<unsigned>(key & device::kKindMask);
  const char* batch = (key & device::kKlBatchTag) ? "KL batch" : "target batch";
  const bool kl_batch = (key & device::kKlBatchTag) != 0;
  long long sequence = -1;  // mapped only for the batch `sequences` describes
  if (!kl_batch && sequences.offsets && sequences.count > 0 &&
      (kind == device::kTargetOutOfRange || kind == device::kNonFiniteLogits)) {
    std::vector<index_t> off(static_cast<size_t>(sequences.count + 1));
    if (cudaMemcpy(off.data(), sequences.offsets, off.size() * sizeof(index_t),
                   cudaMemcpyDeviceToHost) == cudaSuccess) {
      for (index_t s = 0; s < sequences.count; ++s)
        if (off[s] <= index && index < off[s + 1]) sequence = s;
    }
  }
  char where[80];
  if (sequence >= 0)
    std::snprintf(where, sizeof(where), "sequence %lld, row %lld", sequence, index);
  else
    std::snprintf(where, sizeof(where), "row %lld", index);
  switch (kind) {
    case device::kTargetOutOfRange:
      return Status::make(StatusCode::target_out_of_range,
                          "kto::cuda: %s: argument 'targets[%lld]' must be in [0, vocab) or "
                          "ignore_index; got an id outside (%s)",
                          batch, index, where);
    case device::kNonFiniteLogits:
      return Status::make(StatusCode::non_finite_logits,
                          "kto::cuda: %s: argument 'logits' must be finite on scored rows; got "
                          "a NaN/+inf, an all -inf row or a -inf target logit in %s",
                          batch, where);
    case device::kInvalidOffsets:
      return Status::make(StatusCode::invalid_offsets,
                          "kto::cuda: %s: argument 'sequences.offsets[%lld]' must be >= 0, "
                          ">= the previous offset and <= the number of rows; got a value outside",
                          batch, index);
    case device::kNonFiniteInput:
      return Status::make(StatusCode::non_finite_input,
                          "kto::cuda: %s: per-sequence log-prob %lld (reference or KL) must be "
                          "finite; got NaN/inf",
                          batch, index);
    case device::kPeerFailure:
      return Status::make(StatusCode::peer_failure,
                          "kto::cuda: %lld data-parallel rank(s) failed before the KL all-reduce; "
                          "their own status names the cause",
                          index);
    case device::kInvalidLabel:
      return Status::make(StatusCode::invalid_label,
                          "kto::cuda: argument 'desirable[%lld]' must be 0 or 1; got another "
                          "value",
                          index);
    case device::kEmptyKlBatch:
      return Status::make(
          StatusCode::empty_kl_batch,
          "kto::cuda: argument 'kl.count' must be >= 1 with options.reference_point "
          "kl_batch: give a KL batch with at least one example (on some rank), or "
          "choose reference_point zero or fixed; got 0");
    case device::kHostTargetsMismatch:
      return Status::make(StatusCode::invalid_argument,
                          "kto::cuda: %s: argument '%s' must hold the values of '%s' (and the "
                          "host offsets those of the offsets; host memory, the same layout); "
                          "the scored rows the host planned with differ from the device's (at "
                          "%lld: a scored row count, or a row outside its planned sequences)",
                          batch, kl_batch ? "kl.host_targets" : "host_targets",
                          kl_batch ? "kl.targets" : "targets", index);
    default:
      return Status::make(StatusCode::cuda_error, "kto::cuda: unknown device error key %llx", key);
  }
}

}  // namespace cuda
}  // namespace kto
