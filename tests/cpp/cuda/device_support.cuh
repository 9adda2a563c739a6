// device_support.cuh — what the `gpu` tests share: the storage types' traits
// and a device array that frees itself.
#pragma once

#include <catch2/catch.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <vector>

namespace {

#define CUDA_REQUIRE(call) REQUIRE((call) == cudaSuccess)

template <class T>
struct Type;
template <>
struct Type<float> {
  static float from(double x) { return static_cast<float>(x); }
  static double up(float x) { return x; }
  static constexpr double unit_roundoff = 0x1p-24;
  static const char* name() { return "float"; }
};
template <>
struct Type<__half> {
  static __half from(double x) { return __float2half_rn(static_cast<float>(x)); }
  static double up(__half x) { return __half2float(x); }
  static constexpr double unit_roundoff = 0x1p-11;
  static const char* name() { return "half"; }
};
template <>
struct Type<__nv_bfloat16> {
  static __nv_bfloat16 from(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }
  static double up(__nv_bfloat16 x) { return __bfloat162float(x); }
  static constexpr double unit_roundoff = 0x1p-8;
  static const char* name() { return "bfloat16"; }
};

/// A device array that frees itself.
template <class U>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    if (n_) CUDA_REQUIRE(cudaMalloc(&ptr_, n_ * sizeof(U)));
  }
  explicit DeviceArray(const std::vector<U>& host) : DeviceArray(host.size()) { upload(host); }
  ~DeviceArray() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  U* get() const { return ptr_; }
  size_t size() const { return n_; }
  void upload(const std::vector<U>& host) {
    REQUIRE(host.size() == n_);
    if (n_) CUDA_REQUIRE(cudaMemcpy(ptr_, host.data(), n_ * sizeof(U), cudaMemcpyHostToDevice));
  }
  std::vector<U> download() const {
    std::vector<U> host(n_);
    if (n_) CUDA_REQUIRE(cudaMemcpy(host.data(), ptr_, n_ * sizeof(U), cudaMemcpyDeviceToHost));
    return host;
  }
  void poison() {
    if (n_) CUDA_REQUIRE(cudaMemset(ptr_, 0xFF, n_ * sizeof(U)));
  }

 private:
  U* ptr_ = nullptr;
  size_t n_ = 0;
};

}  // namespace
