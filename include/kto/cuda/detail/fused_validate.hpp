// cuda/detail/fused_validate.hpp — the host checks of a fused-linear call.
//
// Everything the host can see is checked before anything launches, each failure a
// kto::Error naming the argument (can_implement turns it into a Status). What
// only the device can read (offsets, target ids, non-finite logits) is checked by
// the kernels and reported by read_status(). cuBLAS takes int sizes and leading
// dimensions: rows, vocabulary and strides must fit.
#pragma once

#include <string>

#include "../fused_linear_types.hpp"
#include "fused_workspace.hpp"

namespace kto {
namespace cuda {
namespace detail {

/// Compact scoring plans its chunks from the host targets and the host offsets together.
inline void validate_compact(const index_t* host_targets, const index_t* host_offsets,
                             const char* fn, const std::string& prefix) {
  kto::detail::require(host_targets == nullptr || host_offsets != nullptr, fn,
                       prefix + "host_offsets",
                       "be given with " + prefix +
                           "host_targets (compact scoring plans its "
                           "chunks from both)",
                       "nullptr");
}

template <class T>
void validate_hidden(const MatrixView<const T>& hidden, const TargetsView& targets,
                     const SequencesView& seqs, const LinearHead<T>& head, const char* fn,
                     const std::string& prefix, bool allow_empty) {
  kto::detail::validate_matrix(hidden, fn, prefix + "hidden");
  kto::detail::require(hidden.cols == head.weight.cols, fn, prefix + "hidden.cols",
                       "equal head.weight.cols (" + std::to_string(head.weight.cols) + ")",
                       hidden.cols);
  kto::detail::require(hidden.rows < (index_t{1} << 31), fn, prefix + "hidden.rows",
                       "be < 2^31 (cuBLAS int sizes)", hidden.rows);
  kto::detail::validate_targets(targets, hidden.rows, fn, prefix + "targets");
  kto::detail::require(seqs.count >= (allow_empty ? 0 : 1), fn, prefix + "sequences.count",
                       allow_empty ? "be >= 0" : "be >= 1 (an empty batch has no loss)",
                       seqs.count);
  kto::detail::require(seqs.offsets != nullptr, fn, prefix + "sequences.offsets",
                       "be non-null (count + 1 entries, device memory)", "nullptr");
}

/// A cuBLAS operand: its row stride is a leading dimension, >= cols and an int,
/// whatever the row count.
template <class T>
void validate_cublas_operand(const MatrixView<T>& m, const char* fn, const std::string& name) {
  kto::detail::require(
      m.stride >= m.cols && m.stride < (index_t{1} << 31), fn, name + ".stride",
      "be >= cols (" + std::to_string(m.cols) + ") and < 2^31: a cuBLAS leading dimension",
      m.stride);
}

template <class T>
void validate_cuda_head(const LinearHead<T>& head, const char* fn, bool slices) {
  kto::detail::validate_head(head, fn);
  validate_cublas_operand(head.weight, fn, "head.weight");
  kto::detail::require(slices || !head.sharded(), fn, "head.vocab_total",
                       "equal head.weight.rows (merge slices with fused_linear_kto_step)",
                       head.vocab_total);
  kto::detail::require(head.weight.rows < (index_t{1} << 31), fn, "head.weight.rows",
                       "be < 2^31 (cuBLAS int sizes)", head.weight.rows);
}

/// Every host-visible argument of fused_linear_kto_step(), under `fn`.
template <class T>
void validate(const FusedLinearArguments<T>& a, const char* fn) {
  const FusedLinearInputs<T>& in = a.inputs;
  const LinearHead<T>& head = a.head;
  const Options& o = a.options;
  const FusedLinearOutputs& out = a.outputs;
  const FusedLinearConfig& cfg = a.config;
  const RowPartialsAllGather& gather_partials = a.hooks.gather_partials;
  validate_options(o, fn);
  validate_cuda_head(head, fn, true);
  if (head.sharded()) {
    kto::detail::require(static_cast<bool>(gather_partials), fn, "gather_partials",
                         "be set (a gather function or the gathered partials) when "
                         "head.weight holds a vocabulary slice (" +
                             std::to_string(head.weight.rows) + " of " +
                             std::to_string(head.total_vocab()) + " rows)",
                         "an empty function");
    kto::detail::require(!gather_partials.gather || gather_partials.gathered.data == nullptr, fn,
                         "gather_partials.gathered",
                         "be empty when gather_partials.gather is set (one or the other)",
                         "a pointer");
    kto::detail::require(!o.token_statistics, fn, "options.token_statistics",
                         "be false with a vocabulary slice (the row partials carry no entropy)",
                         "true");
    kto::detail::require(cfg.strategy != FusedStrategy::vocab_blocks, fn, "config.strategy",
                         "be keep_chunk or recompute with a vocabulary slice (the slice's "
                         "backward runs as recompute's)",
                         "vocab_blocks (2)");
  }
  if (head.sharded())
    kto::detail::require(gather_partials.ranks >= 2 &&
                             gather_partials.ranks <= std::min(head.total_vocab(), kMaxVocabRanks),
                         fn, "gather_partials.ranks",
                         "be in [2, min(head.vocab_total, 65536)] (the vocabulary slices "
                         "gathered, this one among them)",
                         gather_partials.ranks);
  else
    kto::detail::require(!gather_partials, fn, "gather_partials",
                         "be empty when head.weight holds the whole vocabulary (a gather "
                         "the step never calls would leave the other ranks waiting)",
                         gather_partials.gather ? "a function" : "gathered partials");
  validate_hidden(in.hidden, in.targets, in.sequences, head, fn, "", false);
  validate_device_logp(in.reference_logp, in.sequences.count, fn, "reference_logp");
  kto::detail::require(in.desirable != nullptr, fn, "desirable", "be non-null", "nullptr");
  if (in.host_offsets)
    kto::detail::validate_sequences(SequencesView{in.host_offsets, in.sequences.count},
                                    in.hidden.rows, fn, "host_offsets", false);
  validate_compact(in.host_targets, in.host_offsets, fn, "");
  if (uses_kl_batch(o)) {
    validate_hidden(in.kl.hidden, in.kl.targets, in.kl.sequences, head, fn, "kl.", true);
    validate_device_logp(in.kl.reference_logp, in.kl.sequences.count, fn, "kl.reference_logp");
    if (in.kl.host_offsets)
      kto::detail::validate_sequences(SequencesView{in.kl.host_offsets, in.kl.sequences.count},
                                      in.kl.hidden.rows, fn, "kl.host_offsets", true);
    validate_compact(in.kl.host_targets, in.kl.host_offsets, fn, "kl.");
  }
  kto::detail::require(out.metrics != nullptr, fn, "out.metrics", "be non-null", "nullptr");
  validate_statistics(out.token_statistics, o, in.sequences.count, fn, "out.token_statistics");
  kto::detail::validate_shape(out.d_hidden, in.hidden.rows, in.hidden.cols, fn, "out.d_hidden",
                              "hidden");
  // dW and db are each optional (a frozen head: both views empty, nothing computed for
  // them); one that is given is checked as before, whatever the other.
  const MatrixView<T> typed_dw = detail::typed<T>(out.d_weight_in_input_type);
  if (!LinearGradients::given(typed_dw)) {
    if (LinearGradients::given(out.d_weight)) {
      kto::detail::validate_shape(out.d_weight, head.weight.rows, head.weight.cols, fn,
                                  "out.d_weight", "head.weight");
      validate_cublas_operand(out.d_weight, fn, "out.d_weight");
    }
  } else {
    kto::detail::require(!LinearGradients::given(out.d_weight), fn, "out.d_weight",
                         "be empty when out.d_weight_in_input_type is given (one dW output)",
                         "a pointer");
    kto::detail::require(cfg.strategy == FusedStrategy::vocab_blocks, fn,
                         "out.d_weight_in_input_type",
                         "be given with config.strategy vocab_blocks only (the others sum dW "
                         "over row chunks, in fp32 d_weight)",
                         "config.strategy " + std::to_string(static_cast<int>(cfg.strategy)));
    kto::detail::validate_shape(typed_dw, head.weight.rows, head.weight.cols, fn,
                                "out.d_weight_in_input_type", "head.weight");
    validate_cublas_operand(typed_dw, fn, "out.d_weight_in_input_type");
  }
  validate_cublas_operand(out.d_hidden, fn, "out.d_hidden");
  kto::detail::require(
      out.d_bias.size == 0 || out.d_bias.size == head.weight.rows, fn, "out.d_bias.size",
      "be 0 (skipped) or head.weight.rows (" + std::to_string(head.weight.rows) + ")",
      out.d_bias.size);
  kto::detail::require(out.d_bias.data != nullptr || out.d_bias.size == 0, fn, "out.d_bias.data",
                       "be non-null when size > 0", "nullptr");
  kto::detail::require(cfg.chunk_bytes > 0, fn, "config.chunk_bytes", "be > 0",
                       static_cast<index_t>(cfg.chunk_bytes));
  kto::detail::validate_strategy(cfg.strategy, fn, true);
  using kto::detail::byte_range;
  kto::detail::validate_disjoint(
      {byte_range(out.d_hidden, "out.d_hidden"), byte_range(out.d_weight, "out.d_weight"),
       byte_range(typed_dw, "out.d_weight_in_input_type"), byte_range(out.d_bias, "out.d_bias")},
      {byte_range(in.hidden, "hidden"), byte_range(head.weight, "head.weight"),
       byte_range(head.bias, "head.bias"),
       byte_range(uses_kl_batch(o) ? in.kl.hidden : MatrixView<const T>{}, "kl.hidden")},
      fn);
  // After the batches are checked: the count the step reads (gather_slices()).
  if (gather_partials.gathered.data != nullptr) {
    const bool kl_used = uses_kl_batch(o) && in.kl.sequences.count > 0;
    const index_t rows = kto::detail::checked_add(kl_used ? in.kl.hidden.rows : 0, in.hidden.rows,
                                                  fn, "gather_partials.gathered.size");
    kto::detail::require(
        gather_partials.gathered.size == kto::detail::checked_mul(gather_partials.ranks, rows, fn,
                                                                  "gather_partials.gathered.size"),
        fn, "gather_partials.gathered.size",
        "be ranks x " + std::to_string(rows) +
            " (each slice's KL rows when the step uses them, then its target rows)",
        gather_partials.gathered.size);
  }
}

/// The arguments of fused_linear_logprobs(), under `fn`.
template <class T>
void validate_logprobs(const MatrixView<const T>& hidden, const TargetsView& targets,
                       const SequencesView& sequences, const LinearHead<T>& head, const Options& o,
                       float* logp, index_t* num_tokens, const SequenceTokenStatistics& statistics,
                       const index_t* host_offsets, const index_t* host_targets, const char* fn) {
  validate_options(o, fn);
  validate_cuda_head(head, fn, false);
  validate_hidden(hidden, targets, sequences, head, fn, "", true);
  kto::detail::require(logp != nullptr || sequences.count == 0, fn, "logp", "be non-null",
                       "nullptr");
  kto::detail::require(num_tokens != nullptr || sequences.count == 0, fn, "num_tokens",
                       "be non-null", "nullptr");
  validate_statistics(statistics, o, sequences.count, fn, "statistics");
  if (host_offsets)
    kto::detail::validate_sequences(SequencesView{host_offsets, sequences.count}, hidden.rows, fn,
                                    "host_offsets", true);
  validate_compact(host_targets, host_offsets, fn, "");
}

/// Every host-visible argument of fused_linear_row_partials(), under `fn`.
template <class T>
void validate_row_partials(const MatrixView<const T>& hidden, const TargetsView& targets,
                           const SequencesView& sequences, const LinearHead<T>& head,
                           const Options& o, const RowPartial<float>* partials,
                           const FusedLinearConfig& cfg, const index_t* host_offsets,
                           const index_t* host_targets, const char* fn) {
  validate_options(o, fn);
  kto::detail::require(!o.token_statistics, fn, "options.token_statistics",
                       "be false for row partials (they carry no entropy)", "true");
  validate_cuda_head(head, fn, true);
  validate_hidden(hidden, targets, sequences, head, fn, "", true);
  kto::detail::require(partials != nullptr || hidden.rows == 0, fn, "partials", "be non-null",
                       "nullptr");
  kto::detail::require(cfg.chunk_bytes > 0, fn, "config.chunk_bytes", "be > 0",
                       static_cast<index_t>(cfg.chunk_bytes));
  if (host_offsets)
    kto::detail::validate_sequences(SequencesView{host_offsets, sequences.count}, hidden.rows, fn,
                                    "host_offsets", true);
  validate_compact(host_targets, host_offsets, fn, "");
}

}  // namespace detail
}  // namespace cuda
}  // namespace kto
