// bench_fused_cuda — the fused-linear KTO step against the dense bf16 matmul peak.
//
// Hidden states H (N × D), lm_head W (V × D), bf16, every token scored. The
// useful work of a policy step is three N·V·D GEMM passes (logits, dH, dW):
// 6·N·V·D FLOPs; the KL batch adds a forward pass, the reference model's
// log-probs another. This program measures a large bf16 GEMM on the same card
// (cuBLAS, fp32 accumulate) as the peak, then times (median of --reps, CUDA
// events) the reference forward, the policy step kept, recomputed and by vocabulary
// blocks (dW written once in bf16; one more logits pass), the full step with its KL
// batch, "reference forward + policy step" — the work Liger's
// LigerFusedLinearKTOLoss does with use_ref_model=True, kept and by blocks — and the
// policy step with a frozen head (LoRA: no dW, 2 passes kept, 3 recomputed), alone and
// after the reference forward, and prints
// ms, TFLOP/s, the fraction of the measured peak and the device memory this
// program holds (inputs, outputs, workspace), with a table last. With
// --prompt-fraction P the first P·T tokens of each sequence are prompt (ignored),
// and the policy step also runs with compact scoring (host copies of the targets:
// the GEMMs multiply the scored rows only), beside the same step multiplying
// every row.
//
//   usage: bench_fused_cuda [--batch B] [--len T] [--dim D[,D...]] [--vocab V]
//                           [--chunk-mb M[,M...]] [--reps R] [--prompt-fraction P]
#include <cublas_v2.h>

#include <kto/cuda.hpp>
#include <kto/cuda/fused_linear.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "cuda_bench_support.cuh"

namespace {

using kto::index_t;
using bf16 = __nv_bfloat16;
using namespace bench;

/// Tracks what this program holds on the device.
size_t g_held = 0;
template <class U>
U* hold(size_t n) {
  g_held += n * sizeof(U);
  return device_alloc<U>(n);
}

/// Values u·scale, u uniform in [−1, 1).
__global__ void fill_uniform(bf16* x, size_t n, float scale, unsigned seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const float u = (hash(i * 2654435761ull + seed) & 0xFFFFFF) / float(0x1000000);
    x[i] = __float2bfloat16_rn(scale * (2.0f * u - 1.0f));
  }
}

double peak_tflops(cublasHandle_t h, int reps, cudaStream_t stream, void* flush,
                   size_t flush_bytes) {
  const int n = 8192;
  bf16 *a = device_alloc<bf16>(size_t(n) * n), *b = device_alloc<bf16>(size_t(n) * n),
       *c = device_alloc<bf16>(size_t(n) * n);
  fill_uniform<<<4096, 256, 0, stream>>>(a, size_t(n) * n, 1.0f, 1);
  fill_uniform<<<4096, 256, 0, stream>>>(b, size_t(n) * n, 1.0f, 2);
  const float one = 1.0f, zero = 0.0f;
  const double ms = median_ms(reps, stream, flush, flush_bytes, [&](cudaStream_t) {
    cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n,
                 &zero, c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  });
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * n * double(n) * n / (ms * 1e-3) / 1e12;
}

struct Row {
  std::string name;
  double ms, tflop, tflops, fraction, mb;
};

}  // namespace

