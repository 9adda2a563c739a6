// token_statistics.hpp — per-token entropy and mean logit, from the pass that computes lse.
//
//   p_v    = exp(z_v − lse)
//   H      = −Σ_v p_v log p_v = lse − Σ_v p_v z_v
//   mean   = Σ_v z_v / V
//
// Both come from the one read of a row that gives its lse: beside the running max m and
// s = Σ e^(z−m), keep w = Σ e^(z−m)·(z − m) and t = Σ z / V. When a chunk raises the max to m',
// s ← e^(m−m') s and w ← e^(m−m') (w + (m − m') s). Then H = log s − w / s, which avoids the
// cancellation of lse − Σ p z when the logits are large. A masked logit (−inf, or a finite
// one whose p is below the smallest normal float, as finfo.min) adds exactly 0 to s and w
// on every backend and ISA; a −inf logit makes the mean −inf, finfo.min masks keep it finite.
//
// TRL 1.16 logs `entropy` (the mean over the completion tokens of the batch) and
// `logits/chosen`, `logits/rejected` (the mean per-token mean logit over the completion
// tokens of each side). The library returns, per sequence, the sums over its scored tokens
// (Options::token_statistics): sums add across sequences and ranks, and the caller divides
// by the token counts it needs.
#pragma once

#include <cmath>
#include <vector>

#include "config.hpp"

namespace kto {

/// One row's entropy and mean logit.
template <class Acc>
struct TokenStatistics {
  Acc entropy;
  Acc mean_logit;
};

/// From one row's running sums: s, w as above and the mean logit, accumulated as
/// Σ (z / V) term by term so that it stays finite where Σ z would overflow (every
/// masked logit at finfo.min). The cast: log may resolve to the double overload.
template <class Acc>
KTO_HOST_DEVICE inline TokenStatistics<Acc> token_statistics(Acc s, Acc w, Acc mean_logit) {
  return {static_cast<Acc>(log(s) - w / s), mean_logit};
}

/// Per-sequence sums over the scored tokens, in double; empty when not requested.
struct SequenceTokenStatistics {
  std::vector<double> entropy_sum;
  std::vector<double> mean_logit_sum;
};

namespace detail {

/// Sums row statistics per sequence, in row order (so the result does not depend
/// on how the rows were computed); scored(r) says which rows count.
template <class Acc, class Sequences, class Scored>
SequenceTokenStatistics sum_token_statistics(const std::vector<TokenStatistics<Acc>>& rows,
                                             const Sequences& seqs, Scored&& scored) {
  SequenceTokenStatistics out;
  out.entropy_sum.assign(static_cast<size_t>(seqs.count), 0.0);
  out.mean_logit_sum.assign(static_cast<size_t>(seqs.count), 0.0);
  for (index_t s = 0; s < seqs.count; ++s) {
    double h = 0.0, z = 0.0;
    for (index_t r = seqs.begin(s); r < seqs.end(s); ++r) {
      if (!scored(r)) continue;
      h += static_cast<double>(rows[static_cast<size_t>(r)].entropy);
      z += static_cast<double>(rows[static_cast<size_t>(r)].mean_logit);
    }
    out.entropy_sum[static_cast<size_t>(s)] = h;
    out.mean_logit_sum[static_cast<size_t>(s)] = z;
  }
  return out;
}

}  // namespace detail
}  // namespace kto
