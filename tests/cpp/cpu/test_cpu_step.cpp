// The CPU path against the float64 reference: every dtype, layout and option.
#include "check_step.hpp"

using test::Layout;

#define KTO_DTYPES float, double, Eigen::half, Eigen::bfloat16

TEMPLATE_TEST_CASE("sequence_logprobs matches the float64 reference", "[forward]", KTO_DTYPES) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const Layout layout = GENERATE(Layout::padded, Layout::packed, Layout::strided, Layout::shifted);
  const kto::index_t vocab = GENERATE(1, 3, 123, 2500);
  const bool average = GENERATE(false, true);
  INFO("seed " << seed << " dtype " << test::type_name<T>() << " layout "
               << test::layout_name(layout) << " V " << vocab << " average " << average);
  test::ShapeSpec spec;
  spec.vocab = vocab;
  spec.sequences = 5;
  const auto st = test::make_problem<T>(rng, layout, spec);
  kto::Options o;
  o.average_logprob = average;
  const auto got = kto::cpu::sequence_logprobs<T>(st.logits, st.targets, st.sequences(), o);
  const auto want = ref::forward(st.problem, o.ignore_index, average);
  const double tol = test::rtol<T>();
  for (kto::index_t r = 0; r < st.problem.rows; ++r) {
    const bool in_seq = r >= st.offsets.front() && r < st.offsets.back();
    if (!in_seq || st.problem.targets[r] == o.ignore_index) {
      CHECK(got.token_logp[r] == 0);
      continue;
    }
    const double scale = std::fabs(want.lse[r]) + 1.0;
    KTO_CHECK_CLOSE(got.row_lse[r], want.lse[r], scale, tol);
    KTO_CHECK_CLOSE(got.token_logp[r], want.token_logp[r], scale, tol);
  }
  for (kto::index_t s = 0; s < st.problem.num_sequences(); ++s) {
    double scale = 1.0;
    for (kto::index_t r = st.offsets[s]; r < st.offsets[s + 1]; ++r)
      if (st.problem.targets[r] != o.ignore_index)
        scale += std::fabs(want.lse[r]) + std::fabs(want.token_logp[r]);
    CHECK(got.num_tokens[s] == want.num_tokens[s]);
    KTO_CHECK_CLOSE(got.logp[s], want.logp[s], scale, tol);
  }
}

TEMPLATE_TEST_CASE("kto_step matches the reference in every layout out of place and in place",
                   "[step]", KTO_DTYPES) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const Layout layout = GENERATE(Layout::padded, Layout::packed, Layout::strided, Layout::shifted);
  const bool in_place = GENERATE(false, true);
  INFO("seed " << seed << " dtype " << test::type_name<T>() << " layout "
               << test::layout_name(layout) << " in_place " << in_place);
  kto::Options o;
  o.desirable_weight = 1.0;
  o.undesirable_weight = 1.33;
  test::ShapeSpec spec;
  spec.vocab = 123;
  const auto c = test::make_step_case<T>(rng, layout, spec, o);
  test::check_step(c, o, in_place);
}

TEST_CASE("kto_step matches the reference for every option combination", "[step][options]") {
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  INFO("seed " << seed);
  KTO_GENERATE_COMBINATION(o);
  test::ShapeSpec spec;
  spec.vocab = 41;
  const auto c = test::make_step_case<float>(rng, Layout::packed, spec, o);
  test::check_step(c, o, false);
}

TEST_CASE("kto_step clamps a negative KL estimate only when asked", "[step][options]") {
  std::mt19937_64 rng(test::fresh_seed());
  kto::Options o;
  auto c = test::make_step_case<double>(rng, Layout::padded, {}, o);
  for (size_t j = 0; j < c.kl_policy.size(); ++j) c.kl_reference[j] = c.kl_policy[j] + 2.0;
  const auto in = test::step_inputs(c);
  std::vector<double> g = c.st.poisoned_like();
  o.clamp_kl = true;
  CHECK(kto::cpu::kto_step<double>(in, o, c.st.view_over(g)).metrics.kl == 0.0);
  o.clamp_kl = false;
  CHECK(kto::cpu::kto_step<double>(in, o, c.st.view_over(g)).metrics.kl == Approx(-2.0));
  o.kl_estimator = kto::KlEstimator::nonempty_mean;  // KL example 0 is empty
  CHECK(kto::cpu::kto_step<double>(in, o, c.st.view_over(g)).metrics.kl == Approx(-2.0));
  test::check_step(c, o, false);
}

TEMPLATE_TEST_CASE("kto_step at odd shapes: V 1 3 50257 and all-desirable / all-undesirable",
                   "[step][shapes]", KTO_DTYPES) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const kto::index_t vocab = GENERATE(1, 3, 50257);
  const int labels = GENERATE(-1, 0, 1);
  INFO("seed " << seed << " dtype " << test::type_name<T>() << " V " << vocab << " labels "
               << labels);
  test::ShapeSpec spec;
  spec.vocab = vocab;
  spec.sequences = vocab > 1000 ? 3 : 6;
  spec.max_len = vocab > 1000 ? 2 : 5;
  kto::Options o;
  const auto c = test::make_step_case<T>(rng, Layout::packed, spec, o, labels);
  test::check_step(c, o, false);
}

