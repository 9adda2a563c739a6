// kto_torch_cuda.cu — kto's CUDA host API behind kto_torch_cuda.h, with the
// dtype dispatch of the PyTorch bindings (float, __half, __nv_bfloat16).
#include <kto/cuda.hpp>
#include <kto/cuda/fused_linear.hpp>

#include "kto_torch_cuda.h"

namespace kto_torch_cuda {
namespace {

cudaStream_t as_stream(void* s) {
  return static_cast<cudaStream_t>(s);
}

std::string message(const kto::cuda::Status& s) {
  return s.ok() ? std::string() : s.message;
}

template <class Fn>
std::string dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32:
      return fn(float{});
    case DType::f16:
      return fn(__half{});
    case DType::bf16:
      return fn(__nv_bfloat16{});
  }
  return "kto: argument 'logits' has an unsupported dtype";
}

template <class T>
kto::LogitsView<const T> view(const Logits& z) {
  return kto::LogitsView<const T>{static_cast<const T*>(z.data), z.vocab, z.rows};
}

__global__ void metrics_to_doubles(const kto::Metrics* m, double* out) {
  kto::metrics_to_array(*m, out);
}

template <class T>
kto::MatrixView<const T> matrix(const Matrix& m) {
  return kto::MatrixView<const T>{static_cast<const T*>(m.data), m.rows, m.cols, m.stride};
}

std::size_t round_up(std::size_t x) {
  return (x + 255) / 256 * 256;
}

/// A [2, B] float64 buffer (entropy sums, then mean-logit sums) as the library's outputs.
kto::cuda::SequenceTokenStatistics statistics_of(double* token_statistics, kto::index_t B) {
  if (token_statistics == nullptr) return {};
  return {token_statistics, token_statistics + B};
}

}  // namespace

std::size_t forward_workspace_bytes(kto::index_t rows) {
  return kto::cuda::sequence_logprobs_workspace_bytes(rows);
}

std::string forward(const Logits& logits, const kto::TargetsView& targets,
                    const kto::SequencesView& sequences, const kto::Options& o, float* logp,
                    kto::index_t* num_tokens, float* row_lse, void* workspace,
                    std::size_t workspace_bytes, void* stream) {
  return dispatch(logits.dtype, [&](auto tag) -> std::string {
    using T = decltype(tag);
    std::size_t bytes = workspace_bytes;
    const auto s =
        kto::cuda::sequence_logprobs<T>(workspace, bytes, view<T>(logits), targets, sequences, o,
                                        logp, num_tokens, as_stream(stream));
    if (!s.ok()) return message(s);
    const kto::index_t rows = logits.rows.rows;
    if (rows > 0)
      cudaMemcpyAsync(row_lse, kto::cuda::workspace_row_lse(workspace), rows * sizeof(float),
                      cudaMemcpyDeviceToDevice, as_stream(stream));
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? std::string() : cudaGetErrorString(err);
  });
}

