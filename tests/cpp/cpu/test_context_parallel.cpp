// Context-parallel steps (cpu/context_parallel.hpp): R threads standing in for ranks, each
// holding a contiguous slice of every sequence's rows, against the float64 reference of
// the whole batch under the tolerance rule of support.hpp; then composed with data
// parallel (2 × 2 ranks); then the failure protocol of both collectives.
#include <kto/cpu/context_parallel.hpp>

#include "check_step.hpp"
#include "ranks.hpp"

using kto::index_t;
using test::Layout;

namespace {

/// Rank k's slice of a batch: rows [b + n k / R, b + n (k + 1) / R) of each sequence
/// [b, b + n), copied contiguous, with offsets over the copy.
template <class T>
struct Slice {
  std::vector<T> logits;
  std::vector<index_t> targets, offsets, rows;  ///< rows: each local row's batch row
  index_t vocab = 0;

  Slice(const test::Stored<T>& st, int k, int ranks) : vocab(st.logits.vocab) {
    const index_t B = static_cast<index_t>(st.offsets.size()) - 1;
    offsets.push_back(0);
    for (index_t s = 0; s < B; ++s) {
      const index_t b = st.offsets[s], n = st.offsets[s + 1] - b;
      for (index_t r = b + n * k / ranks; r < b + n * (k + 1) / ranks; ++r) {
        rows.push_back(r);
        targets.push_back(st.targets.at(r));
        logits.insert(logits.end(), st.logits.row(r), st.logits.row(r) + vocab);
      }
      offsets.push_back(static_cast<index_t>(rows.size()));
    }
  }
  index_t count() const { return static_cast<index_t>(rows.size()); }
  kto::cpu::StepInputs<T> inputs(kto::cpu::StepInputs<T> in) const {
    in.policy_logits = kto::logits_matrix<const T>(logits.data(), count(), vocab);
    in.targets = kto::targets_vector(targets.data(), count());
    in.sequences = kto::sequences(offsets.data(), static_cast<index_t>(offsets.size()) - 1);
    return in;
  }
};

/// A 2 × 2 mesh of threads: rank 2d + k holds slice k of replica d's batch; the sequence
/// sums travel over the context-parallel group {(d, 0), (d, 1)}, the KL (S, C) over the
/// data-parallel group {(0, k), (1, k)}. Returns each rank's exception (or null).
template <class T>
std::vector<std::exception_ptr> run_mesh(const std::vector<test::StepCase<T>>& cases,
                                         const std::vector<Slice<T>>& slices, const kto::Options& o,
                                         std::vector<kto::cpu::StepResult<T>>& results) {
  test::ThreadSum context0(2), context1(2), data0(2), data1(2);
  test::ThreadSum* context[2] = {&context0, &context1};
  test::ThreadSum* data[2] = {&data0, &data1};
  results.resize(4);
  return test::run_ranks(4, [&](int rank) {
    const int d = rank / 2, k = rank % 2;
    results[static_cast<size_t>(rank)] = kto::cpu::context_parallel_step_forward<T>(
        slices[static_cast<size_t>(rank)].inputs(test::step_inputs(cases[static_cast<size_t>(d)])),
        o, std::ref(*context[d]), {}, std::ref(*data[k]));
  });
}

}  // namespace

