// support.hpp — random problems in every layout and dtype, and the tolerance rule.
//
// Tolerance rule (DESIGN §4). A quantity computed with accumulation type Acc
// is compared with the float64 reference of the *upcast* inputs as
//     |got − want| ≤ rtol(Acc) · max(|want|, scale)
// where rtol = 1e-5 for fp32 accumulation (≈ 100 ulp) and 1e-12 for fp64, and
// `scale` is the magnitude the quantity was computed from (Σ|terms| for a sum,
// |g_s c_r|(1 + |lse_r|) for a gradient element): a condition-number bound, not
// a hand-tuned number. A result stored in a narrower type T (half/bf16
// gradients) adds T's unit roundoff u_T · |want|.
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <kto/kto.hpp>

#include "reference.hpp"

namespace test {

using kto::index_t;

/// Fresh seed per run (printed on failure); KTO_TEST_SEED=n reproduces a run.
inline uint64_t fresh_seed() {
  if (const char* s = std::getenv("KTO_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  static std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

template <class T>
constexpr double rtol() {
  return std::is_same<kto::accumulator_t<T>, double>::value ? 1e-12 : 1e-5;
}
template <class T>
constexpr double unit_roundoff() {
  if (std::is_same<T, double>::value) return 0x1p-53;
  if (std::is_same<T, float>::value) return 0x1p-24;
  if (std::is_same<T, Eigen::half>::value) return 0x1p-11;
  return 0x1p-8;  // bfloat16
}
template <class T>
const char* type_name() {
  if (std::is_same<T, double>::value) return "double";
  if (std::is_same<T, float>::value) return "float";
  if (std::is_same<T, Eigen::half>::value) return "half";
  return "bfloat16";
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

/// A problem stored as T in one of the layouts, with its dense float64 upcast.
template <class T>
struct Stored {
  std::vector<T> buffer;
  std::vector<index_t> target_buffer;
  kto::LogitsView<const T> logits;
  kto::TargetsView targets;
  std::vector<index_t> offsets;
  ref::Problem problem;
  index_t storage_rows_per_batch = 0;  // for building a gradient view of the same layout
  kto::SequencesView sequences() const {
    return kto::sequences(offsets.data(), static_cast<index_t>(offsets.size()) - 1);
  }
  /// A gradient buffer laid out exactly like the logits (NaN-poisoned).
  std::vector<T> poisoned_like() const {
    return std::vector<T>(buffer.size(), T(std::numeric_limits<float>::quiet_NaN()));
  }
  kto::LogitsView<T> view_over(std::vector<T>& g) const {
    kto::LogitsView<T> v{g.data(), logits.vocab, logits.rows};
    return v;
  }
};

template <class T>
T to_type(double x) {
  if (std::is_same<T, double>::value) return T(x);
  return T(static_cast<float>(x));
}
template <class T>
double upcast(T x) {
  return static_cast<double>(static_cast<kto::accumulator_t<T>>(x));
}

/// Random sequence lengths: some empty, some length 1, one all-ignored.
template <class T>
Stored<T> make_problem(std::mt19937_64& rng, Layout layout, const ShapeSpec& spec,
                       index_t ignore_index = -100) {
  Stored<T> st;
  const index_t B = spec.sequences, V = spec.vocab;
  std::normal_distribution<double> normal(0.0, spec.logit_scale);
  std::uniform_int_distribution<index_t> token(0, V - 1);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  std::uniform_int_distribution<index_t> len_dist(0, spec.max_len);

  // Logical rows and sequences.
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
  st.offsets.push_back(lead);
  for (index_t s = 0; s < B; ++s) st.offsets.push_back(st.offsets.back() + lens[s]);
  const index_t T_len = spec.max_len;
  const index_t rows = layout == Layout::packed ? st.offsets.back() + trail : B * T_len;

  ref::Problem& p = st.problem;
  p.rows = rows;
  p.vocab = V;
  p.offsets = st.offsets;
  p.logits.resize(rows * V);
  p.targets.resize(rows);
  for (index_t r = 0; r < rows; ++r) {
    for (index_t v = 0; v < V; ++v) p.logits[r * V + v] = upcast(to_type<T>(normal(rng)));
    p.targets[r] = unif(rng) < spec.ignore_fraction ? ignore_index : token(rng);
  }
  // Sequence 0 keeps its last row scored, sequence 2 (if any) is all ignored.
  if (B > 2)
    for (index_t r = st.offsets[2]; r < st.offsets[3]; ++r) p.targets[r] = ignore_index;
  if (layout == Layout::padded)  // right padding: trailing rows ignored
    for (index_t s = 0; s < B; ++s)
      for (index_t t = T_len - (s % 3); t < T_len; ++t) p.targets[s * T_len + t] = ignore_index;

  // Physical storage.
  const float poison = std::numeric_limits<float>::quiet_NaN();
  if (layout == Layout::shifted) {
    // A [B, T+1, V] tensor seen as logits[:, :-1] with labels[:, 1:].
    const index_t Tp = T_len + 1;
    st.buffer.assign(B * Tp * V, T(poison));
    st.target_buffer.assign(B * Tp, 12345678);  // never a valid id: must not be read
    for (index_t b = 0; b < B; ++b)
      for (index_t t = 0; t < T_len; ++t) {
        const index_t r = b * T_len + t;
        for (index_t v = 0; v < V; ++v)
          st.buffer[(b * Tp + t) * V + v] = to_type<T>(p.logits[r * V + v]);
        st.target_buffer[b * Tp + t + 1] = p.targets[r];
      }
    st.logits = kto::logits_batched<const T>(st.buffer.data(), B, T_len, V, Tp * V, V);
    st.targets = kto::targets_batched(st.target_buffer.data() + 1, B, T_len, Tp, 1);
  } else {
    const index_t stride = layout == Layout::strided ? V + 3 : V;
    st.buffer.assign(rows * stride, T(poison));
    for (index_t r = 0; r < rows; ++r)
      for (index_t v = 0; v < V; ++v) st.buffer[r * stride + v] = to_type<T>(p.logits[r * V + v]);
    const index_t tstride = layout == Layout::strided ? 2 : 1;
    st.target_buffer.assign(rows * tstride, 12345678);
    for (index_t r = 0; r < rows; ++r) st.target_buffer[r * tstride] = p.targets[r];
    st.logits = kto::logits_matrix<const T>(st.buffer.data(), rows, V, stride);
    st.targets = kto::targets_vector(st.target_buffer.data(), rows, tstride);
  }
  return st;
}

/// Gradient of the stored layout at logical row r, column v.
template <class T>
double grad_at(const Stored<T>& st, const std::vector<T>& g, index_t r, index_t v) {
  return upcast(g[static_cast<size_t>(st.logits.rows.offset(r) + v)]);
}

}  // namespace test