std::string step_forward(const Logits& logits, const kto::TargetsView& targets,
                         const kto::SequencesView& sequences, const float* reference_logp,
                         const std::uint8_t* desirable, const float* kl_policy_logp,
                         const float* kl_reference_logp, const kto::index_t* kl_num_tokens,
                         kto::index_t kl_count, const double* global_kl, const kto::Options& o,
                         double* metrics, float* per_example, kto::index_t* num_tokens,
                         float* row_lse, double* token_statistics, void* workspace,
                         std::size_t* workspace_bytes, void* stream) {
  static_assert(sizeof(kto::KlPartial) == 3 * sizeof(double), "KlPartial is three doubles");
  return dispatch(logits.dtype, [&](auto tag) -> std::string {
    using T = decltype(tag);
    const kto::index_t B = sequences.count;
    kto::cuda::StepInputs<T> in;
    in.policy_logits = view<T>(logits);
    in.targets = targets;
    in.sequences = sequences;
    in.reference_logp = kto::reference_logp(reference_logp, B);
    in.desirable = desirable;
    in.kl.policy_logp = kto::policy_logp(kl_policy_logp, kl_count);
    in.kl.num_tokens = kl_num_tokens;
    in.kl.reference_logp = kto::reference_logp(kl_reference_logp, kl_count);
    const std::size_t step_bytes = round_up(kto::cuda::kto_step_workspace_bytes(in));
    if (workspace == nullptr) {  // the step's layout, then a kto::Metrics
      *workspace_bytes = step_bytes + sizeof(kto::Metrics);
      return std::string();
    }
    auto* m = reinterpret_cast<kto::Metrics*>(static_cast<char*>(workspace) + step_bytes);
    kto::cuda::StepOutputs out;
    out.metrics = m;
    out.logp = per_example;
    out.examples = {per_example + B, per_example + 2 * B, per_example + 3 * B, per_example + 4 * B};
    out.num_tokens = num_tokens;
    out.row_lse = row_lse;
    out.token_statistics = statistics_of(token_statistics, B);
    // An all-reduced (S, C) given by the caller stands in for the local KL partial.
    kto::cuda::KlAllReduce use_global;
    if (global_kl)
      use_global = [global_kl](kto::KlPartial* p, cudaStream_t st) {
        cudaMemcpyAsync(p, global_kl, 2 * sizeof(double), cudaMemcpyDeviceToDevice, st);
        cudaMemsetAsync(&p->failures, 0, sizeof(double), st);
        return kto::cuda::Status::success();
      };
    std::size_t bytes = step_bytes;
    const auto s =
        kto::cuda::step_forward<T>(workspace, bytes, in, o, out, as_stream(stream), use_global);
    if (!s.ok()) return message(s);
    metrics_to_doubles<<<1, 1, 0, as_stream(stream)>>>(m, metrics);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? std::string() : cudaGetErrorString(err);
  });
}

std::string backward(const Logits& logits, const kto::TargetsView& targets,
                     const kto::SequencesView& sequences, const float* row_lse,
                     const float* grad_logp, const kto::index_t* num_tokens, const kto::Options& o,
                     void* grad, const kto::RowIndex& grad_rows, void* stream) {
  return dispatch(logits.dtype, [&](auto tag) -> std::string {
    using T = decltype(tag);
    const kto::LogitsView<T> g{static_cast<T*>(grad), logits.vocab, grad_rows};
    return message(kto::cuda::backward<T>(view<T>(logits), targets, sequences, row_lse, grad_logp,
                                          num_tokens, o, g, as_stream(stream)));
  });
}

