// cpu/fused_linear.hpp — the KTO step from hidden states and the lm_head, on the CPU.
//
// Chunks of rows go through GEMMs around the row kernels of row_kernels.hpp
// (see ../fused_linear.hpp for the order of work):
//
//   keep_chunk  Z_c computed once: forward, g_s, dZ_c in place, two GEMMs.
//               3 GEMMs a row; chunks hold whole sequences.
//   recompute   forward over every chunk keeping lse_r, then the finish, then
//               Z_c recomputed for the backward (Cut Cross-Entropy's way).
//               4 GEMMs a row; chunks need not follow sequences. The
//               vocab-parallel step always runs this way: the all-gather of
//               the row partials sits between its forward and backward.
//
// Memory: one chunk of logits and hidden rows (config.chunk_bytes; the
// calling thread keeps it between calls, scratch.hpp), an fp32 copy of b, and
// of W when it is half (or bfloat16 widened), plus O(rows) scalars — never
// N × V. GEMMs: bfloat16 heads multiply their bf16 values exactly with fp32
// accumulation (gemm_bf16.hpp, AVX512-BF16; dZ split into bf16 hi + lo for
// the gradients), reading W in place; other types, or CPUs without the
// instruction, run Eigen in the accumulation type (fp32, fp64 for double) on
// exactly widened inputs. Work is split over threads in fixed tiles of output
// rows or vocab columns, so the bits do not depend on the thread count.
// Gradients are written (not accumulated) in the accumulation type: dH for
// every row (zero on unscored ones), dW and db for this rank's vocab slice.
//
// Frozen head (LoRA): an empty grads.d_weight (data == nullptr, zero rows) and
// an empty grads.d_bias skip dW and db: no GEMM for them, no V × D buffer for
// the caller to hold, and dH, the loss, the metrics and the per-example
// outputs bit for bit those of the run that asks for dW (the dH product never
// reads dW's). The step is then 2 GEMMs a row (keep_chunk) or 3 (recompute).
//
//   fused_linear_types.hpp   FusedLinearInputs, LinearGradients, the config and hooks
//   chunk_engine.hpp         the GEMMs and row kernels over one chunk
//   fused_linear_checks.hpp  what the step refuses, before writing anything
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "../finish.hpp"
#include "../fused_linear.hpp"
#include "chunk_engine.hpp"
#include "fused_linear_checks.hpp"
#include "fused_linear_types.hpp"
#include "kto_step.hpp"
#include "parallel.hpp"
#include "row_kernels.hpp"
#include "sequence_logprobs.hpp"