TEST_CASE("kto_step: the seed's sequences of length 1 and all-ignored sequences", "[step]") {
  // Three sequences: length 1, all ignored, length 0 (packed offsets 0,1,3,3).
  const kto::index_t V = 7;
  std::vector<double> Z(3 * V);
  for (size_t i = 0; i < Z.size(); ++i) Z[i] = std::cos(0.37 * double(i)) * 4.0;
  std::vector<kto::index_t> targets = {3, -100, -100};
  std::vector<kto::index_t> offsets = {0, 1, 3, 3};
  std::vector<double> ref = {-2.0, 0.0, 0.0};
  std::vector<uint8_t> des = {1, 0, 1};
  std::vector<double> klp = {-3.0}, klr = {-3.5};
  kto::cpu::StepInputs<double> in{kto::logits_matrix<const double>(Z.data(), 3, V),
                                  kto::targets_vector(targets.data(), 3),
                                  kto::sequences(offsets.data(), 3),
                                  kto::reference_logp(ref),
                                  kto::make_span(des),
                                  {kto::policy_logp(klp), kto::reference_logp(klr), {}}};
  kto::Options o;
  o.average_logprob = true;  // all-ignored stays 0, not 0/0
  std::vector<double> G(Z.size(), NAN);
  const auto r = kto::cpu::kto_step<double>(in, o, kto::logits_matrix<double>(G.data(), 3, V));
  CHECK(r.num_tokens == std::vector<kto::index_t>{1, 0, 0});
  CHECK(r.logp[1] == 0.0);
  CHECK(r.logp[2] == 0.0);
  for (kto::index_t i = V; i < 3 * V; ++i) CHECK(G[i] == 0.0);
  double m = -INFINITY, s = 0;
  for (int v = 0; v < V; ++v) m = std::max(m, Z[v]);
  for (int v = 0; v < V; ++v) s += std::exp(Z[v] - m);
  CHECK(r.logp[0] == Approx(Z[3] - m - std::log(s)).epsilon(1e-13));
}

namespace {
// Whether KlInputs<float>{a, b, tokens} compiles for argument types A and B.
template <class A, class B, class = void>
struct BracesKl : std::false_type {};
template <class A, class B>
struct BracesKl<A, B,
                std::void_t<decltype(kto::cpu::KlInputs<float>{std::declval<A>(), std::declval<B>(),
                                                               kto::Span<const kto::index_t>{}})>>
    : std::true_type {};
}  // namespace

TEST_CASE("the policy's and the reference's log-probs cannot be swapped silently", "[api]") {
  using Policy = kto::PolicyLogp<float>;
  using Reference = kto::ReferenceLogp<float>;
  using Plain = kto::Span<const float>;
  // Named: the intended order compiles; a swap, or bare spans, do not.
  static_assert(BracesKl<Policy, Reference>::value, "policy, reference compiles");
  static_assert(!BracesKl<Reference, Policy>::value, "a swap must not compile");
  static_assert(!BracesKl<Plain, Plain>::value, "bare spans must not compile");
  static_assert(!std::is_convertible<Reference, Policy>::value, "no conversion between them");
  static_assert(!std::is_convertible<Policy, Reference>::value, "no conversion between them");
  static_assert(!std::is_convertible<Plain, Reference>::value, "a span must be named");
  static_assert(std::is_convertible<Reference, Plain>::value, "the readers take spans");
  // A writable logits view passes where a read-only one is taken (not the reverse).
  static_assert(std::is_convertible<kto::LogitsView<float>, kto::LogitsView<const float>>::value,
                "LogitsView<T> converts to LogitsView<const T>");
  static_assert(!std::is_convertible<kto::LogitsView<const float>, kto::LogitsView<float>>::value,
                "but not back");
  // Named values reach the step in the right roles: ρ = policy − reference = +0.5 nats.
  std::vector<float> klp = {-3.0f}, klr = {-3.5f};
  const kto::cpu::KlInputs<float> kl{kto::policy_logp(klp), kto::reference_logp(klr), {}};
  kto::Options o;
  const kto::KlPartial p = kto::kl_partial<float>(kl.policy_logp, kl.reference_logp, {}, o);
  CHECK(p.sum == 0.5);
  CHECK(p.count == 1.0);
  std::vector<float> z = {0.0f, 1.0f, 2.0f};
  std::vector<kto::index_t> t = {2}, off = {0, 1};
  const kto::LogitsView<float> writable = kto::logits_matrix<float>(z.data(), 1, 3);
  const auto f = kto::cpu::sequence_logprobs<float>(writable, kto::targets_vector(t.data(), 1),
                                                    kto::sequences(off.data(), 1), o);
  CHECK(f.logp[0] == Approx(2.0 - std::log(1.0 + std::exp(1.0) + std::exp(2.0))));
}
