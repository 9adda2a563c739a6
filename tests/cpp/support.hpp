// support.hpp — random problems in every layout and dtype, and the tolerance rule.
//
// Tolerance rule (docs/math.md §7). A quantity computed with accumulation type Acc
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

#include "type_name.hpp"

#include "problem.hpp"
#include "reference.hpp"

namespace test {

using kto::index_t;

/// f() raises kto::Error naming `argument`, containing `expectation` and "got <got>".
template <class F>
void expect_error(F&& f, const std::string& argument, const std::string& expectation,
                  const std::string& got) {
  try {
    f();
    FAIL("no kto::Error for " << argument);
  } catch (const kto::Error& e) {
    INFO("message: " << e.what());
    CHECK(e.argument() == argument);
    const std::string msg = e.what();
    CHECK(msg.find("'" + argument + "'") != std::string::npos);
    CHECK(msg.find(expectation) != std::string::npos);
    CHECK(msg.find("got " + got) != std::string::npos);
  }
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

/// A problem stored as T in one of the layouts, with its dense float64 upcast.
template <class T>
struct Stored {
  std::vector<T> buffer;
  std::vector<index_t> target_buffer;
  kto::LogitsView<const T> logits;
  kto::TargetsView targets;
  std::vector<index_t> offsets;
  ref::Problem problem;
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

template <class T>
Stored<T> make_problem(std::mt19937_64& rng, Layout layout, const ShapeSpec& spec,
                       index_t ignore_index = -100) {
  Stored<T> st;
  const Plan plan =
      make_plan(rng, layout, spec, ignore_index, [](double x) { return upcast(to_type<T>(x)); });
  st.problem = plan.problem;
  st.offsets = plan.problem.offsets;
  fill_storage(plan, T(std::numeric_limits<float>::quiet_NaN()), to_type<T>, st.buffer,
               st.target_buffer);
  st.logits = kto::LogitsView<const T>{st.buffer.data(), spec.vocab, plan.logit_rows};
  st.targets = kto::TargetsView{st.target_buffer.data() + plan.target_base, plan.target_rows};
  return st;
}

/// Gradient of the stored layout at logical row r, column v.
template <class T>
double grad_at(const Stored<T>& st, const std::vector<T>& g, index_t r, index_t v) {
  return upcast(g[static_cast<size_t>(st.logits.rows.offset(r) + v)]);
}

}  // namespace test
