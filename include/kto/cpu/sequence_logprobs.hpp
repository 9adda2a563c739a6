// cpu/sequence_logprobs.hpp — per-token and per-sequence log-probs (forward only).
//
//   ℓ_r    = Z[r, t_r] − lse_r               (never log(softmax): it underflows)
//   logp_s = Σ_{r ∈ s, t_r ≠ ignore} ℓ_r     or that sum / n_s with average_logprob
//
// The same call serves the policy's target batch (keep row_lse for the
// backward), the reference model and the KL batch. Ignored rows and rows outside
// every sequence are skipped: no exp is spent on prompt tokens. Rows are
// computed in parallel (fp32 accumulation, fp64 for double); sequence sums run
// afterwards in row order in double, so the result does not depend on the
// thread count. A NaN/inf that would reach the loss raises
// NonFiniteLogitsError with the sequence and row.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "../error.hpp"
#include "../layout.hpp"
#include "../options.hpp"
#include "../token_statistics.hpp"
#include "../validate.hpp"
#include "parallel.hpp"
#include "row_kernels.hpp"

namespace kto {
namespace cpu {

template <class Acc>
struct SequenceForward {
  std::vector<Acc> logp;                     ///< per sequence
  std::vector<index_t> num_tokens;           ///< non-ignored rows per sequence
  std::vector<Acc> token_logp;               ///< ℓ_r per row (0 where not scored)
  std::vector<Acc> row_lse;                  ///< lse_r per row (0 where not scored: never read)
  SequenceTokenStatistics token_statistics;  ///< with Options::token_statistics
};

namespace detail {

using kto::sequence_of_row;

inline void validate_forward_inputs(const char* fn, index_t rows, index_t vocab,
                                    const TargetsView& targets, const SequencesView& seqs,
                                    const Options& o, bool allow_empty) {
  validate_options(o, fn);
  kto::detail::validate_targets(targets, rows, fn, "targets");
  kto::detail::validate_sequences(seqs, rows, fn, "sequences", allow_empty);
  kto::detail::validate_target_ids(targets, seqs, vocab, o.ignore_index, fn, "targets");
}

/// A sequence whose token log-probs are finite but whose sum (or mean) does not
/// fit the accumulation type: reported as that sequence's, at its first row.
[[noreturn]] inline void throw_sequence_overflow(const char* fn, const std::string& name, index_t s,
                                                 index_t first_row, double sum) {
  std::ostringstream os;
  os << fn << ": argument '" << name
     << "' must give a finite sequence log-prob (|logp| <= 1e15); got " << sum << " for sequence "
     << s << " (finite token log-probs of extreme magnitude, or a sum that overflows)";
  throw NonFiniteLogitsError(fn, name, s, first_row, os.str());
}

/// Why a scored row gave a non-finite log-prob: a NaN/inf logit (the first
/// one named), or finite logits whose log-softmax overflows the accumulator.
template <class T>
std::string non_finite_cause(const T* row, index_t vocab) {
  std::ostringstream os;
  for (index_t v = 0; v < vocab; ++v) {
    const double z = static_cast<double>(row[v]);
    if (!std::isfinite(z)) {
      os << "logit " << v << " is " << z;
      return os.str();
    }
  }
  return "every logit is finite, but their log-softmax overflows the accumulation type (logits "
         "of magnitude near its largest value)";
}

/// sequence_logprobs() as called by the public entry point `fn`, for its
/// argument `name` (the logits).
template <class T>
SequenceForward<accumulator_t<T>> sequence_logprobs_impl(
    const LogitsView<const T>& logits, const TargetsView& targets, const SequencesView& seqs,
    const Options& o, const ExecutionPolicy& exec, const char* fn, const char* name) {
  using Acc = accumulator_t<T>;
  kto::detail::validate_logits(logits, fn, name);
  detail::validate_forward_inputs(fn, logits.rows.rows, logits.vocab, targets, seqs, o, true);

  const index_t rows = logits.rows.rows;
  SequenceForward<Acc> out;
  try {  // two scalars a row: rows of a repeated (stride 0) view need not fit
    out.token_logp.assign(static_cast<size_t>(rows), Acc(0));
    out.row_lse.assign(static_cast<size_t>(rows), Acc(0));
  } catch (const std::bad_alloc&) {
    kto::detail::fail(fn, std::string(name) + ".rows", "leave room in memory for two scalars a row",
                      rows);
  }
  std::vector<TokenStatistics<Acc>> row_statistics;
  if (o.token_statistics) {
    try {
      row_statistics.assign(static_cast<size_t>(rows), TokenStatistics<Acc>{Acc(0), Acc(0)});
    } catch (const std::bad_alloc&) {
      kto::detail::fail(fn, std::string(name) + ".rows",
                        "leave room in memory for four scalars a row", rows);
    }
  }
  const LogitTransform transform = logit_transform(o);
  const index_t first = seqs.offsets[0];
  const index_t last = seqs.offsets[seqs.count];

  // Each worker notes its first bad row; the lowest one over all workers is
  // reported, whatever the thread count.
  const index_t none = std::numeric_limits<index_t>::max();
  std::vector<index_t> bad_rows;
  std::mutex bad_mutex;
  parallel_for(last - first, exec, [&](index_t b, index_t e) {
    index_t bad = none;
    for (index_t r = first + b; r < first + e; ++r) {
      const index_t t = targets.at(r);
      if (t == o.ignore_index) continue;
      const RowStats<Acc> st =
          o.token_statistics ? row_stats<T, Acc>(logits.row(r), logits.vocab, t,
                                                 row_statistics[static_cast<size_t>(r)], transform)
                             : row_stats<T, Acc>(logits.row(r), logits.vocab, t, transform);
      const Acc lp = st.target_logit - st.lse;
      out.row_lse[static_cast<size_t>(r)] = st.lse;
      out.token_logp[static_cast<size_t>(r)] = lp;
      if (bad == none && !(std::isfinite(st.lse) && std::isfinite(lp))) bad = r;
    }
    if (bad != none) {
      std::lock_guard<std::mutex> lock(bad_mutex);
      bad_rows.push_back(bad);
    }
  });
  if (!bad_rows.empty()) {
    const index_t r = *std::min_element(bad_rows.begin(), bad_rows.end());
    const index_t s = detail::sequence_of_row(seqs, r);
    const T* row = logits.row(r);
    const index_t t = targets.at(r);
    std::ostringstream os;
    os << fn << ": argument '" << name << "' must give a finite log-prob on scored rows; got lse = "
       << out.row_lse[static_cast<size_t>(r)]
       << ", target logit = " << static_cast<double>(static_cast<Acc>(row[t])) << " (target " << t
       << ") in sequence " << s << ", row " << r << ": " << non_finite_cause(row, logits.vocab);
    throw NonFiniteLogitsError(fn, name, s, r, os.str());
  }

  out.logp.assign(static_cast<size_t>(seqs.count), Acc(0));
  out.num_tokens.assign(static_cast<size_t>(seqs.count), 0);
  for (index_t s = 0; s < seqs.count; ++s) {
    double sum = 0.0;
    index_t n = 0;
    for (index_t r = seqs.begin(s); r < seqs.end(s); ++r) {
      if (targets.at(r) == o.ignore_index) continue;
      sum += static_cast<double>(out.token_logp[static_cast<size_t>(r)]);
      ++n;
    }
    if (o.average_logprob && n > 0) sum /= static_cast<double>(n);
    out.logp[static_cast<size_t>(s)] = static_cast<Acc>(sum);
    out.num_tokens[static_cast<size_t>(s)] = n;
    if (!(std::fabs(static_cast<double>(out.logp[static_cast<size_t>(s)])) <=
          kto::detail::kMaxLogprob))
      throw_sequence_overflow(fn, name, s, seqs.begin(s), sum);
  }
  if (o.token_statistics)
    out.token_statistics = kto::detail::sum_token_statistics(
        row_statistics, seqs, [&](index_t r) { return targets.at(r) != o.ignore_index; });
  return out;
}

}  // namespace detail

/// Per-row ℓ_r and lse_r, then per-sequence logp and token counts.
template <class T>
SequenceForward<accumulator_t<T>> sequence_logprobs(const LogitsView<const T>& logits,
                                                    const TargetsView& targets,
                                                    const SequencesView& seqs, const Options& o,
                                                    const ExecutionPolicy& exec = {}) {
  return detail::sequence_logprobs_impl(logits, targets, seqs, o, exec,
                                        "kto::cpu::sequence_logprobs", "logits");
}

}  // namespace cpu
}  // namespace kto
