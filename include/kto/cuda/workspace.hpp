// cuda/workspace.hpp — the two-phase workspace of every CUDA call, CUB style.
//
// A call that needs scratch takes (workspace, workspace_bytes). With a null
// workspace it only answers how many bytes it needs; with a workspace of at
// least that many bytes (256-byte aligned, as cudaMalloc returns) it lays its
// buffers out of it in a fixed order (Carver) and launches. Nothing here
// allocates or synchronises. The first buffer of every layout is the device
// error word that read_status() decodes.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include <kto/device/device_errors.cuh>

#include "../config.hpp"
#include "status.hpp"

namespace kto {
namespace cuda {
namespace detail {

constexpr size_t kAlignment = 256;

/// Lays typed buffers out of one workspace in a fixed order; with a null base
/// it only adds up the sizes (the query phase).
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}
  template <class U>
  U* take(index_t count) {
    U* p = base_ ? reinterpret_cast<U*>(base_ + used_) : nullptr;
    const size_t bytes = sizeof(U) * static_cast<size_t>(count > 0 ? count : 0);
    used_ += (bytes + kAlignment - 1) / kAlignment * kAlignment;
    return p;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

/// Query or check the workspace; true when the caller should launch.
inline bool workspace_ready(void* workspace, size_t& bytes, size_t needed, Status& status,
                            const char* fn) {
  if (workspace == nullptr) {
    bytes = needed;
    return false;
  }
  if (bytes < needed) {
    status =
        Status::make(StatusCode::workspace_too_small,
                     "%s: argument 'workspace_bytes' must be >= %zu; got %zu", fn, needed, bytes);
    return false;
  }
  if (reinterpret_cast<std::uintptr_t>(workspace) % kAlignment != 0) {
    status =
        Status::make(StatusCode::invalid_argument,
                     "%s: argument 'workspace' must be 256-byte aligned; got %p", fn, workspace);
    return false;
  }
  return true;
}

inline Status last_launch(const char* fn) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::success() : Status::from(err, fn);
}

inline void reset_errors(device::DeviceErrors* errors, cudaStream_t stream) {
  cudaMemsetAsync(errors, 0xFF, sizeof(device::DeviceErrors), stream);
}

}  // namespace detail

/// Bytes of a workspace that holds only the error word (kl_partial, finish).
inline size_t errors_workspace_bytes() {
  return detail::kAlignment;
}

namespace detail {

/// The error word of a call whose workspace holds nothing else: answers the
/// size query, checks size and alignment, resets the word. Null: return `status`.
inline device::DeviceErrors* error_word(void* workspace, size_t& bytes, Status& status,
                                        const char* fn, cudaStream_t stream) {
  if (!workspace_ready(workspace, bytes, errors_workspace_bytes(), status, fn)) return nullptr;
  auto* errors = static_cast<device::DeviceErrors*>(workspace);
  reset_errors(errors, stream);
  return errors;
}

}  // namespace detail
}  // namespace cuda
}  // namespace kto
