// bind/arguments.hpp — one call of the library as plain data: raw pointers,
// shapes and dtype codes, no template parameter.
//
// A binding (kto_torch, kto_jax) checks its framework's tensors, then fills one of
// these structs and makes one call (kto/cuda/bind.hpp); the dtype code picks the
// instantiation there (bind/dtype.hpp). The fields carry the library's names:
//
//   StepForwardCall     kto::cuda::StepInputs<T> + StepOutputs   (logits step)
//   FusedLinearCall     kto::cuda::FusedLinearArguments<T>        (fused-linear step)
//   FusedLogprobsCall   kto::cuda::fused_linear_logprobs's arguments
//
// Every pointer is device memory except the host copies of a batch's targets and
// offsets (bind/compact.hpp), which turn on compact scoring. The KL batch comes as
// its log-probs (the logits step), or as the all-reduced (S, C) of them (GlobalKl),
// or as a fixed z0 in the options: what both bindings hand the fused step.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../fused_linear.hpp"
#include "../layout.hpp"
#include "../options.hpp"
#include "dtype.hpp"

namespace kto {
namespace bind {

/// A [rows, cols] matrix of `dtype`, rows `stride` elements apart (hidden states, a weight).
struct Matrix {
  DType dtype = DType::f32;
  const void* data = nullptr;
  index_t rows = 0, cols = 0, stride = 0;
};

/// Logits [rows, vocab] of `dtype`; `rows` says where each row starts (kto::RowIndex).
struct Logits {
  DType dtype = DType::f32;
  const void* data = nullptr;
  index_t vocab = 0;
  RowIndex rows;
};

/// A contiguous [rows, cols] matrix.
inline Matrix matrix(DType dtype, const void* data, index_t rows, index_t cols) {
  return Matrix{dtype, data, rows, cols, cols};
}

/// Contiguous [rows, vocab] logits (kto::logits_matrix's layout).
inline Logits logits_matrix(DType dtype, const void* data, index_t rows, index_t vocab) {
  return Logits{dtype, data, vocab, RowIndex{rows, rows > 0 ? rows : 1, 0, vocab}};
}

/// kto::LinearHead: the lm_head W [V, D] (or a vocabulary slice of it), its bias (W's
/// dtype; null with bias_size 0: none; the library checks the size against V).
struct LinearHead {
  Matrix weight;
  const void* bias = nullptr;
  index_t bias_size = 0;
  index_t vocab_begin = 0;  ///< global id of weight row 0 (vocab parallel)
  index_t vocab_total = 0;  ///< the whole vocabulary; 0: weight.rows (not sharded)
};

/// A batch's rows: its device targets and offsets, and optionally host copies of both
/// (compact scoring; bind/compact.hpp fills them).
struct Batch {
  TargetsView targets;
  SequencesView sequences;
  const index_t* host_offsets = nullptr;
  const index_t* host_targets = nullptr;
};

/// The KL batch as the logits step takes it: per-sequence log-probs (device; the
/// library checks their sizes), num_tokens as many or null unless kl_estimator is
/// nonempty_mean.
struct KlLogprobs {
  Span<const float> policy_logp;
  Span<const float> reference_logp;
  const index_t* num_tokens = nullptr;
};

/// An all-reduced (S, C) given by the caller: two values of `dtype` (f32 or f64) in
/// device memory, standing in for the local KL partial (data parallel). Null: none.
struct GlobalKl {
  DType dtype = DType::f64;
  const void* data = nullptr;
  explicit operator bool() const { return data != nullptr; }
};

/// The step's outputs (kto::cuda::StepOutputs): `metrics` kMetricCount values of
/// metrics_dtype (f32 or f64) in kMetricNames' order; `per_example` [kExampleOutputCount,
/// B] float rows (logp, ratio, reward, loss, grad_logp); num_tokens [B]; row_lse [rows]
/// (0 on unscored rows; the logits step only, may be null); token_statistics [2, B]
/// float64 (entropy sums, then mean-logit sums) with options.token_statistics, else null.
struct StepOutputs {
  void* metrics = nullptr;
  DType metrics_dtype = DType::f64;
  float* per_example = nullptr;
  index_t* num_tokens = nullptr;
  float* row_lse = nullptr;
  double* token_statistics = nullptr;
};

/// kto::cuda::LinearGradients: d_hidden [N, D] float, required; d_weight [V, D] in
/// d_weight_dtype (f32, or the step's input type with strategy vocab_blocks: each block
/// written once, no fp32 V × D array), null: no dW (a frozen head); d_bias [V] float,
/// null: no db.
struct LinearGradients {
  float* d_hidden = nullptr;
  void* d_weight = nullptr;
  DType d_weight_dtype = DType::f32;
  float* d_bias = nullptr;
};

/// Vocab parallel (the head a vocabulary slice): every slice's row partials of the
/// batch, `ranks` × `rows` kto::RowPartial<float> in device memory, rank-major (rank k's
/// row r at k·rows + r), as an all-gather of fused_linear_row_partials leaves them.
/// The step merges them in rank order. Null, or ignored when the head is the whole
/// vocabulary (a vocab axis of one device).
struct VocabSlices {
  index_t ranks = 0;
  index_t rows = 0;  ///< each slice's rows: the batch's (checked against the step's)
  const RowPartial<float>* gathered = nullptr;
  explicit operator bool() const { return gathered != nullptr; }
};

/// The logits step's forward (kto::cuda::step_forward).
struct StepForwardCall {
  Logits logits;
  Batch batch;
  Span<const float> reference_logp;         ///< B (the library checks the size)
  const std::uint8_t* desirable = nullptr;  ///< B (the binding checks the size)
  KlLogprobs kl;
  GlobalKl global_kl;  ///< replaces kl when given
  Options options;
  StepOutputs outputs;
};

/// The logits step's backward (kto::cuda::backward): dlogits in the logits' dtype.
struct BackwardCall {
  Logits logits;
  Batch batch;
  const float* row_lse = nullptr;    ///< the forward's, [rows]
  const float* grad_logp = nullptr;  ///< dL/dlogp_s, [B]
  const index_t* num_tokens = nullptr;
  Options options;
  void* grad = nullptr;
  RowIndex grad_rows;
};

/// The fused-linear step (kto::cuda::FusedLinearArguments). The KL batch enters as
/// global_kl or as a fixed z0 in the options; the target batch's host copies (batch)
/// turn on compact scoring, and with keep_chunk let whole sequences share a chunk.
struct FusedLinearCall {
  Matrix hidden;
  Batch batch;
  Span<const float> reference_logp;         ///< B (the library checks the size)
  const std::uint8_t* desirable = nullptr;  ///< B (the binding checks the size)
  LinearHead head;
  Options options;
  StepOutputs outputs;  ///< row_lse unused: the step keeps lse_r in its workspace
  LinearGradients gradients;
  std::size_t chunk_bytes = kDefaultCudaChunkBytes;
  FusedStrategy strategy = FusedStrategy::keep_chunk;
  GlobalKl global_kl;
  VocabSlices vocab;
};

/// Forward only (kto::cuda::fused_linear_logprobs): logp [B] and num_tokens [B].
struct FusedLogprobsCall {
  Matrix hidden;
  Batch batch;
  LinearHead head;
  Options options;
  std::size_t chunk_bytes = kDefaultCudaChunkBytes;
  float* logp = nullptr;
  index_t* num_tokens = nullptr;
};

}  // namespace bind
}  // namespace kto