int main(int argc, char** argv) {
  index_t batch = 32, len = 512, vocab = 128256;
  std::vector<index_t> dims = {1024, 4096}, chunk_mb = {1024};
  int reps = 10;
  double prompt_fraction = 0.0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--batch")
      batch = std::atoll(argv[i + 1]);
    else if (a == "--len")
      len = std::atoll(argv[i + 1]);
    else if (a == "--vocab")
      vocab = std::atoll(argv[i + 1]);
    else if (a == "--dim")
      dims = parse_list(argv[i + 1]);
    else if (a == "--chunk-mb")
      chunk_mb = parse_list(argv[i + 1]);
    else if (a == "--reps")
      reps = std::atoi(argv[i + 1]);
    else if (a == "--prompt-fraction")
      prompt_fraction = std::atof(argv[i + 1]);
    else {
      std::fprintf(stderr,
                   "usage: %s [--batch B] [--len T] [--dim D[,D]] [--vocab V] [--chunk-mb M[,M]] "
                   "[--reps R] [--prompt-fraction P]\n",
                   argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop{};
  if (!first_device(prop)) return 77;
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  cublasHandle_t blas;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) return 1;
  cublasSetStream(blas, stream);
  const size_t flush_bytes = size_t{64} << 20;
  void* flush = device_alloc<char>(flush_bytes);
  const double peak = peak_tflops(blas, reps, stream, flush, flush_bytes);
  std::printf("device: %s; bf16 GEMM 8192^3 (cuBLAS, fp32 accumulate): %.0f TFLOP/s\n", prop.name,
              peak);

  std::vector<Row> table;
  for (const index_t D : dims) {
    g_held = 0;
    const index_t N = batch * len;
    bf16* hidden = hold<bf16>(size_t(N) * D);
    bf16* kl_hidden = hold<bf16>(size_t(N) * D);
    bf16* ref_hidden = hold<bf16>(size_t(N) * D);
    bf16* weight = hold<bf16>(size_t(vocab) * D);
    bf16* ref_weight = hold<bf16>(size_t(vocab) * D);
    index_t* targets = hold<index_t>(N);
    index_t* offsets = hold<index_t>(batch + 1);
    float* ref_logp = hold<float>(batch);
    index_t* ref_tokens = hold<index_t>(batch);
    std::uint8_t* desirable = hold<std::uint8_t>(batch);
    const float wscale = 3.0f / std::sqrt(float(D));
    fill_uniform<<<4096, 256, 0, stream>>>(hidden, size_t(N) * D, 1.0f, 3);
    fill_uniform<<<4096, 256, 0, stream>>>(kl_hidden, size_t(N) * D, 1.0f, 4);
    fill_uniform<<<4096, 256, 0, stream>>>(ref_hidden, size_t(N) * D, 1.0f, 5);
    fill_uniform<<<4096, 256, 0, stream>>>(weight, size_t(vocab) * D, wscale, 6);
    fill_uniform<<<4096, 256, 0, stream>>>(ref_weight, size_t(vocab) * D, wscale, 7);
    fill_targets<<<1024, 256, 0, stream>>>(targets, N, vocab, 8);
    // The prompt: the first prompt_fraction·len tokens of each sequence are ignored.
    std::vector<index_t> host_targets(static_cast<size_t>(N));
    CHECK_CUDA(
        cudaMemcpy(host_targets.data(), targets, sizeof(index_t) * N, cudaMemcpyDeviceToHost));
    const auto prompt = static_cast<index_t>(prompt_fraction * double(len));
    index_t scored = 0;
    for (index_t r = 0; r < N; ++r) {
      if (r % len < prompt) host_targets[static_cast<size_t>(r)] = -100;
      scored += host_targets[static_cast<size_t>(r)] != -100;
    }
    CHECK_CUDA(
        cudaMemcpy(targets, host_targets.data(), sizeof(index_t) * N, cudaMemcpyHostToDevice));
    const std::vector<index_t> host_offsets = kto::padded_offsets(batch, len);
    std::vector<std::uint8_t> labels(batch);
    for (index_t s = 0; s < batch; ++s) labels[s] = s % 2;
    CHECK_CUDA(cudaMemcpy(offsets, host_offsets.data(), sizeof(index_t) * (batch + 1),
                          cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(desirable, labels.data(), batch, cudaMemcpyHostToDevice));
    kto::Metrics* metrics = hold<kto::Metrics>(1);
    float* d_hidden = hold<float>(size_t(N) * D);
    float* d_weight = hold<float>(size_t(vocab) * D);
    bf16* d_weight_bf16 = hold<bf16>(size_t(vocab) * D);  // vocab_blocks' dW
    const size_t held_base = g_held;

    kto::LinearHead<bf16> head, ref_head;
    head.weight = kto::matrix_view<const bf16>(weight, vocab, D);
    ref_head.weight = kto::matrix_view<const bf16>(ref_weight, vocab, D);
    kto::cuda::FusedLinearInputs<bf16> in;
    in.hidden = kto::matrix_view<const bf16>(hidden, N, D);
    in.targets = kto::targets_vector(targets, N);
    in.sequences = kto::sequences(offsets, batch);
    in.host_offsets = host_offsets.data();
    in.reference_logp = kto::reference_logp(ref_logp, batch);
    in.desirable = desirable;
    in.kl.hidden = kto::matrix_view<const bf16>(kl_hidden, N, D);
    in.kl.targets = in.targets;
    in.kl.sequences = in.sequences;
    in.kl.reference_logp = kto::reference_logp(ref_logp, batch);
    kto::cuda::FusedLinearOutputs out;
    out.metrics = metrics;
    out.d_hidden = kto::matrix_view(d_hidden, N, D);
    out.d_weight = kto::matrix_view(d_weight, vocab, D);
    kto::cuda::FusedLinearOutputs out_bf16 = out;
    out_bf16.d_weight = {};
    out_bf16.d_weight_in_input_type = kto::MatrixView<void>{d_weight_bf16, vocab, D, D};
    kto::cuda::FusedLinearOutputs out_frozen = out;  // LoRA: the lm_head gets no gradient
    out_frozen.d_weight = {};

    const double pass = 2.0 * double(N) * double(vocab) * double(D) / 1e12;  // TFLOP
    for (const index_t mb : chunk_mb) {
      kto::cuda::FusedLinearConfig keep, recompute, blocks;
      keep.chunk_bytes = recompute.chunk_bytes = blocks.chunk_bytes = size_t(mb) << 20;
      recompute.strategy = kto::cuda::FusedStrategy::recompute;
      blocks.strategy = kto::cuda::FusedStrategy::vocab_blocks;
      kto::Options fixed, kl;
      fixed.reference_point = kto::ReferencePoint::fixed;
      size_t bytes = 0, ref_bytes = 0;
      kto::cuda::fused_linear_kto_step<bf16>(blas, nullptr, bytes, in, head, kl, out, stream, keep);
      const auto ref_in = kto::matrix_view<const bf16>(ref_hidden, N, D);
      kto::cuda::fused_linear_logprobs<bf16>(blas, nullptr, ref_bytes, ref_in, in.targets,
                                             in.sequences, ref_head, fixed, ref_logp, ref_tokens,
                                             stream, keep);
      size_t compact_bytes = 0;  // compact scoring carves its row map and dH rows too
      in.host_targets = host_targets.data();
      kto::cuda::fused_linear_kto_step<bf16>(blas, nullptr, compact_bytes, in, head, kl, out,
                                             stream, keep);
      in.host_targets = nullptr;
      size_t blocks_bytes = 0;  // every row's hidden states at once
      kto::cuda::fused_linear_kto_step<bf16>(blas, nullptr, blocks_bytes, in, head, kl, out_bf16,
                                             stream, blocks);
      const size_t ws_bytes = std::max({bytes, ref_bytes, compact_bytes, blocks_bytes});
      void* ws = device_alloc<char>(ws_bytes);
      const double held_mb = double(held_base + ws_bytes) / (1 << 20);
      const double ws_mb = double(ws_bytes) / (1 << 20);
      auto reference = [&](cudaStream_t s) {
        size_t b = ws_bytes;
        CHECK_STATUS(kto::cuda::fused_linear_logprobs<bf16>(blas, ws, b, ref_in, in.targets,
                                                            in.sequences, ref_head, fixed, ref_logp,
                                                            ref_tokens, s, keep));
      };
      // `frozen`: no dW asked for (the frozen step's workspace is no larger than the full one's).
      auto step = [&](const kto::Options& o, const kto::cuda::FusedLinearConfig& cfg,
                      bool frozen = false) {
        return [&, o, cfg, frozen](cudaStream_t s) {
          size_t b = ws_bytes;
          const auto& outputs = frozen                            ? out_frozen
                                : cfg.strategy == blocks.strategy ? out_bf16
                                                                  : out;
          CHECK_STATUS(
              kto::cuda::fused_linear_kto_step<bf16>(blas, ws, b, in, head, o, outputs, s, cfg));
        };
      };
      reference(stream);
      CHECK_STATUS(kto::cuda::read_status(ws, stream));
      auto add = [&](const std::string& name, double flop, double ms) {
        const double tflops = flop / (ms * 1e-3);
        table.push_back({"D=" + std::to_string(D) + " chunk " + std::to_string(mb) + "MB " + name,
                         ms, flop, tflops, tflops / peak, held_mb});
        std::printf("%-58s %9.2f ms %7.1f TFLOP/s %5.1f%% of peak  (workspace %.0f MB)\n",
                    table.back().name.c_str(), ms, tflops, 100 * tflops / peak, ws_mb);
      };
      add("reference forward", pass, median_ms(reps, stream, flush, flush_bytes, reference));
      add("policy step, keep", 3 * pass,
          median_ms(reps, stream, flush, flush_bytes, step(fixed, keep)));
      CHECK_STATUS(kto::cuda::read_status(ws, stream));
      add("policy step, recompute", 3 * pass,
          median_ms(reps, stream, flush, flush_bytes, step(fixed, recompute)));
      add("policy step, vocab_blocks (bf16 dW)", 3 * pass,
          median_ms(reps, stream, flush, flush_bytes, step(fixed, blocks)));
      CHECK_STATUS(kto::cuda::read_status(ws, stream));
      add("policy step, keep, frozen head (no dW)", 2 * pass,
          median_ms(reps, stream, flush, flush_bytes, step(fixed, keep, true)));
      add("policy step, recompute, frozen head (no dW)", 2 * pass,
          median_ms(reps, stream, flush, flush_bytes, step(fixed, recompute, true)));
      CHECK_STATUS(kto::cuda::read_status(ws, stream));
      if (prompt > 0) {  // the same step, its GEMMs over the scored rows only
        in.host_targets = host_targets.data();
        add("policy step, keep, compact scoring", 3 * pass * double(scored) / double(N),
            median_ms(reps, stream, flush, flush_bytes, step(fixed, keep)));
        CHECK_STATUS(kto::cuda::read_status(ws, stream));
        in.host_targets = nullptr;
      }
      add("full step (KL + policy), keep", 4 * pass,
          median_ms(reps, stream, flush, flush_bytes, step(kl, keep)));
      CHECK_STATUS(kto::cuda::read_status(ws, stream));
      auto both = step(fixed, keep);
      add("ref forward + policy step (Liger's work)", 4 * pass,
          median_ms(reps, stream, flush, flush_bytes, [&](cudaStream_t s) {
            reference(s);
            both(s);
          }));
      auto both_blocks = step(fixed, blocks);
      add("ref forward + policy step, vocab_blocks (Liger's work)", 4 * pass,
          median_ms(reps, stream, flush, flush_bytes, [&](cudaStream_t s) {
            reference(s);
            both_blocks(s);
          }));
      auto both_frozen = step(fixed, keep, true);
      add("ref forward + policy step, keep, frozen head (LoRA)", 3 * pass,
          median_ms(reps, stream, flush, flush_bytes, [&](cudaStream_t s) {
            reference(s);
            both_frozen(s);
          }));
      {
        // The three GEMM passes alone, on the step's chunks: the step minus this is
        // what the row kernels and the launches cost.
        const kto::cuda::detail::ChunkShape<bf16> shape(vocab, keep.chunk_bytes, N);
        float* z = device_alloc<float>(size_t(shape.rows) * shape.ld_logits);
        bf16* g = device_alloc<bf16>(size_t(shape.rows) * shape.ld_grad);
        // Random operands: tensor cores run measurably faster on zeros.
        fill_uniform<<<4096, 256, 0, stream>>>(g, size_t(shape.rows) * shape.ld_grad, 1e-3f, 9);
        const float one = 1.0f, zero = 0.0f;
        const int V = int(vocab), Di = int(D);
        add("three GEMM passes alone, same chunks", 3 * pass,
            median_ms(reps, stream, flush, flush_bytes, [&](cudaStream_t) {
              for (index_t r0 = 0; r0 < N; r0 += shape.rows) {
                const int n = int(std::min(shape.rows, N - r0));
                const bf16* h = hidden + size_t(r0) * D;
                cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, V, n, Di, &one, weight, CUDA_R_16BF,
                             Di, h, CUDA_R_16BF, Di, &zero, z, CUDA_R_32F, int(shape.ld_logits),
                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
                cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, Di, n, V, &one, weight, CUDA_R_16BF,
                             Di, g, CUDA_R_16BF, int(shape.ld_grad), &zero,
                             d_hidden + size_t(r0) * D, CUDA_R_32F, Di, CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT);
                const float beta = r0 == 0 ? 0.0f : 1.0f;
                cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_T, Di, V, n, &one, h, CUDA_R_16BF, Di, g,
                             CUDA_R_16BF, int(shape.ld_grad), &beta, d_weight, CUDA_R_32F, Di,
                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
              }
            }));
        CHECK_CUDA(cudaFree(z));
        CHECK_CUDA(cudaFree(g));
      }
      kto::Metrics m{};
      CHECK_CUDA(cudaMemcpy(&m, metrics, sizeof(m), cudaMemcpyDeviceToHost));
      std::printf("  check: loss %.6f, logps chosen %.1f (finite: %s)\n", m.loss, m.logps_chosen,
                  std::isfinite(m.loss) ? "yes" : "NO");
      CHECK_CUDA(cudaFree(ws));
    }
    for (void* p :
         {(void*)hidden, (void*)kl_hidden, (void*)ref_hidden, (void*)weight, (void*)ref_weight,
          (void*)targets, (void*)offsets, (void*)ref_logp, (void*)ref_tokens, (void*)desirable,
          (void*)metrics, (void*)d_hidden, (void*)d_weight, (void*)d_weight_bf16})
      CHECK_CUDA(cudaFree(p));
  }

  std::printf("\nfused-linear KTO step, B=%lld T=%lld V=%lld bf16, %s (peak %.0f TFLOP/s)\n",
              static_cast<long long>(batch), static_cast<long long>(len),
              static_cast<long long>(vocab), prop.name, peak);
  std::printf("%-58s %9s %9s %7s %10s\n", "case", "ms", "TFLOP/s", "% peak", "held MB");
  for (const Row& r : table)
    std::printf("%-58s %9.2f %9.1f %6.1f%% %10.0f\n", r.name.c_str(), r.ms, r.tflops,
                100 * r.fraction, r.mb);
  std::printf(
      "(held MB: inputs incl. reference model and KL hidden states, fp32 dH and dW, "
      "workspace)\n");
  return 0;
}