TEMPLATE_TEST_CASE("context parallel: R ranks' slices equal the float64 reference of the batch",
                   "[context_parallel]", float, double, Eigen::bfloat16) {
  using T = TestType;
  using Acc = kto::accumulator_t<T>;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const int ranks = GENERATE(2, 3);
  const bool average = GENERATE(false, true);
  kto::Options o;
  o.beta = 0.5;
  o.average_logprob = average;
  o.token_statistics = true;
  test::ShapeSpec spec;
  spec.sequences = 5;
  spec.max_len = 9;
  spec.vocab = 123;
  INFO("seed " << seed << " dtype " << test::type_name<T>() << " ranks " << ranks << " average "
               << average);
  const test::StepCase<T> c = test::make_step_case<T>(rng, Layout::packed, spec, o);
  const ref::Step want = test::reference_step(c, o);
  if (want.empty_kl) return;  // the KL batch's z0 is undefined: kto_step's own test covers it

  std::vector<Slice<T>> slices;
  for (int k = 0; k < ranks; ++k) slices.emplace_back(c.st, k, ranks);
  std::vector<std::vector<T>> grads(static_cast<size_t>(ranks));
  std::vector<kto::cpu::StepResult<Acc>> results(static_cast<size_t>(ranks));
  test::ThreadSum sum(ranks);
  const auto errors = test::run_ranks(ranks, [&](int k) {
    const Slice<T>& s = slices[static_cast<size_t>(k)];
    auto& g = grads[static_cast<size_t>(k)];
    g.assign(s.logits.size(), T(std::numeric_limits<float>::quiet_NaN()));
    results[static_cast<size_t>(k)] = kto::cpu::context_parallel_kto_step<T>(
        s.inputs(test::step_inputs(c)), o, kto::logits_matrix<T>(g.data(), s.count(), s.vocab),
        std::ref(sum));
  });
  for (const auto& e : errors) REQUIRE(!e);

  // Every rank finished the same whole sequences: bit for bit the same outputs.
  for (int k = 1; k < ranks; ++k) {
    CHECK(results[static_cast<size_t>(k)].metrics.loss == results[0].metrics.loss);
    CHECK(results[static_cast<size_t>(k)].examples.grad_logp == results[0].examples.grad_logp);
  }
  // The slices' gradient rows, back at their batch rows; rows outside every sequence
  // belong to no rank and have gradient 0.
  const ref::Problem& p = c.st.problem;
  std::vector<double> grad(static_cast<size_t>(p.rows * p.vocab), 0.0);
  for (int k = 0; k < ranks; ++k) {
    const Slice<T>& s = slices[static_cast<size_t>(k)];
    for (index_t i = 0; i < s.count(); ++i)
      for (index_t v = 0; v < p.vocab; ++v)
        grad[static_cast<size_t>(s.rows[static_cast<size_t>(i)] * p.vocab + v)] =
            test::upcast(grads[static_cast<size_t>(k)][static_cast<size_t>(i * s.vocab + v)]);
  }
  test::Observed obs = test::observed(results[0]);
  obs.grad = [&](index_t r, index_t v) { return grad[static_cast<size_t>(r * p.vocab + v)]; };
  const std::vector<double> reference_logp(c.ref_logp.begin(), c.ref_logp.end());
  test::compare_step(p, reference_logp, want, obs, o, test::rtol<T>(), test::unit_roundoff<T>());
  test::compare_token_statistics(p, o.ignore_index, results[0].token_statistics.entropy_sum,
                                 results[0].token_statistics.mean_logit_sum);
}

TEST_CASE("context parallel composes with data parallel: 2 replicas × 2 slices",
          "[context_parallel]") {
  // Replica d holds batch d; rank (d, k) holds slice k of it. The sequence sums travel
  // over the context-parallel group {(d, 0), (d, 1)}, the KL (S, C) over the
  // data-parallel group {(0, k), (1, k)}: z0 is that of both KL batches together.
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  INFO("seed " << seed);
  kto::Options o;
  o.beta = 0.3;
  test::ShapeSpec spec;
  spec.sequences = 4;
  spec.max_len = 8;
  spec.vocab = 57;
  std::vector<test::StepCase<float>> cases;
  for (int d = 0; d < 2; ++d)
    cases.push_back(test::make_step_case<float>(rng, Layout::packed, spec, o));
  // One replica alone on its batch, with both KL batches as its own: the reference.
  std::vector<test::StepCase<float>> joint = cases;
  for (int d = 0; d < 2; ++d) {
    auto& j = joint[static_cast<size_t>(d)];
    const auto& other = cases[static_cast<size_t>(1 - d)];
    j.kl_policy.insert(j.kl_policy.end(), other.kl_policy.begin(), other.kl_policy.end());
    j.kl_reference.insert(j.kl_reference.end(), other.kl_reference.begin(),
                          other.kl_reference.end());
    j.kl_tokens.insert(j.kl_tokens.end(), other.kl_tokens.begin(), other.kl_tokens.end());
  }
  std::vector<kto::cpu::StepResult<float>> results;
  std::vector<Slice<float>> slices;
  for (int rank = 0; rank < 4; ++rank) slices.emplace_back(cases[rank / 2].st, rank % 2, 2);
  const auto errors = run_mesh(cases, slices, o, results);
  for (const auto& e : errors) REQUIRE(!e);
  for (int rank = 0; rank < 4; ++rank) {
    INFO("rank " << rank);
    const auto& j = joint[static_cast<size_t>(rank / 2)];
    const ref::Step want = test::reference_step(j, o);
    const std::vector<double> reference_logp(j.ref_logp.begin(), j.ref_logp.end());
    test::compare_examples(j.st.problem, reference_logp, want,
                           test::observed(results[static_cast<size_t>(rank)]), o,
                           test::rtol<float>());
  }
}

