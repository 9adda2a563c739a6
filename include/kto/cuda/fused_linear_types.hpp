// cuda/fused_linear_types.hpp — what the CUDA fused-linear step takes and gives.
//
// FusedLinearArguments<T> is the whole call in CUTLASS's shape (phases.hpp):
//
//   inputs   FusedLinearInputs<T>  both batches' hidden states, targets, offsets
//   head     LinearHead<T>         the lm_head W (V × D, or a vocabulary slice), bias b
//   options  Options               the loss (options.hpp)
//   outputs  FusedLinearOutputs    the logits step's outputs + LinearGradients (dH, dW, db)
//   config   FusedLinearConfig     chunk budget, strategy, cuBLAS workspace
//   hooks    FusedLinearHooks      the caller's collectives (data / vocab parallel)
//
// The names are kto::cpu's (cpu/fused_linear_types.hpp); the pointers are device
// pointers, except the host copies of offsets and targets that let the host plan
// the chunks.
#pragma once

#include <cstdint>
#include <functional>

#include "../fused_linear.hpp"
#include "step.hpp"

namespace kto {
namespace cuda {

using kto::FusedStrategy;

struct FusedLinearConfig {
  /// Budget for one chunk: fp32 logits plus their gradient in the input type.
  size_t chunk_bytes = kDefaultCudaChunkBytes;
  FusedStrategy strategy = FusedStrategy::keep_chunk;
  /// Handed to cuBLAS (cublasSetWorkspace), carved from the workspace.
  size_t cublas_workspace_bytes = size_t{32} << 20;
};

template <class T>
struct FusedLinearInputs {
  MatrixView<const T> hidden;  ///< N × D, policy model, target batch (device)
  TargetsView targets;
  SequencesView sequences;                ///< device offsets
  const index_t* host_offsets = nullptr;  ///< the same offsets in host memory (keep_chunk)
  /// targets.data's values in host memory, the same layout; with host_offsets the
  /// GEMMs multiply only the scored rows (compact scoring: prompt and padding rows
  /// cost nothing). Checked on the device against targets: read_status reports a
  /// chunk plan the device's scored rows do not fit (their count, or with keep_chunk
  /// a row outside its chunk's sequences); a plan they fit gives the right result.
  const index_t* host_targets = nullptr;
  ReferenceLogp<float> reference_logp;  ///< B, kto::reference_logp(device pointer, B)
  const std::uint8_t* desirable = nullptr;
  struct Kl {
    MatrixView<const T> hidden;  ///< forward only
    TargetsView targets;
    SequencesView sequences;
    ReferenceLogp<float> reference_logp;
    const index_t* host_offsets = nullptr;  ///< with host_targets: compact scoring, as above
    const index_t* host_targets = nullptr;
  } kl;
};

/// The head's gradients, written (not accumulated) in fp32. The twin of
/// kto::cpu::LinearGradients:
///
///   d_hidden                rows × D, required
///   d_weight                head.weight's shape (V_local × D, a cuBLAS leading dimension),
///                           or empty (data == nullptr, 0 rows) to skip dW
///   d_weight_in_input_type  the same shape in T instead (strategy vocab_blocks; d_weight
///                           then empty), or empty
///   d_bias                  head.weight.rows entries (data non-null), or empty (size 0)
///                           to skip db
///
/// Frozen head (LoRA): with d_weight and d_weight_in_input_type both empty the step
/// launches no dW GEMM and the caller holds no V × D array; with d_bias empty, no db
/// GEMV and no workspace for it (its vector of ones). Each is independent (a trainable
/// bias on a frozen weight gets its db). dH, the loss, the metrics and the per-example
/// outputs are bit for bit those of the run that asks for dW and db.
struct LinearGradients {
  MatrixView<float> d_hidden;
  MatrixView<float> d_weight;
  /// dW in the step's input type T instead of fp32 (d_weight then empty), with
  /// strategy vocab_blocks only: each block is summed over every row in fp32 inside
  /// one GEMM and rounded once, so no V × D fp32 array exists (half of fp32's bytes).
  MatrixView<void> d_weight_in_input_type;
  Span<float> d_bias;

  /// A view the caller filled in (any pointer or row): it is checked as an output.
  template <class M>
  static bool given(const M& m) {
    return m.data != nullptr || m.rows != 0;
  }
  /// dW is asked for, in fp32 or in the input type (checked: exactly one of them).
  bool wants_weight() const { return given(d_weight) || given(d_weight_in_input_type); }
  bool wants_bias() const { return d_bias.size != 0; }
};

/// Device outputs: the logits step's (metrics required, a null per-example
/// array stays in the workspace) plus the head's gradients.
struct FusedLinearOutputs : StepOutputs, LinearGradients {};

/// Vocab parallel: all-gathers this rank's row partials (`local`, device, `rows` of them)
/// into `gathered` (device, ranks × rows, rank-major: rank k's row r at k·rows + r) on
/// `stream`, e.g. ncclAllGather. Called once a step, for the KL batch's rows and then the
/// target batch's together; `ranks` is the number of vocabulary slices. The twin of
/// kto::cpu::RowPartialsAllGather, which gathers host vectors and infers the ranks.
/// Or `gathered` instead of `gather`: the partials the caller all-gathered before the step
/// (each slice's fused_linear_row_partials: the KL batch's rows when the step uses it,
/// i.e. uses_kl_batch(options) and a KL batch of at least one sequence, then the target
/// batch's), in that layout, ready in `stream`'s order; the step then computes none of
/// its own (one forward pass over the slice fewer) and calls no gather. Its size (device
/// data, host-visible size) must be ranks × those rows. The twin of the CPU path's
/// hooks.gathered_partials.
struct RowPartialsAllGather {
  index_t ranks = 0;  ///< in [2, min(head.vocab_total, kMaxVocabRanks)]
  std::function<Status(const RowPartial<float>* local, RowPartial<float>* gathered, index_t rows,
                       cudaStream_t stream)>
      gather;
  Span<const RowPartial<float>> gathered;  ///< set this or gather
  explicit operator bool() const { return static_cast<bool>(gather) || gathered.data != nullptr; }
};

/// The caller's collectives, both stream-ordered; empty ones are not called.
/// The twin of kto::cpu::FusedLinearHooks.
struct FusedLinearHooks {
  KlAllReduce kl_all_reduce;             ///< data parallel: sums (S, C) over ranks
  RowPartialsAllGather gather_partials;  ///< vocab parallel: set when W is sharded
};

/// One fused-linear step: can_implement(args), workspace_bytes(args), then
/// run(handle, workspace, bytes, args, stream) (cuda/fused_linear.hpp).
template <class T>
struct FusedLinearArguments {
  FusedLinearInputs<T> inputs{};
  LinearHead<T> head{};
  Options options{};
  FusedLinearOutputs outputs{};
  FusedLinearConfig config{};
  FusedLinearHooks hooks{};
};

}  // namespace cuda
}  // namespace kto
