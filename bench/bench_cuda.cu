// bench_cuda — the CUDA KTO step against the bandwidth floor (docs/performance.md).
//
// The step reads the policy logits (forward), the KL logits (forward) and the
// policy logits again while writing their gradient (backward): 4L bytes for
// logits of L bytes. This program measures the device-to-device copy bandwidth
// on the same card, then times the step and its phases with CUDA events
// (median of --reps runs, L2 flushed before each), and prints time, GB/s and
// the fraction of the 4L / bandwidth floor.
//
//   usage: bench_cuda [--vocab V[,V...]] [--seqs N] [--len T] [--reps R]
#include <kto/cuda.hpp>

#include "cuda_bench_support.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using kto::index_t;
using bf16 = __nv_bfloat16;
using namespace bench;

}  // namespace

int main(int argc, char** argv) {
  std::vector<index_t> vocabs = {128256, 32000};
  index_t seqs = 16, len = 2048;
  int reps = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--vocab") {
      vocabs = parse_list(argv[i + 1]);
    } else if (a == "--seqs") {
      seqs = std::atoll(argv[i + 1]);
    } else if (a == "--len") {
      len = std::atoll(argv[i + 1]);
    } else if (a == "--reps") {
      reps = std::atoi(argv[i + 1]);
    } else {
      std::fprintf(stderr, "usage: %s [--vocab V[,V...]] [--seqs N] [--len T] [--reps R]\n",
                   argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop{};
  if (!first_device(prop)) return 77;
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  const size_t flush_bytes = size_t(256) << 20;
  void* flush = device_alloc<char>(flush_bytes);

  // Copy bandwidth: bytes read + bytes written per second.
  const size_t copy_bytes = size_t(2) << 30;
  char* a = device_alloc<char>(copy_bytes);
  char* b = device_alloc<char>(copy_bytes);
  CHECK_CUDA(cudaMemset(a, 1, copy_bytes));
  const double copy_ms = median_ms(reps, stream, flush, flush_bytes, [&](cudaStream_t s) {
    CHECK_CUDA(cudaMemcpyAsync(b, a, copy_bytes, cudaMemcpyDeviceToDevice, s));
  });
  const double bandwidth = 2.0 * copy_bytes / (copy_ms * 1e-3);  // B/s
  std::printf("device-to-device copy: %.3f ms for 2 x %.2f GB -> %.0f GB/s\n", copy_ms,
              copy_bytes / 1e9, bandwidth / 1e9);
  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));

  struct Row {
    index_t vocab;
    double step, forward, backward, floor_ms;
    size_t workspace;
  };
  std::vector<Row> table;
  for (const index_t V : vocabs) {
    const index_t rows = seqs * len;
    const size_t n = size_t(rows) * V;
    bf16* policy = device_alloc<bf16>(n);
    bf16* kl = device_alloc<bf16>(n);
    bf16* grad = device_alloc<bf16>(n);
    index_t* targets = device_alloc<index_t>(rows);
    index_t* kl_targets = device_alloc<index_t>(rows);
    fill_logits<<<4096, 256, 0, stream>>>(policy, n, 1);
    fill_logits<<<4096, 256, 0, stream>>>(kl, n, 2);
    fill_targets<<<256, 256, 0, stream>>>(targets, rows, V, 3);
    fill_targets<<<256, 256, 0, stream>>>(kl_targets, rows, V, 4);
    std::vector<index_t> off_h = kto::padded_offsets(seqs, len);
    index_t* offsets = device_alloc<index_t>(off_h.size());
    CHECK_CUDA(
        cudaMemcpy(offsets, off_h.data(), off_h.size() * sizeof(index_t), cudaMemcpyHostToDevice));
    std::vector<float> ref_h(seqs), kl_ref_h(seqs);
    std::vector<std::uint8_t> des_h(seqs);
    for (index_t s = 0; s < seqs; ++s) {
      ref_h[s] = -float(len) * 4.9f;
      kl_ref_h[s] = -float(len) * 5.0f;
      des_h[s] = std::uint8_t(s % 2);
    }
    float* ref = device_alloc<float>(seqs);
    float* kl_ref = device_alloc<float>(seqs);
    std::uint8_t* des = device_alloc<std::uint8_t>(seqs);
    CHECK_CUDA(cudaMemcpy(ref, ref_h.data(), seqs * sizeof(float), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(kl_ref, kl_ref_h.data(), seqs * sizeof(float), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(des, des_h.data(), seqs, cudaMemcpyHostToDevice));
    kto::Metrics* metrics = device_alloc<kto::Metrics>(1);

    kto::cuda::StepInputs<bf16> in;
    in.policy_logits = kto::logits_matrix<const bf16>(policy, rows, V);
    in.targets = kto::targets_vector(targets, rows);
    in.sequences = kto::sequences(offsets, seqs);
    in.reference_logp = kto::reference_logp(ref, seqs);
    in.desirable = des;
    in.kl.logits = kto::logits_matrix<const bf16>(kl, rows, V);
    in.kl.targets = kto::targets_vector(kl_targets, rows);
    in.kl.sequences = kto::sequences(offsets, seqs);
    in.kl.reference_logp = kto::reference_logp(kl_ref, seqs);
    kto::cuda::StepOutputs out;
    out.metrics = metrics;
    const auto grad_view = kto::logits_matrix<bf16>(grad, rows, V);
    const kto::Options opt;
    size_t bytes = 0;
    CHECK_STATUS(kto::cuda::kto_step(nullptr, bytes, in, opt, grad_view, out, stream));
    void* ws = device_alloc<char>(bytes);
    const double step = median_ms(reps, stream, flush, flush_bytes, [&](cudaStream_t s) {
      CHECK_STATUS(kto::cuda::kto_step(ws, bytes, in, opt, grad_view, out, s));
    });
    CHECK_STATUS(kto::cuda::read_status(ws, stream, in.sequences));

    // Phases on their own: the policy forward, then the backward from its lse.
    size_t fbytes = 0;
    float* logp = device_alloc<float>(seqs);
    index_t* ntok = device_alloc<index_t>(seqs);
    float* g = device_alloc<float>(seqs);
    CHECK_CUDA(cudaMemset(g, 0, seqs * sizeof(float)));
    CHECK_STATUS(kto::cuda::sequence_logprobs(nullptr, fbytes, in.policy_logits, in.targets,
                                              in.sequences, opt, logp, ntok, stream));
    void* fws = device_alloc<char>(fbytes);
    const double forward = median_ms(reps, stream, flush, flush_bytes, [&](cudaStream_t s) {
      CHECK_STATUS(kto::cuda::sequence_logprobs(fws, fbytes, in.policy_logits, in.targets,
                                                in.sequences, opt, logp, ntok, s));
    });
    const double backward = median_ms(reps, stream, flush, flush_bytes, [&](cudaStream_t s) {
      CHECK_STATUS(kto::cuda::backward(in.policy_logits, in.targets, in.sequences,
                                       kto::cuda::workspace_row_lse(fws), g, ntok, opt, grad_view,
                                       s));
    });
    const double L = double(n) * sizeof(bf16);
    table.push_back({V, step, forward, backward, 4.0 * L / bandwidth * 1e3, bytes});
    for (void* p : {(void*)policy, (void*)kl, (void*)grad, (void*)targets, (void*)kl_targets,
                    (void*)offsets, (void*)ref, (void*)kl_ref, (void*)des, (void*)metrics, ws, fws,
                    (void*)logp, (void*)ntok, (void*)g})
      CHECK_CUDA(cudaFree(p));
  }

  std::printf("\nKTO step, bf16, %lld + %lld sequences x %lld tokens, median of %d (L2 flushed)\n",
              (long long)seqs, (long long)seqs, (long long)len, reps);
  std::printf("%-8s %10s %10s %10s %10s %10s %9s %12s\n", "V", "step ms", "fwd ms", "bwd ms",
              "floor ms", "step GB/s", "of floor", "workspace MB");
  for (const Row& r : table) {
    const double L = double(seqs * len) * r.vocab * sizeof(bf16);
    std::printf("%-8lld %10.3f %10.3f %10.3f %10.3f %10.0f %8.1f%% %12.1f\n", (long long)r.vocab,
                r.step, r.forward, r.backward, r.floor_ms, 4.0 * L / (r.step * 1e-3) / 1e9,
                100.0 * r.floor_ms / r.step, r.workspace / 1e6);
  }
  return 0;
}
