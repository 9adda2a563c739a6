// cpu/fused_linear_checks.hpp — what the CPU fused-linear step refuses, and why.
//
// Every refusal happens before anything is written and, in data parallel,
// before the collective (kl_all_reduce.hpp), so a bad rank raises on every rank:
//
//   validate_hidden_batch()    shapes, offsets, target ids, finite scored rows
//   throw_non_finite_row()     a row whose logits are not finite, with its cause
//   check_gradient_bounds()    gradients that could overflow the accumulation
//                              type for some z0, from bounds on g_s (any z0)
//   require_finite_gradients() finite inputs whose products still overflowed
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "chunk_engine.hpp"

namespace kto {
namespace cpu {
namespace detail {

/// Names the input that made row r of `hidden` non-finite: the hidden row, a
/// weight or bias element, or finite inputs whose logits overflow; throws.
template <class T>
[[noreturn]] void throw_non_finite_row(const char* fn, const std::string& hidden_name,
                                       const MatrixView<const T>& hidden, const LinearHead<T>& head,
                                       index_t s, index_t r, double lse, double target_logit,
                                       index_t target) {
  std::string argument = hidden_name;
  std::ostringstream cause;
  const index_t D = head.weight.cols;
  if (const index_t c = first_non_finite(hidden.row(r), D); c >= 0) {
    cause << hidden_name << "[" << r << ", " << c << "] is "
          << static_cast<double>(hidden.row(r)[c]);
  } else {
    index_t v = 0, c2 = -1;
    for (; v < head.weight.rows && c2 < 0; ++v) c2 = first_non_finite(head.weight.row(v), D);
    const index_t b = first_non_finite(head.bias.data, head.bias.size);
    if (c2 >= 0) {
      argument = "head.weight";
      cause << "head.weight[" << v - 1 << ", " << c2 << "] is "
            << static_cast<double>(head.weight.row(v - 1)[c2]);
    } else if (b >= 0) {
      argument = "head.bias";
      cause << "head.bias[" << b << "] is " << static_cast<double>(head.bias.data[b]);
    } else {
      cause << "every input is finite, but the logits overflow the accumulation type";
    }
  }
  std::ostringstream os;
  os << fn << ": argument '" << argument
     << "' must give finite logits on scored rows; got lse = " << lse
     << ", target logit = " << target_logit << " (target " << target << ") in sequence " << s
     << ", row " << r << " of " << hidden_name << ": " << cause.str();
  throw NonFiniteLogitsError(fn, argument, s, r, os.str());
}

/// One batch of hidden states, and the name its errors use.
template <class T>
struct HiddenBatch {
  const MatrixView<const T>& hidden;
  const TargetsView& targets;
  const SequencesView& sequences;
  const char* name;  ///< "hidden" or "kl.hidden"
};

template <class T>
void validate_hidden_batch(const HiddenBatch<T>& batch, const LinearHead<T>& head, const Options& o,
                           const char* fn, const std::string& prefix, bool allow_empty) {
  // An absent batch (default-constructed views: no rows, no offsets) is an empty one.
  if (allow_empty && batch.hidden.rows == 0 && batch.targets.rows.rows == 0 &&
      batch.sequences.count == 0 && batch.sequences.offsets == nullptr)
    return;
  kto::detail::validate_matrix(batch.hidden, fn, prefix + "hidden");
  kto::detail::require(
      batch.hidden.cols == head.weight.cols || batch.hidden.rows == 0, fn, prefix + "hidden.cols",
      "equal head.weight.cols (" + std::to_string(head.weight.cols) + ")", batch.hidden.cols);
  validate_options(o, fn);
  kto::detail::validate_targets(batch.targets, batch.hidden.rows, fn, prefix + "targets");
  kto::detail::validate_sequences(batch.sequences, batch.hidden.rows, fn, prefix + "sequences",
                                  allow_empty);
  kto::detail::validate_target_ids(batch.targets, batch.sequences, head.total_vocab(),
                                   o.ignore_index, fn, prefix + "targets");
  // Scored rows must be finite: found here, before anything is written (and,
  // in data parallel, before the collective), never as a NaN gradient.
  const RowScorer scorer(batch.targets, batch.sequences, o.ignore_index);
  for (index_t r = scorer.first; r < scorer.last; ++r) {
    if (scorer.target(r) == o.ignore_index) continue;
    const index_t c = first_non_finite(batch.hidden.row(r), batch.hidden.cols);
    if (c < 0) continue;
    const index_t s = sequence_of_row(batch.sequences, r);
    std::ostringstream os;
    os << fn << ": argument '" << batch.name << "' must be finite on scored rows; got "
       << static_cast<double>(batch.hidden.row(r)[c]) << " at " << batch.name << "[" << r << ", "
       << c << "] in sequence " << s << ", row " << r;
    throw NonFiniteLogitsError(fn, batch.name, s, r, os.str());
  }
}

/// Finite inputs can still overflow a gradient product (hidden states or
/// weights near the accumulation type's largest value): raised, never returned.
template <class Acc>
void require_finite_gradients(const LinearGradients<Acc>& g, index_t rows, const char* fn) {
  auto check = [&](const MatrixView<Acc>& m, index_t n, const char* name) {
    for (index_t r = 0; r < n; ++r) {
      const index_t c = first_non_finite(m.row(r), m.cols);
      if (c >= 0)
        kto::detail::fail(fn, name,
                          "come out finite (hidden states and weights small enough for the "
                          "accumulation type)",
                          std::to_string(static_cast<double>(m.row(r)[c])) + " at [" +
                              std::to_string(r) + ", " + std::to_string(c) + "]");
    }
  };
  check(g.d_weight, g.d_weight.rows, "grads.d_weight");  // none for a frozen head
  check(g.d_hidden, rows, "grads.d_hidden");
  const index_t b = first_non_finite(g.d_bias.data, g.d_bias.size);
  if (b >= 0)
    kto::detail::fail(fn, "grads.d_bias", "come out finite", static_cast<double>(g.d_bias.data[b]));
}

/// The largest |x| over the finite values of n elements (a non-finite one is the
/// forward's to report, with its row), 0 for none.
template <class T>
double finite_abs_max(const T* x, index_t n) {
  double m = 0.0;
  for (index_t i = 0; i < n; ++i) {
    const double a = std::fabs(static_cast<double>(x[i]));
    if (a > m && std::isfinite(a)) m = a;
  }
  return m;
}

/// Refuses, before the collective, a step whose gradients could overflow the
/// accumulation type for some z0 (they are computed after it, once z0 is known).
/// With G_r = max|g_s| c_r |a| / τ on the scored rows of sequence s
/// (grad_logp_bound(): any z0), every element of dZ is at most G_r and a row of dZ
/// sums to at most 2 G_r in magnitude, so
///   |dW[v, k]| <= Σ_r G_r |H[r, k]|,  |dH[r, k]| <= 2 G_r max_v |W[v, k]|,
///   |db[v]| <= Σ_r G_r.
/// Each bound must stay under a quarter of the type's largest value (room for the
/// rounding of fp32 sums). W is read only when its type's range could break the
/// bound (never for half; for fp32 and bfloat16 only with a large G_r). Only the
/// gradients the caller asks for are bounded (a frozen head: dH alone, and every
/// G_r, an element of dZ, under the limit).
template <class T>
void check_gradient_bounds(const HiddenBatch<T>& batch, const LinearHead<T>& head,
                           Span<const std::uint8_t> desirable, const Options& o,
                           const ExecutionPolicy& exec, const char* fn, bool weight_grad = true,
                           bool bias_grad = true) {
  using Acc = accumulator_t<T>;
  const double limit = static_cast<double>(std::numeric_limits<Acc>::max()) / 4;
  const index_t B = batch.sequences.count;
  const RowScorer scorer(batch.targets, batch.sequences, o.ignore_index);
  const double reduction = reduction_scale(o, B);
  const double derivative = logit_transform(o).max_derivative();
  std::vector<double> row_bound(static_cast<size_t>(batch.hidden.rows), 0.0);  // G_r
  double largest = 0.0, bias_sum = 0.0;
  for (index_t s = 0; s < B; ++s) {
    index_t n = 0;
    for (index_t r = batch.sequences.begin(s); r < batch.sequences.end(s); ++r)
      n += scorer.target(r) != o.ignore_index;
    if (n == 0) continue;
    const double g =
        token_scale(grad_logp_bound(desirable[s] != 0, o, reduction), n, o.average_logprob) *
        derivative;
    for (index_t r = batch.sequences.begin(s); r < batch.sequences.end(s); ++r)
      if (scorer.target(r) != o.ignore_index) row_bound[static_cast<size_t>(r)] = g;
    largest = std::max(largest, g);
    bias_sum += g * static_cast<double>(n);
  }
  // |g_s c_r| |a| / τ is at most G_r = λβ max|f'| c_r |a| / (τ B) for any z0.
  auto refuse = [&](const char* argument, const char* gradient, const char* bound_text,
                    double bound, const std::string& got, const char* lower) {
    std::ostringstream expectation;
    expectation << "keep " << gradient << " within " << logit_type_name<Acc>()
                << " whatever z0: its bound, " << bound_text
                << " with G_r = lambda*beta*max|f'|*c_r*|a|/tau/B, is " << bound << ", past "
                << limit << " (lower options.beta or the weights, or " << lower << ")";
    kto::detail::fail(fn, argument, expectation.str(), got);
  };
  if (bias_grad && bias_sum > limit) {
    std::ostringstream got;
    got << o.beta;
    refuse("options.beta", "grads.d_bias", "the sum over scored rows of G_r", bias_sum, got.str(),
           "give fewer rows");
  }
  if (!bias_grad && largest > limit) {  // with db, implied by the bound above
    std::ostringstream got;
    got << o.beta;
    refuse("options.beta", "dL/dlogits", "max_r G_r", largest, got.str(), "the logit scale");
  }
  // dW: Σ_r G_r max_k |H[r, k]| (the scored rows are finite: validate_hidden_batch).
  if (weight_grad && bias_sum * static_cast<double>(std::numeric_limits<T>::max()) > limit) {
    std::vector<double> row_max(static_cast<size_t>(batch.hidden.rows), 0.0);
    parallel_for(scorer.last - scorer.first, exec, [&](index_t b, index_t e) {
      for (index_t r = scorer.first + b; r < scorer.first + e; ++r)
        if (row_bound[static_cast<size_t>(r)] > 0.0)
          row_max[static_cast<size_t>(r)] = finite_abs_max(batch.hidden.row(r), batch.hidden.cols);
    });
    double sum = 0.0, hidden_max = 0.0;
    for (index_t r = scorer.first; r < scorer.last; ++r) {
      sum += row_bound[static_cast<size_t>(r)] * row_max[static_cast<size_t>(r)];
      hidden_max = std::max(hidden_max, row_max[static_cast<size_t>(r)]);
    }
    if (sum > limit) {
      std::ostringstream got;
      got << "scored hidden states up to " << hidden_max << " in magnitude";
      refuse(batch.name, "grads.d_weight", "the sum over scored rows r of G_r max|hidden[r, :]|",
             sum, got.str(), "the scale of the hidden states");
    }
  }
  // dH: 2 max_r G_r max |W|.
  if (2.0 * largest * static_cast<double>(std::numeric_limits<T>::max()) > limit) {
    const index_t V = head.weight.rows;
    std::vector<double> row_max(static_cast<size_t>(V), 0.0);
    parallel_for(V, exec, [&](index_t b, index_t e) {
      for (index_t v = b; v < e; ++v)
        row_max[static_cast<size_t>(v)] = finite_abs_max(head.weight.row(v), head.weight.cols);
    });
    const double weight_max =
        row_max.empty() ? 0.0 : *std::max_element(row_max.begin(), row_max.end());
    if (2.0 * largest * weight_max > limit) {
      std::ostringstream got;
      got << "weights up to " << weight_max << " in magnitude";
      refuse("head.weight", "grads.d_hidden", "2 max_r G_r max|head.weight|",
             2.0 * largest * weight_max, got.str(), "the scale of the weight");
    }
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace kto
