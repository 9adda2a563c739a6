// cpu/fused_linear_types.hpp — what the CPU fused-linear step takes and gives.
//
//   FusedLinearInputs<T>   both batches' hidden states (N × D), targets, host offsets
//   LinearGradients<Acc>   dH, dW, db, written in the accumulation type (dW, db optional)
//   FusedLinearConfig      chunk budget, strategy, bfloat16 GEMMs on or off
//   FusedLinearHooks<Acc>  the caller's collectives: the KL all-reduce (data parallel)
//                          and the row partials' all-gather (vocab parallel)
//
// The names are kto::cuda's (cuda/fused_linear_types.hpp); the head is
// kto::LinearHead (../fused_linear.hpp).
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

#include "../fused_linear.hpp"
#include "gemm_bf16.hpp"
#include "kto_step.hpp"

namespace kto {
namespace cpu {

using kto::FusedStrategy;

struct FusedLinearConfig {
  /// Budget for one chunk: its logits and hidden rows in the accumulation type.
  size_t chunk_bytes = kDefaultCpuChunkBytes;
  FusedStrategy strategy = FusedStrategy::keep_chunk;
  /// bfloat16 heads: multiply in bfloat16 with fp32 accumulation (gemm_bf16.hpp)
  /// where the CPU has AVX512-BF16; false widens H and W to fp32 first.
  bool bf16_gemm = true;
};

/// Whether a step over T multiplies with gemm_bf16 (else: Eigen, in fp32).
template <class T>
bool uses_bf16_gemm(const FusedLinearConfig& cfg) {
  return std::is_same<T, Eigen::bfloat16>::value && cfg.bf16_gemm && bf16_gemm_supported();
}

/// The head's gradients, written (not accumulated) in the accumulation type. The twin
/// of kto::cuda::LinearGradients (fp32; there dW may come in the input type instead).
template <class Acc>
struct LinearGradients {
  MatrixView<Acc> d_hidden;  ///< rows × D (a partial sum over slices when sharded)
  /// V_local × D, or empty (data == nullptr, 0 rows: a frozen head) to skip dW.
  MatrixView<Acc> d_weight;
  Span<Acc> d_bias;  ///< V_local entries, or empty to skip
  bool wants_weight() const { return d_weight.rows > 0; }
  bool wants_bias() const { return d_bias.size > 0; }
};

template <class T>
struct FusedLinearInputs {
  using Acc = accumulator_t<T>;
  MatrixView<const T> hidden;         ///< N × D, policy model, target batch
  TargetsView targets;                ///< N global token ids (or ignore_index)
  SequencesView sequences;            ///< B ≥ 1 examples over the N rows (host offsets)
  ReferenceLogp<Acc> reference_logp;  ///< B, kto::reference_logp(...)
  Span<const std::uint8_t> desirable;
  /// KL batch, forward only; used when options.reference_point is kl_batch.
  struct Kl {
    MatrixView<const T> hidden;
    TargetsView targets;
    SequencesView sequences;
    ReferenceLogp<Acc> reference_logp;
  } kl;
};

/// Gathers every rank's row partials, rank-major (rank k's row r at k·n + r).
template <class Acc>
using RowPartialsAllGather = std::function<void(const std::vector<RowPartial<Acc>>& local,
                                                std::vector<RowPartial<Acc>>& all)>;

/// Vocab parallel, gathered by the caller before the step: every slice's
/// fused_linear_row_partials, all-gathered rank-major (rank k's row r at k·rows + r), and
/// how many slices they are. The step requires partials.size == ranks × its rows (the KL
/// batch's when the options use it, then the target batch's), so a layout it does not
/// expect is refused rather than read as more ranks. The twin of CUDA's
/// RowPartialsAllGather{ranks, gathered}.
template <class Acc>
struct GatheredRowPartials {
  Span<const RowPartial<Acc>> partials;
  index_t ranks = 0;  ///< in [2, min(head.vocab_total, kMaxVocabRanks)]
};

/// The caller's collectives, host calls; empty ones are not called. The twin of
/// kto::cuda::FusedLinearHooks (the same two, on the stream).
template <class Acc>
struct FusedLinearHooks {
  KlAllReduce kl_all_reduce;                  ///< data parallel: sums (S, C) over ranks
  RowPartialsAllGather<Acc> gather_partials;  ///< vocab parallel: set when W is sharded
  /// Vocab parallel, gathered by the caller before the step: the step computes no row
  /// partials of its own (one forward pass over the slice fewer) and calls no gather.
  /// Set this or gather_partials, never both.
  GatheredRowPartials<Acc> gathered_partials;
};

}  // namespace cpu
}  // namespace kto
