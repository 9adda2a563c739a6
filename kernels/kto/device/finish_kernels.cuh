// finish_kernels.cuh — the batch-level part of the step, in one small block.
//
//   kl_partial_kernel  (S, C) over the KL batch, for the caller to all-reduce
//   finish_kernel      z0, then per example ρ, βρ, loss, g_s (example_terms(),
//                      the same function the CPU path calls) and TRL's metrics
//
// O(sequences) work in double. One block of kFinishThreads threads; each
// thread folds a strided set of examples, then a fixed shared-memory tree
// merges the partial sums: deterministic, no atomics.
#pragma once

#include <new>

#include <kto/example_loss.hpp>
#include <kto/metrics.hpp>
#include <kto/options.hpp>
#include <kto/reference_point.hpp>

#include "device_errors.cuh"

namespace kto {
namespace device {

constexpr int kFinishThreads = 256;

struct KlParams {
  const float* policy_logp;
  const float* reference_logp;
  const index_t* num_tokens;  ///< may be null for KlEstimator::mean
  index_t count;
  KlEstimator estimator;
  KlPartial* partial;
  DeviceErrors* errors;
};

__global__ void __launch_bounds__(kFinishThreads) kl_partial_kernel(KlParams p) {
  __shared__ double sums[kFinishThreads];
  __shared__ double counts[kFinishThreads];
  KlPartial local;
  for (index_t j = threadIdx.x; j < p.count; j += kFinishThreads) {
    const float pol = p.policy_logp[j], ref = p.reference_logp[j];
    if (!(isfinite(pol) && isfinite(ref))) {
      record_error(p.errors, j, kNonFiniteInput | kKlBatchTag);
      continue;
    }
    const index_t n = p.num_tokens ? p.num_tokens[j] : 1;
    add_kl_example(local, static_cast<double>(pol) - static_cast<double>(ref), n, p.estimator);
  }
  sums[threadIdx.x] = local.sum;
  counts[threadIdx.x] = local.count;
  __syncthreads();
  for (int stride = kFinishThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) {
      sums[threadIdx.x] += sums[threadIdx.x + stride];
      counts[threadIdx.x] += counts[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    p.partial->sum = sums[0];
    p.partial->count = counts[0];
    // Any error this rank's kernels recorded so far travels with the
    // all-reduce (stream order: every earlier kernel has finished; this
    // block's own records are visible after the barriers above).
    p.partial->failures = atomicAdd(&p.errors->first, 0ull) == kNoError ? 0.0 : 1.0;
  }
}

/// Right before the all-reduce: checks what this rank can check now of its
/// examples (reference log-probs, labels), then sets failures = 1 if any of its
/// kernels recorded an error, so the other ranks learn of it (kl_all_reduce.hpp).
struct PreCollectiveParams {
  const float* reference_logp;
  const std::uint8_t* desirable;
  index_t count;
  KlPartial* partial;
  DeviceErrors* errors;
};

__global__ void __launch_bounds__(kFinishThreads) note_failures_kernel(PreCollectiveParams p) {
  for (index_t s = threadIdx.x; s < p.count; s += kFinishThreads) {
    if (!isfinite(p.reference_logp[s])) record_error(p.errors, s, kNonFiniteInput);
    if (p.desirable[s] > 1) record_error(p.errors, s, kInvalidLabel);
  }
  __syncthreads();
  if (threadIdx.x == 0)
    p.partial->failures = atomicAdd(&p.errors->first, 0ull) == kNoError ? 0.0 : 1.0;
}

struct FinishParams {
  const KlPartial* partial;  ///< already all-reduced
  const float* policy_logp;
  const float* reference_logp;
  const std::uint8_t* desirable;
  index_t count;
  Options options;
  float* ratio;
  float* reward;
  float* loss;
  float* grad_logp;
  Metrics* metrics;
  DeviceErrors* errors;
};

__global__ void __launch_bounds__(kFinishThreads) finish_kernel(FinishParams p) {
  // Raw storage: a __shared__ array of a type with member initialisers would
  // ask for dynamic initialisation, which shared memory does not get.
  __shared__ alignas(MetricSums) unsigned char storage[sizeof(MetricSums) * kFinishThreads];
  MetricSums* sums = reinterpret_cast<MetricSums*>(storage);
  const KlPartial kl = *p.partial;
  const double z0 = reference_point(kl, p.options);
  const double scale = reduction_scale(p.options, p.count);
  MetricSums local;
  for (index_t s = threadIdx.x; s < p.count; s += kFinishThreads) {
    const float logp = p.policy_logp[s], ref = p.reference_logp[s];
    const std::uint8_t label = p.desirable[s];
    if (!(isfinite(logp) && isfinite(ref))) record_error(p.errors, s, kNonFiniteInput);
    if (label > 1) record_error(p.errors, s, kInvalidLabel);
    const double rho = static_cast<double>(logp) - static_cast<double>(ref);
    const ExampleTerms t = example_terms(rho, label != 0, z0, p.options, scale);
    p.ratio[s] = static_cast<float>(rho);
    p.reward[s] = static_cast<float>(t.reward);
    p.loss[s] = static_cast<float>(t.loss);
    p.grad_logp[s] = static_cast<float>(t.grad_logp);
    local.add(label != 0, t.loss, t.reward, static_cast<double>(logp));
  }
  new (&sums[threadIdx.x]) MetricSums(local);
  __syncthreads();
  for (int stride = kFinishThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) sums[threadIdx.x].merge(sums[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *p.metrics = finalize(sums[0], z0, scale);
    if (!isfinite(kl.sum) || !isfinite(kl.count))
      record_error(p.errors, 0, kNonFiniteInput | kKlBatchTag);
    // z0 would silently be 0 (the CPU path raises the same error before finishing).
    else if (uses_kl_batch(p.options) && kl.count < 1.0)
      record_error(p.errors, 0, kEmptyKlBatch);
    // Another rank failed before the all-reduce: this rank's result is not
    // the batch's either. Its own error (if any) ranks first.
    if (kl.failures > 0.0) record_error(p.errors, static_cast<index_t>(kl.failures), kPeerFailure);
  }
}

}  // namespace device
}  // namespace kto