TEST_CASE("context parallel: a failing rank raises on every rank of the group",
          "[context_parallel]") {
  std::mt19937_64 rng(7);
  kto::Options o;
  test::ShapeSpec spec;
  spec.ignore_fraction = 0.0;
  test::StepCase<float> c = test::make_step_case<float>(rng, Layout::packed, spec, o);
  std::vector<Slice<float>> slices{Slice<float>(c.st, 0, 2), Slice<float>(c.st, 1, 2)};
  slices[1].logits[3] = std::numeric_limits<float>::quiet_NaN();  // a scored row of rank 1
  test::ThreadSum sum(2);
  const auto errors = test::run_ranks(2, [&](int k) {
    kto::cpu::context_parallel_step_forward<float>(
        slices[static_cast<size_t>(k)].inputs(test::step_inputs(c)), o, std::ref(sum));
  });
  REQUIRE(errors[0]);
  REQUIRE(errors[1]);
  try {
    std::rethrow_exception(errors[1]);
  } catch (const kto::NonFiniteLogitsError& e) {
    CHECK(e.function() == "kto::cpu::context_parallel_step_forward");
    CHECK(std::string(e.what()).find("is nan") != std::string::npos);
  }
  try {
    std::rethrow_exception(errors[0]);
  } catch (const kto::PeerError& e) {
    CHECK(e.failed_ranks() == 1.0);
    CHECK(std::string(e.what()).find("1 context-parallel rank(s) failed before the sequence "
                                     "all-reduce") != std::string::npos);
  }
  CHECK_THROWS_WITH(kto::cpu::context_parallel_step_forward<float>(test::step_inputs(c), o, {}),
                    "kto::cpu::context_parallel_step_forward: argument 'sequence_all_reduce' "
                    "must be set: it sums across the context-parallel group; got an empty "
                    "function");
}

TEST_CASE("context parallel with data parallel: a failing rank raises on all 2 × 2 ranks",
          "[context_parallel]") {
  // Rank (1, 1) has a NaN: its context-parallel group {(1, 0), (1, 1)} learns it from the
  // sequence all-reduce, and the other group from the KL all-reduce, which the failed
  // group still joins; nobody waits in a collective (ThreadSum times out otherwise).
  std::mt19937_64 rng(11);
  kto::Options o;
  test::ShapeSpec spec;
  spec.ignore_fraction = 0.0;
  std::vector<test::StepCase<float>> cases;
  for (int d = 0; d < 2; ++d)
    cases.push_back(test::make_step_case<float>(rng, Layout::packed, spec, o));
  std::vector<Slice<float>> slices;
  for (int rank = 0; rank < 4; ++rank) slices.emplace_back(cases[rank / 2].st, rank % 2, 2);
  slices[3].logits[3] = std::numeric_limits<float>::quiet_NaN();
  std::vector<kto::cpu::StepResult<float>> results;
  const auto errors = run_mesh(cases, slices, o, results);
  const auto what = [&](int rank) {
    try {
      std::rethrow_exception(errors[static_cast<size_t>(rank)]);
    } catch (const kto::PeerError& e) {
      return std::string("PeerError: ") + e.what();
    } catch (const kto::Error& e) {
      return std::string("Error: ") + e.what();
    }
  };
  for (int rank = 0; rank < 4; ++rank) REQUIRE(errors[static_cast<size_t>(rank)]);
  CHECK(what(3).find("Error: kto::cpu::context_parallel_step_forward") == 0);
  CHECK(what(3).find("is nan") != std::string::npos);
  CHECK(what(2).find("1 context-parallel rank(s) failed before the sequence all-reduce") !=
        std::string::npos);
  for (int rank : {0, 1})
    CHECK(what(rank).find("data-parallel rank(s) failed before the KL all-reduce") !=
          std::string::npos);
}