std::string fused_linear_step(const Matrix& hidden, const Matrix& weight, const Bias& bias,
                              const kto::TargetsView& targets, const kto::SequencesView& sequences,
                              const kto::index_t* host_offsets, const kto::index_t* host_targets,
                              const float* reference_logp, const std::uint8_t* desirable,
                              const Matrix& kl_hidden, const kto::TargetsView& kl_targets,
                              const kto::SequencesView& kl_sequences,
                              const kto::index_t* kl_host_offsets,
                              const kto::index_t* kl_host_targets, const float* kl_reference_logp,
                              const kto::Options& o, std::size_t chunk_bytes, int strategy,
                              double* metrics, float* per_example, kto::index_t* num_tokens,
                              double* token_statistics, float* d_hidden, void* d_weight,
                              bool d_weight_in_input_type, float* d_bias, void* workspace,
                              std::size_t* workspace_bytes, void* stream) {
  return dispatch(hidden.dtype, [&](auto tag) -> std::string {
    using T = decltype(tag);
    kto::LinearHead<T> head;
    head.weight = matrix<T>(weight);
    // Its own length: the library checks it against the weight's rows.
    head.bias = kto::make_span(static_cast<const T*>(bias.data), bias.size);
    kto::cuda::FusedLinearInputs<T> in;
    in.hidden = matrix<T>(hidden);
    in.targets = targets;
    in.sequences = sequences;
    in.host_offsets = host_offsets;
    in.host_targets = host_targets;
    in.reference_logp = kto::reference_logp(reference_logp, sequences.count);
    in.desirable = desirable;
    in.kl.hidden = matrix<T>(kl_hidden);
    in.kl.targets = kl_targets;
    in.kl.sequences = kl_sequences;
    in.kl.reference_logp = kto::reference_logp(kl_reference_logp, kl_sequences.count);
    in.kl.host_offsets = kl_host_offsets;
    in.kl.host_targets = kl_host_targets;
    kto::cuda::FusedLinearConfig cfg;
    cfg.chunk_bytes = chunk_bytes;
    cfg.strategy = static_cast<kto::cuda::FusedStrategy>(strategy);
    const std::size_t step_bytes = round_up(kto::cuda::fused_linear_workspace_bytes(in, head, cfg));
    if (workspace == nullptr) {
      *workspace_bytes = step_bytes + sizeof(kto::Metrics);
      return std::string();
    }
    const kto::index_t B = sequences.count;
    auto* m = reinterpret_cast<kto::Metrics*>(static_cast<char*>(workspace) + step_bytes);
    kto::cuda::FusedLinearOutputs out;
    out.metrics = m;
    out.logp = per_example;
    out.num_tokens = num_tokens;
    out.examples = {per_example + B, per_example + 2 * B, per_example + 3 * B, per_example + 4 * B};
    out.d_hidden = kto::matrix_view(d_hidden, hidden.rows, hidden.cols);
    // A null d_weight (a frozen head) asks for no dW at all.
    if (d_weight && d_weight_in_input_type)
      out.d_weight_in_input_type =
          kto::MatrixView<void>{d_weight, weight.rows, weight.cols, weight.cols};
    else if (d_weight)
      out.d_weight = kto::matrix_view(static_cast<float*>(d_weight), weight.rows, weight.cols);
    if (d_bias) out.d_bias = kto::make_span(d_bias, weight.rows);
    out.token_statistics = statistics_of(token_statistics, B);
    std::size_t bytes = step_bytes;
    cublasHandle_t handle = nullptr;
    const auto hs = kto::cuda::shared_blas_handle(&handle);
    if (!hs.ok()) return message(hs);
    const auto s = kto::cuda::fused_linear_kto_step<T>(handle, workspace, bytes, in, head, o, out,
                                                       as_stream(stream), cfg);
    if (!s.ok()) return message(s);
    metrics_to_doubles<<<1, 1, 0, as_stream(stream)>>>(m, metrics);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? std::string() : cudaGetErrorString(err);
  });
}

std::string fused_linear_logprobs(const Matrix& hidden, const Matrix& weight, const Bias& bias,
                                  const kto::TargetsView& targets,
                                  const kto::SequencesView& sequences,
                                  const kto::index_t* host_offsets,
                                  const kto::index_t* host_targets, const kto::Options& o,
                                  std::size_t chunk_bytes, float* logp, kto::index_t* num_tokens,
                                  void* workspace, std::size_t* workspace_bytes, void* stream) {
  return dispatch(hidden.dtype, [&](auto tag) -> std::string {
    using T = decltype(tag);
    kto::LinearHead<T> head;
    head.weight = matrix<T>(weight);
    // Its own length: the library checks it against the weight's rows.
    head.bias = kto::make_span(static_cast<const T*>(bias.data), bias.size);
    kto::cuda::FusedLinearConfig cfg;
    cfg.chunk_bytes = chunk_bytes;
    if (workspace == nullptr) {
      *workspace_bytes = kto::cuda::fused_linear_logprobs_workspace_bytes(
          hidden.rows, head, cfg, host_offsets != nullptr && host_targets != nullptr);
      return std::string();
    }
    cublasHandle_t handle = nullptr;
    const auto hs = kto::cuda::shared_blas_handle(&handle);
    if (!hs.ok()) return message(hs);
    return message(kto::cuda::fused_linear_logprobs<T>(
        handle, workspace, *workspace_bytes, matrix<T>(hidden), targets, sequences, head, o, logp,
        num_tokens, as_stream(stream), cfg, {}, host_offsets, host_targets));
  });
}

std::string read_status(const void* workspace, const kto::SequencesView& sequences, void* stream) {
  return message(kto::cuda::read_status(workspace, as_stream(stream), sequences));
}

}  // namespace kto_torch_cuda
