// cuda/blas_handle.hpp — one cuBLAS handle per device, shared by the callers of a library.
//
// The fused-linear step takes a cublasHandle_t and binds it to the call's stream
// and workspace. Creating a handle costs milliseconds and some device memory, so
// bindings keep one per device; a framework's own handle stays untouched (its
// workspace and math-mode settings are its business). The handles live until the
// process exits: destroying them at static destruction could run after the CUDA
// context is gone.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>

#include "status.hpp"

namespace kto {
namespace cuda {

/// The current device's shared handle in `*handle`. Creating it is thread-safe; using
/// it is not: a call binds it to its stream and workspace, so one thread at a time
/// per device (as the framework bindings call). One set of handles per shared
/// object that includes this header (the torch and JAX extensions each have theirs).
inline Status shared_blas_handle(cublasHandle_t* handle) {
  static std::mutex mutex;
  static std::map<int, cublasHandle_t> handles;
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return Status::from(err, "kto::cuda::shared_blas_handle: cudaGetDevice");
  std::lock_guard<std::mutex> lock(mutex);
  auto it = handles.find(device);
  if (it == handles.end()) {
    cublasHandle_t h = nullptr;
    const cublasStatus_t s = cublasCreate(&h);
    if (s != CUBLAS_STATUS_SUCCESS)
      return Status::make(StatusCode::cuda_error,
                          "kto::cuda::shared_blas_handle: cublasCreate failed on device %d "
                          "(cuBLAS status %d)",
                          device, static_cast<int>(s));
    it = handles.emplace(device, h).first;
  }
  *handle = it->second;
  return Status::success();
}

}  // namespace cuda
}  // namespace kto
