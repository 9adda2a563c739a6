// problem.hpp — random KTO problems in every layout, independent of the logit type.
//
// make_plan() draws a logical problem (rows, targets, CSR offsets) and where
// each row and target lives in storage; the caller rounds every logit through
// its type (so the float64 reference sees exactly the stored values) and
// fills typed buffers with fill_storage(). Shared by the CPU tests (Eigen
// types) and the GPU tests (CUDA types).
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include <kto/layout.hpp>

#include "reference.hpp"

namespace test {

using kto::index_t;

/// The logit transforms the transform tests run, by number: 0 none, 1 a scale and a
/// temperature, 2 a Gemma-2-style soft-cap with both (tight enough to saturate tanh).
inline void set_test_transform(kto::Options& o, int which) {
  if (which == 1) o.logit_scale = 0.6, o.temperature = 1.3;
  if (which == 2) o.logit_scale = 1.7, o.logit_softcap = 5.0, o.temperature = 0.8;
}

/// Fresh seed per run (printed on failure); KTO_TEST_SEED=n reproduces a run.
inline uint64_t fresh_seed() {
  if (const char* s = std::getenv("KTO_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  static std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

inline bool close(double got, double want, double scale, double tol) {
  if (std::isnan(want)) return std::isnan(got);
  return std::fabs(got - want) <= tol * std::max(std::fabs(want), scale);
}

#define KTO_CHECK_CLOSE(got, want, scale, tol)                                       \
  do {                                                                               \
    const double got_ = static_cast<double>(got), want_ = static_cast<double>(want); \
    INFO(#got " = " << got_ << ", want " << want_ << ", scale " << (scale));         \
    CHECK(test::close(got_, want_, (scale), (tol)));                                 \
  } while (0)

enum class Layout { padded, packed, strided, shifted };
inline const char* layout_name(Layout l) {
  switch (l) {
    case Layout::padded:
      return "padded";
    case Layout::packed:
      return "packed";
    case Layout::strided:
      return "strided";
    default:
      return "shifted";
  }
}

struct ShapeSpec {
  index_t sequences = 4;
  index_t max_len = 6;
  index_t vocab = 37;
  double ignore_fraction = 0.2;
  double logit_scale = 3.0;
};

/// A problem and its storage: logits row r at logit_rows.offset(r), target r
/// at target_base + target_rows.offset(r); everything else is padding.
struct Plan {
  ref::Problem problem;
  index_t logit_elements = 0, target_elements = 0, target_base = 0;
  kto::RowIndex logit_rows, target_rows;
};

/// Random sequence lengths: some empty, some length 1, one all-ignored.
/// `round(x)` maps a double to the nearest value of the logit type.
template <class Round>
Plan make_plan(std::mt19937_64& rng, Layout layout, const ShapeSpec& spec, index_t ignore_index,
               Round round) {
  Plan plan;
  const index_t B = spec.sequences, V = spec.vocab;
  std::normal_distribution<double> normal(0.0, spec.logit_scale);
  std::uniform_int_distribution<index_t> token(0, V - 1);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  std::uniform_int_distribution<index_t> len_dist(0, spec.max_len);

  index_t lead = 0;   // rows before the first sequence (packed only)
  index_t trail = 0;  // rows after the last one
  std::vector<index_t> lens(B);
  if (layout == Layout::packed) {
    for (index_t s = 0; s < B; ++s) lens[s] = len_dist(rng);
    if (B > 1) lens[1] = 1;
    lead = 1;
    trail = 2;
  } else {
    for (index_t s = 0; s < B; ++s) lens[s] = spec.max_len;
  }
  ref::Problem& p = plan.problem;
  p.offsets.push_back(lead);
  for (index_t s = 0; s < B; ++s) p.offsets.push_back(p.offsets.back() + lens[s]);
  const index_t T_len = spec.max_len;
  const index_t rows = layout == Layout::packed ? p.offsets.back() + trail : B * T_len;
  p.rows = rows;
  p.vocab = V;
  p.logits.resize(rows * V);
  p.targets.resize(rows);
  for (index_t r = 0; r < rows; ++r) {
    for (index_t v = 0; v < V; ++v) p.logits[r * V + v] = round(normal(rng));
    p.targets[r] = unif(rng) < spec.ignore_fraction ? ignore_index : token(rng);
  }
  // Sequence 2 (if any) is all ignored.
  if (B > 2)
    for (index_t r = p.offsets[2]; r < p.offsets[3]; ++r) p.targets[r] = ignore_index;
  if (layout == Layout::padded)  // right padding: trailing rows ignored
    for (index_t s = 0; s < B; ++s)
      for (index_t t = T_len - (s % 3); t < T_len; ++t) p.targets[s * T_len + t] = ignore_index;

  if (layout == Layout::shifted) {
    // A [B, T+1, V] tensor seen as logits[:, :-1] with labels[:, 1:].
    const index_t Tp = T_len + 1;
    plan.logit_elements = B * Tp * V;
    plan.logit_rows = kto::logits_batched<const float>(nullptr, B, T_len, V, Tp * V, V).rows;
    plan.target_elements = B * Tp;
    plan.target_base = 1;
    plan.target_rows = kto::targets_batched(nullptr, B, T_len, Tp, 1).rows;
  } else {
    const index_t stride = layout == Layout::strided ? V + 3 : V;
    const index_t tstride = layout == Layout::strided ? 2 : 1;
    plan.logit_elements = rows * stride;
    plan.logit_rows = kto::logits_matrix<const float>(nullptr, rows, V, stride).rows;
    plan.target_elements = rows * tstride;
    plan.target_rows = kto::targets_vector(nullptr, rows, tstride).rows;
  }
  return plan;
}

/// Typed storage of a plan: padding holds `poison`, padding targets an id
/// that is never valid (so reading one is caught).
template <class T, class Convert>
void fill_storage(const Plan& plan, T poison, Convert convert, std::vector<T>& logits,
                  std::vector<index_t>& targets) {
  const ref::Problem& p = plan.problem;
  logits.assign(static_cast<size_t>(plan.logit_elements), poison);
  targets.assign(static_cast<size_t>(plan.target_elements), 12345678);
  for (index_t r = 0; r < p.rows; ++r) {
    for (index_t v = 0; v < p.vocab; ++v)
      logits[static_cast<size_t>(plan.logit_rows.offset(r) + v)] =
          convert(p.logits[r * p.vocab + v]);
    targets[static_cast<size_t>(plan.target_base + plan.target_rows.offset(r))] = p.targets[r];
  }
}

}  // namespace test
