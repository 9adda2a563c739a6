// cuda_bench_support.cuh — what the CUDA benchmarks share: error checks,
// hashed fills, device allocation, event timing (median of reps, L2 flushed).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <kto/cuda/status.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace bench {

#define CHECK_CUDA(call)                                                 \
  do {                                                                   \
    const cudaError_t err_ = (call);                                     \
    if (err_ != cudaSuccess) {                                           \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, \
                   cudaGetErrorString(err_));                            \
      std::exit(1);                                                      \
    }                                                                    \
  } while (0)

#define CHECK_STATUS(call)                                                  \
  do {                                                                      \
    const kto::cuda::Status st_ = (call);                                   \
    if (!st_.ok()) {                                                        \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, st_.message); \
      std::exit(1);                                                         \
    }                                                                       \
  } while (0)

__device__ inline unsigned hash(unsigned long long i) {
  i ^= i >> 33;
  i *= 0xff51afd7ed558ccdull;
  i ^= i >> 33;
  i *= 0xc4ceb9fe1a85ec53ull;
  i ^= i >> 33;
  return static_cast<unsigned>(i);
}

__global__ void fill_logits(__nv_bfloat16* z, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const float u = (hash(i * 2654435761ull + seed) & 0xFFFFFF) / float(0x1000000);
    z[i] = __float2bfloat16_rn(8.0f * u - 4.0f);
  }
}

__global__ void fill_targets(kto::index_t* t, kto::index_t n, kto::index_t vocab, unsigned seed) {
  for (kto::index_t i = blockIdx.x * kto::index_t(blockDim.x) + threadIdx.x; i < n;
       i += kto::index_t(gridDim.x) * blockDim.x)
    t[i] = hash(i + seed) % vocab;
}

template <class U>
U* device_alloc(size_t n) {
  U* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, n * sizeof(U)));
  return p;
}

struct Timer {
  cudaEvent_t start, stop;
  Timer() {
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));
  }
  ~Timer() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
};

/// Median milliseconds of `reps` runs of fn(stream), L2 flushed before each.
template <class Fn>
double median_ms(int reps, cudaStream_t stream, void* flush, size_t flush_bytes, Fn&& fn) {
  Timer t;
  std::vector<float> ms;
  fn(stream);  // warm-up
  for (int i = 0; i < reps; ++i) {
    CHECK_CUDA(cudaMemsetAsync(flush, i & 0xFF, flush_bytes, stream));
    CHECK_CUDA(cudaEventRecord(t.start, stream));
    fn(stream);
    CHECK_CUDA(cudaEventRecord(t.stop, stream));
    CHECK_CUDA(cudaEventSynchronize(t.stop));
    float x = 0;
    CHECK_CUDA(cudaEventElapsedTime(&x, t.start, t.stop));
    ms.push_back(x);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

/// "1,2,3" → {1, 2, 3}.
inline std::vector<kto::index_t> parse_list(const char* s) {
  std::vector<kto::index_t> v;
  for (char* p = const_cast<char*>(s); *p;) {
    v.push_back(std::strtoll(p, &p, 10));
    if (*p == ',') ++p;
  }
  return v;
}

/// Device 0's properties; false (print SKIPPED, exit 77) where no device exists.
inline bool first_device(cudaDeviceProp& prop) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return false;
  }
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  return true;
}

}  // namespace bench