namespace kto {
namespace cpu {
namespace detail {

/// logp_s and n_s from the merged partials of its rows (row order, double);
/// notes lse_r for the backward. Non-finite rows raise NonFiniteLogitsError
/// naming the input that caused them.
template <class T, class Acc = accumulator_t<T>>
void sequence_from_partials(const RowPartial<Acc>* rows, const RowScorer& scorer,
                            const HiddenBatch<T>& batch, const LinearHead<T>& head, index_t s,
                            const Options& o, const char* fn, Acc* row_lse, Acc& logp,
                            index_t& count) {
  double sum = 0.0;
  count = 0;
  for (index_t r = batch.sequences.begin(s); r < batch.sequences.end(s); ++r) {
    const index_t t = scorer.target(r);
    if (t == o.ignore_index) continue;
    const RowPartial<Acc> p = rows[r];
    const Acc lp = p.target_logit - p.lse;
    if (!(std::isfinite(p.lse) && std::isfinite(lp)))
      throw_non_finite_row(fn, batch.name, batch.hidden, head, s, r, p.lse, p.target_logit, t);
    row_lse[r] = p.lse;
    sum += static_cast<double>(lp);
    ++count;
  }
  if (o.average_logprob && count > 0) sum /= static_cast<double>(count);
  logp = static_cast<Acc>(sum);
  if (!(std::fabs(static_cast<double>(logp)) <= kto::detail::kMaxLogprob))
    throw_sequence_overflow(fn, batch.name, s, batch.sequences.begin(s), sum);
}

/// Per-sequence forward of a whole batch from its merged row partials.
template <class T, class Acc = accumulator_t<T>>
SequenceForward<Acc> sequences_from_partials(const std::vector<RowPartial<Acc>>& rows,
                                             const HiddenBatch<T>& batch, const LinearHead<T>& head,
                                             const Options& o, const char* fn) {
  SequenceForward<Acc> out;
  const RowScorer scorer(batch.targets, batch.sequences, o.ignore_index);
  out.row_lse.assign(rows.size(), Acc(0));
  out.logp.assign(static_cast<size_t>(batch.sequences.count), Acc(0));
  out.num_tokens.assign(static_cast<size_t>(batch.sequences.count), 0);
  for (index_t s = 0; s < batch.sequences.count; ++s)
    sequence_from_partials(rows.data(), scorer, batch, head, s, o, fn, out.row_lse.data(),
                           out.logp[static_cast<size_t>(s)],
                           out.num_tokens[static_cast<size_t>(s)]);
  return out;
}

/// Row partials of every row of a batch, chunk by chunk (forward only); with
/// `statistics` (one per row), the scored rows' token statistics too.
template <class T>
std::vector<RowPartial<accumulator_t<T>>> batch_partials(
    ChunkEngine<T>& engine, const MatrixView<const T>& hidden, const RowScorer& scorer,
    TokenStatistics<accumulator_t<T>>* statistics = nullptr) {
  std::vector<RowPartial<accumulator_t<T>>> out(static_cast<size_t>(hidden.rows),
                                                {accumulator_t<T>(0), accumulator_t<T>(0)});
  for (index_t r0 = scorer.first; r0 < scorer.last; r0 += engine.chunk_rows()) {
    const index_t n = std::min(engine.chunk_rows(), scorer.last - r0);
    engine.compute(hidden, scorer, r0, n);
    engine.partials(scorer, r0, n, out.data() + r0, statistics ? statistics + r0 : nullptr);
  }
  return out;
}

/// g_s c_r on the scored rows of sequences [first, last).
template <class Acc>
void set_row_scales(const RowScorer& scorer, const SequencesView& seqs, index_t first, index_t last,
                    const std::vector<Acc>& grad_logp, const std::vector<index_t>& tokens,
                    const Options& o, std::vector<Acc>& scale) {
  for (index_t s = first; s < last; ++s) {
    const Acc v =
        static_cast<Acc>(token_scale(static_cast<double>(grad_logp[static_cast<size_t>(s)]),
                                     tokens[static_cast<size_t>(s)], o.average_logprob));
    for (index_t r = seqs.begin(s); r < seqs.end(s); ++r)
      if (scorer.target(r) != o.ignore_index) scale[static_cast<size_t>(r)] = v;
  }
}

/// Per-row token statistics of a batch (Options::token_statistics), or none.
template <class Acc>
std::vector<TokenStatistics<Acc>> row_statistics_of(const Options& o, index_t rows) {
  return o.token_statistics
             ? std::vector<TokenStatistics<Acc>>(static_cast<size_t>(rows), {Acc(0), Acc(0)})
             : std::vector<TokenStatistics<Acc>>();
}

template <class Acc>
SequenceTokenStatistics sequence_statistics_of(const std::vector<TokenStatistics<Acc>>& rows,
                                               const RowScorer& scorer,
                                               const SequencesView& sequences) {
  if (rows.empty()) return {};
  return kto::detail::sum_token_statistics(
      rows, sequences, [&](index_t r) { return scorer.target(r) != scorer.ignore; });
}

}  // namespace detail

/// Bytes the step allocates besides O(rows) scalars: the chunk buffers (at
/// most `max_rows` rows; the default is the budget alone) and, for
/// half/bfloat16 widened to fp32, the fp32 copy of W and b (none with
/// gemm_bf16: W is read in place). Independent of the row count.
template <class T>
size_t fused_linear_workspace_bytes(const LinearHead<T>& head, const FusedLinearConfig& cfg,
                                    index_t max_rows = std::numeric_limits<index_t>::max()) {
  using Acc = accumulator_t<T>;
  const auto rows = static_cast<size_t>(detail::chunk_rows_of(head, cfg, max_rows));
  const auto v = static_cast<size_t>(head.weight.rows), d = static_cast<size_t>(head.weight.cols);
  size_t bytes = sizeof(Acc) * rows * (v + d);
  if (uses_bf16_gemm<T>(cfg))
    bytes += sizeof(Eigen::bfloat16) * rows * d;
  else if (!std::is_same<T, Acc>::value)
    bytes += sizeof(Acc) * v * d;
  if (head.bias.size > 0) bytes += sizeof(Acc) * v;
  return bytes;
}

/// Forward only: logp_s and n_s of a batch from its hidden states (the
/// reference model's log-probs, or a KL batch's), chunk by chunk. Unsharded heads.
template <class T>
SequenceForward<accumulator_t<T>> fused_linear_logprobs(const MatrixView<const T>& hidden,
                                                        const TargetsView& targets,
                                                        const SequencesView& sequences,
                                                        const LinearHead<T>& head, const Options& o,
                                                        const FusedLinearConfig& cfg = {},
                                                        const ExecutionPolicy& exec = {}) {
  const char* fn = "kto::cpu::fused_linear_logprobs";
  validate_options(o, fn);
  kto::detail::validate_head(head, fn);
  kto::detail::require(!head.sharded(), fn, "head.vocab_total",
                       "equal head.weight.rows (merge slices with fused_linear_kto_step)",
                       head.vocab_total);
  const detail::HiddenBatch<T> batch{hidden, targets, sequences, "hidden"};
  detail::validate_hidden_batch(batch, head, o, fn, "", true);
  detail::ChunkEngine<T> engine = detail::make_engine(head, cfg, hidden.rows, exec, o, fn);
  const detail::RowScorer scorer(targets, sequences, o.ignore_index);
  auto statistics = detail::row_statistics_of<accumulator_t<T>>(o, hidden.rows);
  auto out = detail::sequences_from_partials(
      detail::batch_partials(engine, hidden, scorer,
                             statistics.empty() ? nullptr : statistics.data()),
      batch, head, o, fn);
  out.token_statistics = detail::sequence_statistics_of(statistics, scorer, sequences);
  return out;
}

namespace detail {

/// fused_linear_row_partials() as called by the public entry point `fn`.
template <class T>
std::vector<RowPartial<accumulator_t<T>>> row_partials_impl(
    const FusedLinearInputs<T>& in, const LinearHead<T>& head, const Options& o,
    const FusedLinearConfig& cfg, const ExecutionPolicy& exec, const char* fn) {
  validate_options(o, fn);
  kto::detail::validate_head(head, fn);
  kto::detail::require(cfg.chunk_bytes > 0, fn, "config.chunk_bytes", "be > 0",
                       static_cast<index_t>(cfg.chunk_bytes));
  kto::detail::require(!o.token_statistics, fn, "options.token_statistics",
                       "be false for row partials (they carry no entropy)", "true");
  // The KL batch's rows exactly when the step gathers them (it uses the KL batch), so
  // the layouts agree whatever views the caller passes.
  const bool kl_used = uses_kl_batch(o);
  const HiddenBatch<T> target{in.hidden, in.targets, in.sequences, "hidden"};
  const HiddenBatch<T> kl{in.kl.hidden, in.kl.targets, in.kl.sequences, "kl.hidden"};
  validate_hidden_batch(target, head, o, fn, "", true);
  if (kl_used) validate_hidden_batch(kl, head, o, fn, "kl.", true);
  ChunkEngine<T> engine = make_engine(
      head, cfg, std::max(in.hidden.rows, kl_used ? in.kl.hidden.rows : index_t{0}), exec, o, fn);
  std::vector<RowPartial<accumulator_t<T>>> rows;
  if (kl_used)
    rows = batch_partials(engine, in.kl.hidden,
                          RowScorer(in.kl.targets, in.kl.sequences, o.ignore_index));
  const auto t =
      batch_partials(engine, in.hidden, RowScorer(in.targets, in.sequences, o.ignore_index));
  rows.insert(rows.end(), t.begin(), t.end());
  return rows;
}

}  // namespace detail

/// Vocab parallel, for a caller that gathers the slices' partials itself (a JAX
/// all_gather, MPI_Allgather): this slice's RowPartial of every row of the KL batch
/// when the options use it (uses_kl_batch), then of the target batch ({0, 0} on
/// unscored rows: never read), forward only — the layout fused_linear_kto_step gathers.
/// Every slice's, all-gathered rank-major, is its hooks.gathered_partials. Only the
/// batches, the head and the options are read.
template <class T>
std::vector<RowPartial<accumulator_t<T>>> fused_linear_row_partials(
    const FusedLinearInputs<T>& in, const LinearHead<T>& head, const Options& o,
    const FusedLinearConfig& cfg = {}, const ExecutionPolicy& exec = {}) {
  return detail::row_partials_impl(in, head, o, cfg, exec, "kto::cpu::fused_linear_row_partials");
}

/// The whole KTO step from hidden states. Gradients are overwritten. Every
/// argument (and every scored hidden row) is checked before anything is
/// written; with hooks.kl_all_reduce, a failure up to the collective raises
/// on every rank (kl_all_reduce.hpp).
template <class T>
StepResult<accumulator_t<T>> fused_linear_kto_step(
    const FusedLinearInputs<T>& in, const LinearHead<T>& head, const Options& o,
    const LinearGradients<accumulator_t<T>>& grads, const FusedLinearConfig& cfg = {},
    const ExecutionPolicy& exec = {}, const FusedLinearHooks<accumulator_t<T>>& hooks = {}) {
  using Acc = accumulator_t<T>;
  const char* fn = "kto::cpu::fused_linear_kto_step";
  const index_t B = in.sequences.count;
  const bool kl = uses_kl_batch(o);
  const bool sharded = head.sharded();
  const bool recompute_all = sharded || cfg.strategy == FusedStrategy::recompute;
  const Span<const RowPartial<Acc>>& ahead = hooks.gathered_partials.partials;
  const bool pre_gathered = ahead.size != 0;
  const detail::HiddenBatch<T> target_batch{in.hidden, in.targets, in.sequences, "hidden"};
  const detail::HiddenBatch<T> kl_batch{in.kl.hidden, in.kl.targets, in.kl.sequences, "kl.hidden"};
  std::unique_ptr<detail::ChunkEngine<T>> engine;
  std::unique_ptr<detail::RowScorer> target_scorer;  // built once the offsets are checked
  std::vector<RowPartial<Acc>> partials;             // KL rows, then (recompute_all) target rows
  index_t kl_rows = 0;
  SequenceForward<Acc> target_fwd;               // recompute_all: found before the collective
  std::vector<TokenStatistics<Acc>> statistics;  // target rows, with options.token_statistics

  auto validate = [&] {
    validate_options(o, fn);
    kto::detail::validate_head(head, fn);
    kto::detail::validate_strategy(cfg.strategy, fn, false);
    kto::detail::require(cfg.chunk_bytes > 0, fn, "config.chunk_bytes", "be > 0",
                         static_cast<index_t>(cfg.chunk_bytes));
    detail::validate_hidden_batch(target_batch, head, o, fn, "", false);
    kto::detail::validate_finish_inputs(B, in.reference_logp, in.desirable, o, fn,
                                        "sequences.count");
    if (kl) {
      detail::validate_hidden_batch(kl_batch, head, o, fn, "kl.", true);
      kto::detail::validate_span(in.kl.reference_logp, in.kl.sequences.count, fn,
                                 "kl.reference_logp");
      kto::detail::validate_finite(in.kl.reference_logp, fn, "kl.reference_logp");
    }
    kto::detail::validate_shape(grads.d_hidden, in.hidden.rows, in.hidden.cols, fn,
                                "grads.d_hidden", "hidden");
    // Empty (data == nullptr, 0 rows): a frozen head, no dW. Any other shape but W's is refused.
    if (grads.d_weight.data != nullptr || grads.d_weight.rows != 0)
      kto::detail::validate_shape(grads.d_weight, head.weight.rows, head.weight.cols, fn,
                                  "grads.d_weight", "head.weight");
    kto::detail::require(
        grads.d_bias.size == 0 || grads.d_bias.size == head.weight.rows, fn, "grads.d_bias.size",
        "be 0 (skipped) or head.weight.rows (" + std::to_string(head.weight.rows) + ")",
        grads.d_bias.size);
    kto::detail::require(grads.d_bias.data != nullptr || grads.d_bias.size == 0, fn,
                         "grads.d_bias.data", "be non-null when size > 0", "nullptr");
    using kto::detail::byte_range;
    const auto offsets_of = [](const SequencesView& s) {
      return Span<const index_t>{s.offsets, s.offsets ? s.count + 1 : 0};
    };
    kto::detail::validate_disjoint(
        {byte_range(grads.d_hidden, "grads.d_hidden"), byte_range(grads.d_weight, "grads.d_weight"),
         byte_range(grads.d_bias, "grads.d_bias")},
        {byte_range(in.hidden, "hidden"), byte_range(head.weight, "head.weight"),
         byte_range(head.bias, "head.bias"), kto::detail::byte_range(in.targets, "targets"),
         byte_range(offsets_of(in.sequences), "sequences.offsets"),
         byte_range(in.reference_logp, "reference_logp"), byte_range(in.desirable, "desirable"),
         byte_range(kl ? in.kl.hidden : MatrixView<const T>{}, "kl.hidden"),
         byte_range(kl ? in.kl.targets : TargetsView{}, "kl.targets"),
         byte_range(kl ? offsets_of(in.kl.sequences) : Span<const index_t>{},
                    "kl.sequences.offsets"),
         byte_range(kl ? Span<const Acc>(in.kl.reference_logp) : Span<const Acc>{},
                    "kl.reference_logp")},
        fn);
    kto::detail::require(!sharded || !o.token_statistics, fn, "options.token_statistics",
                         "be false with a vocabulary slice (the row partials carry no entropy)",
                         "true");
    kto::detail::require(ahead.size >= 0, fn, "hooks.gathered_partials.partials.size", "be >= 0",
                         ahead.size);
    kto::detail::require(
        !sharded || static_cast<bool>(hooks.gather_partials) || pre_gathered, fn,
        "hooks.gather_partials",
        "be set (or hooks.gathered_partials given) when head.weight holds a vocabulary slice (" +
            std::to_string(head.weight.rows) + " of " + std::to_string(head.total_vocab()) +
            " rows)",
        "an empty function");
    kto::detail::require(!pre_gathered || !hooks.gather_partials, fn, "hooks.gathered_partials",
                         "be empty when hooks.gather_partials is set (one or the other)",
                         ahead.size);
    kto::detail::require(ahead.data != nullptr || !pre_gathered, fn,
                         "hooks.gathered_partials.partials.data", "be non-null when size > 0",
                         "nullptr");
    kto::detail::require(!pre_gathered || sharded, fn, "hooks.gathered_partials",
                         "be empty when head.weight holds the whole vocabulary", ahead.size);
    const index_t ranks = hooks.gathered_partials.ranks;
    kto::detail::require(
        !pre_gathered || (ranks >= 2 && ranks <= std::min(head.total_vocab(), kMaxVocabRanks)), fn,
        "hooks.gathered_partials.ranks",
        "be in [2, min(head.vocab_total, 65536)] (the vocabulary slices gathered, this one "
        "among them)",
        ranks);
    if (pre_gathered) {
      const index_t rows = kto::detail::checked_add(kl ? in.kl.hidden.rows : 0, in.hidden.rows, fn,
                                                    "hooks.gathered_partials.partials.size");
      kto::detail::require(
          ahead.size ==
              kto::detail::checked_mul(ranks, rows, fn, "hooks.gathered_partials.partials.size"),
          fn, "hooks.gathered_partials.partials.size",
          "be ranks x " + std::to_string(rows) +
              " (each slice's KL rows when the options use the KL batch, then its target rows)",
          ahead.size);
    }
  };

  auto make_engine = [&] {
    engine = std::make_unique<detail::ChunkEngine<T>>(detail::make_engine(
        head, cfg, std::max(in.hidden.rows, kl ? in.kl.hidden.rows : index_t{0}), exec, o, fn));
    kl_rows = kl ? in.kl.hidden.rows : 0;
    target_scorer = std::make_unique<detail::RowScorer>(in.targets, in.sequences, o.ignore_index);
    statistics = detail::row_statistics_of<Acc>(o, in.hidden.rows);
  };
  // Forward-only partials of the KL batch, and, when the vocab is sharded or the
  // strategy is recompute, of the target batch too: one gather serves both.
  auto local_partials = [&] {
    make_engine();
    if (kl) {
      const detail::RowScorer kl_scorer(in.kl.targets, in.kl.sequences, o.ignore_index);
      partials = detail::batch_partials(*engine, in.kl.hidden, kl_scorer);
    }
    if (recompute_all) {
      auto target = detail::batch_partials(*engine, in.hidden, *target_scorer,
                                           statistics.empty() ? nullptr : statistics.data());
      partials.insert(partials.end(), target.begin(), target.end());
    }
  };
  auto merge_gathered = [&] {
    std::vector<RowPartial<Acc>> all;
    const char* given = pre_gathered ? "hooks.gathered_partials" : "hooks.gather_partials";
    if (pre_gathered)
      all.assign(ahead.data, ahead.data + ahead.size);
    else
      hooks.gather_partials(partials, all);
    const index_t n = kl_rows + in.hidden.rows;  // a slice's rows: KL batch, then target
    const auto size = static_cast<index_t>(all.size());
    kto::detail::require(
        n > 0 || all.empty(), fn, given,
        pre_gathered ? "be empty for batches of no rows" : "return nothing for an empty input",
        size);
    // Two slices at least: one rank's partials alone would give a loss over its slice.
    kto::detail::require(n == 0 || (size % n == 0 && size / n >= 2 &&
                                    size / n <= std::min(head.total_vocab(), kMaxVocabRanks)),
                         fn, given,
                         std::string(pre_gathered ? "hold" : "return") + " ranks x " +
                             std::to_string(n) +
                             " partials (each slice's KL rows, then its target rows; ranks in "
                             "[2, min(head.vocab_total, 65536)])",
                         size);
    partials = merge_row_partials(all, n > 0 ? size / n : 1);
  };
  // The (merged) partials to sequences; what can still fail here (a non-finite
  // row or sequence log-prob) fails before the collective.
  auto kl_sum_of_partials = [&] {
    if (recompute_all) {
      std::vector<RowPartial<Acc>> target(partials.begin() + kl_rows, partials.end());
      target_fwd = detail::sequences_from_partials(target, target_batch, head, o, fn);
    }
    KlPartial local;
    if (!kl) return local;
    std::vector<RowPartial<Acc>> kl_part(partials.begin(), partials.begin() + kl_rows);
    const SequenceForward<Acc> kl_fwd =
        detail::sequences_from_partials(kl_part, kl_batch, head, o, fn);
    return kto::detail::kl_partial_impl<Acc>(make_span(kl_fwd.logp), in.kl.reference_logp,
                                             make_span(kl_fwd.num_tokens), o, fn);
  };

  // The gradients are computed after the collective (they need z0): whether they can
  // overflow is decided before it, for any z0, after the forward has had its say on
  // non-finite inputs.
  auto checked_kl_sum = [&] {
    const KlPartial local = kl_sum_of_partials();
    detail::check_gradient_bounds(target_batch, head, in.desirable, o, exec, fn,
                                  grads.wants_weight(), grads.wants_bias());
    return local;
  };
  KlPartial kl_sum;
  if (sharded) {
    // The gather is a collective of its own: checks and the local forward run
    // before it (a failure there is not yet carried to the other slices).
    validate();
    if (pre_gathered)
      make_engine();
    else
      local_partials();
    merge_gathered();
    kl_sum = kto::detail::reduce_kl_or_fail(hooks.kl_all_reduce, fn, checked_kl_sum);
  } else {
    kl_sum = kto::detail::reduce_kl_or_fail(hooks.kl_all_reduce, fn, [&] {
      validate();
      local_partials();
      return checked_kl_sum();
    });
  }
  kto::detail::validate_kl_partial(kl_sum, fn, &o);
  detail::ChunkEngine<T>& eng = *engine;
  const detail::RowScorer& scorer = *target_scorer;

  const index_t D = head.weight.cols;
  for (index_t r = 0; r < in.hidden.rows; ++r)
    std::fill(grads.d_hidden.row(r), grads.d_hidden.row(r) + D, Acc(0));
  for (index_t v = 0; v < grads.d_weight.rows; ++v)  // none when empty (a frozen head)
    std::fill(grads.d_weight.row(v), grads.d_weight.row(v) + D, Acc(0));
  std::fill(grads.d_bias.data, grads.d_bias.data + grads.d_bias.size, Acc(0));

  const double z0 = reference_point(kl_sum, o);
  const double scale = reduction_scale(o, B);

  StepResult<Acc> out;
  std::vector<Acc> row_lse(static_cast<size_t>(in.hidden.rows), Acc(0));
  out.logp.assign(static_cast<size_t>(B), Acc(0));
  out.num_tokens.assign(static_cast<size_t>(B), 0);
  std::vector<Acc> grad_logp(static_cast<size_t>(B), Acc(0));
  auto sequence_grad = [&](index_t s) {
    const double rho = static_cast<double>(out.logp[static_cast<size_t>(s)]) -
                       static_cast<double>(in.reference_logp[s]);
    return static_cast<Acc>(example_terms(rho, in.desirable[s] != 0, z0, o, scale).grad_logp);
  };

  if (recompute_all) {
    out.logp = std::move(target_fwd.logp);
    out.num_tokens = std::move(target_fwd.num_tokens);
    row_lse = std::move(target_fwd.row_lse);
    for (index_t s = 0; s < B; ++s) grad_logp[static_cast<size_t>(s)] = sequence_grad(s);
    std::vector<Acc> row_scale(static_cast<size_t>(in.hidden.rows), Acc(0));
    detail::set_row_scales(scorer, in.sequences, 0, B, grad_logp, out.num_tokens, o, row_scale);
    for (index_t r0 = scorer.first; r0 < scorer.last; r0 += eng.chunk_rows()) {
      const index_t n = std::min(eng.chunk_rows(), scorer.last - r0);
      eng.compute(in.hidden, scorer, r0, n);
      eng.backward(scorer, row_lse.data(), row_scale.data(), grads);
    }
  } else {
    std::vector<RowPartial<Acc>> part(static_cast<size_t>(in.hidden.rows));
    std::vector<Acc> row_scale(static_cast<size_t>(in.hidden.rows), Acc(0));
    for (const ChunkGroup& g : plan_chunks(in.sequences, eng.chunk_rows())) {
      // Forward over the group (one chunk, or the pieces of one long sequence).
      for (index_t r0 = g.first_row; r0 < g.last_row; r0 += eng.chunk_rows()) {
        const index_t n = std::min(eng.chunk_rows(), g.last_row - r0);
        eng.compute(in.hidden, scorer, r0, n);
        eng.partials(scorer, r0, n, part.data() + r0,
                     statistics.empty() ? nullptr : statistics.data() + r0);
      }
      for (index_t s = g.first_seq; s < g.last_seq; ++s) {
        detail::sequence_from_partials(part.data(), scorer, target_batch, head, s, o, fn,
                                       row_lse.data(), out.logp[static_cast<size_t>(s)],
                                       out.num_tokens[static_cast<size_t>(s)]);
        grad_logp[static_cast<size_t>(s)] = sequence_grad(s);
      }
      detail::set_row_scales(scorer, in.sequences, g.first_seq, g.last_seq, grad_logp,
                             out.num_tokens, o, row_scale);
      // Backward: the chunk still holds Z of a whole group; a split group recomputes.
      for (index_t r0 = g.first_row; r0 < g.last_row; r0 += eng.chunk_rows()) {
        const index_t n = std::min(eng.chunk_rows(), g.last_row - r0);
        if (g.split) eng.compute(in.hidden, scorer, r0, n);
        eng.backward(scorer, row_lse.data(), row_scale.data(), grads);
      }
    }
  }

  FinishResult<Acc> fin = kto::detail::finish_impl<Acc>(
      kl_sum, make_span(out.logp), in.reference_logp, in.desirable, o, fn, "sequences.count");
  detail::require_finite_gradients(grads, in.hidden.rows, fn);
  out.metrics = fin.metrics;
  out.examples = std::move(fin.examples);
  out.row_lse = std::move(row_lse);
  out.token_statistics = detail::sequence_statistics_of(statistics, scorer, in.sequences);
  return out;
}

}  // namespace cpu
}  // namespace kto
