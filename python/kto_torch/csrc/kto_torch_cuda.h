// kto_torch_cuda.h — the CUDA half of the PyTorch bindings, behind a plain C++
// interface: no torch header reaches nvcc and no CUDA header reaches the torch
// translation unit. Every pointer is device memory; `stream` is a cudaStream_t.
// Each call returns an empty string on success, the library's message otherwise.
#pragma once

#include <cstdint>
#include <string>

#include <kto/layout.hpp>
#include <kto/options.hpp>

namespace kto_torch_cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct Logits {
  DType dtype;
  const void* data;
  kto::index_t vocab;
  kto::RowIndex rows;
};

/// Workspace bytes of forward() for this many rows.
std::size_t forward_workspace_bytes(kto::index_t rows);

/// Per-sequence logp and counts; per-row lse into row_lse (0 where not scored).
std::string forward(const Logits& logits, const kto::TargetsView& targets,
                    const kto::SequencesView& sequences, const kto::Options& o, float* logp,
                    kto::index_t* num_tokens, float* row_lse, void* workspace,
                    std::size_t workspace_bytes, void* stream);

/// The logits step's forward (kto::cuda::step_forward). With workspace == nullptr only
/// *workspace_bytes is set. metrics[9] float64, per_example[5, B] (logp, ρ, βρ, loss, g_s),
/// num_tokens[B], row_lse[rows] (0 where not scored), token_statistics[2, B] (entropy
/// sums, then mean-logit sums; with options.token_statistics, else null). The KL batch is given as
/// precomputed log-probs (kl_count of them), or replaced by global_kl, an all-reduced (S, C) (two
/// float64) when non-null.
std::string step_forward(const Logits& logits, const kto::TargetsView& targets,
                         const kto::SequencesView& sequences, const float* reference_logp,
                         const std::uint8_t* desirable, const float* kl_policy_logp,
                         const float* kl_reference_logp, const kto::index_t* kl_num_tokens,
                         kto::index_t kl_count, const double* global_kl, const kto::Options& o,
                         double* metrics, float* per_example, kto::index_t* num_tokens,
                         float* row_lse, double* token_statistics, void* workspace,
                         std::size_t* workspace_bytes, void* stream);

/// dlogits (same dtype, `grad` layout) from row_lse and dL/dlogp.
std::string backward(const Logits& logits, const kto::TargetsView& targets,
                     const kto::SequencesView& sequences, const float* row_lse,
                     const float* grad_logp, const kto::index_t* num_tokens, const kto::Options& o,
                     void* grad, const kto::RowIndex& grad_rows, void* stream);

/// A [rows, cols] matrix, rows `stride` elements apart.
struct Matrix {
  DType dtype;
  const void* data;
  kto::index_t rows, cols, stride;
};

/// The lm_head's bias: `size` elements of the weight's dtype, or none (data null, size 0).
/// The library checks size against the weight's rows.
struct Bias {
  const void* data;
  kto::index_t size;
};

/// The fused-linear step (kto::cuda::fused_linear_kto_step). With workspace ==
/// nullptr only *workspace_bytes is set. metrics[9] float64, per_example[5, B]
/// (logp, ρ, βρ, loss, g_s), token_statistics[2, B] as step_forward's; d_weight and
/// d_bias may be null (not computed: a frozen head). d_weight is fp32, or with
/// d_weight_in_input_type hidden's dtype (strategy vocab_blocks only). Host copies of each batch's
/// targets and offsets turn on compact scoring (the GEMMs multiply the scored rows only);
/// `host_offsets` (B + 1, host) lets whole sequences share a chunk (keep_chunk).
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
                              std::size_t* workspace_bytes, void* stream);

/// Forward only (kto::cuda::fused_linear_logprobs); same workspace protocol; host copies
/// of the targets and offsets: compact scoring, as in fused_linear_step.
std::string fused_linear_logprobs(const Matrix& hidden, const Matrix& weight, const Bias& bias,
                                  const kto::TargetsView& targets,
                                  const kto::SequencesView& sequences,
                                  const kto::index_t* host_offsets,
                                  const kto::index_t* host_targets, const kto::Options& o,
                                  std::size_t chunk_bytes, float* logp, kto::index_t* num_tokens,
                                  void* workspace, std::size_t* workspace_bytes, void* stream);

/// Synchronises the stream and reports errors the kernels recorded in `workspace`.
std::string read_status(const void* workspace, const kto::SequencesView& sequences, void* stream);

}  // namespace kto_torch_cuda
