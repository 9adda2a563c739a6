// Frozen head (issue 25, item 1): an empty grads.d_weight (and d_bias) makes the
// fused-linear step skip dW (and db). dH, the loss, the metrics and every
// per-example output must be bit for bit those of the run that asks for dW, and
// within the float64 reference's rule (fused_problem.hpp); a d_weight of any
// other nonzero shape is still refused, by name.
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include <kto/cpu/fused_linear.hpp>

#include "fused_fixture.hpp"
#include "ranks.hpp"

namespace {

/// A fused step whose dW (and db) the caller may leave empty: empty views, no buffers.
template <class T>
Run<T> run_frozen(const FusedProblem& fp, const kto::Options& o,
                  const kto::cpu::FusedLinearConfig& cfg, bool weight_grad, bool bias_grad,
                  const kto::cpu::ExecutionPolicy& exec = {},
                  const kto::LinearHead<T>* head_override = nullptr,
                  const kto::cpu::FusedLinearHooks<kto::accumulator_t<T>>& hooks = {}) {
  using Acc = kto::accumulator_t<T>;
  const Storage<T> st(fp);
  const kto::LinearHead<T> head = head_override ? *head_override : st.head();
  const index_t V = head.weight.rows, D = fp.dim;
  Run<T> run;
  const Acc poison = std::numeric_limits<Acc>::quiet_NaN();
  run.d_hidden.assign(static_cast<size_t>(fp.rows * D), poison);
  kto::cpu::LinearGradients<Acc> g;
  g.d_hidden = kto::matrix_view(run.d_hidden.data(), fp.rows, D);
  if (weight_grad) {
    run.d_weight.assign(static_cast<size_t>(V * D), poison);
    g.d_weight = kto::matrix_view(run.d_weight.data(), V, D);
  }
  if (bias_grad) {
    run.d_bias.assign(static_cast<size_t>(V), poison);
    g.d_bias = kto::make_span(run.d_bias.data(), V);
  }
  run.result = kto::cpu::fused_linear_kto_step<T>(st.inputs(), head, o, g, cfg, exec, hooks);
  return run;
}

template <class V>
bool same_bits(const V& a, const V& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0);
}

/// Everything but dW and db of a frozen run equals the full run's, bit for bit.
template <class T>
void check_same_as_full(const Run<T>& frozen, const Run<T>& full) {
  CHECK(same_bits(frozen.d_hidden, full.d_hidden));
  const auto &a = frozen.result, &b = full.result;
  CHECK(std::memcmp(&a.metrics, &b.metrics, sizeof(kto::Metrics)) == 0);
  CHECK(same_bits(a.logp, b.logp));
  CHECK(same_bits(a.num_tokens, b.num_tokens));
  CHECK(same_bits(a.row_lse, b.row_lse));
  CHECK(same_bits(a.examples.ratio, b.examples.ratio));
  CHECK(same_bits(a.examples.reward, b.examples.reward));
  CHECK(same_bits(a.examples.loss, b.examples.loss));
  CHECK(same_bits(a.examples.grad_logp, b.examples.grad_logp));
  CHECK(same_bits(a.token_statistics.entropy_sum, b.token_statistics.entropy_sum));
  CHECK(same_bits(a.token_statistics.mean_logit_sum, b.token_statistics.mean_logit_sum));
}

}  // namespace

TEMPLATE_TEST_CASE("frozen head: no dW, dH and every output bit for bit the full run's",
                   "[fused][frozen]", float, double, Eigen::bfloat16) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const auto strategy = GENERATE(FusedStrategy::keep_chunk, FusedStrategy::recompute);
  // 3 rows: groups of short sequences and long sequences split in pieces; 1000: one chunk.
  const index_t chunk_rows = GENERATE(1, 3, 1000);
  const bool with_bias = GENERATE(true, false);
  const bool bias_request = GENERATE(true, false);  // a trainable bias on a frozen W
  const bool bias_grad = with_bias && bias_request;
  // bfloat16: the library's bf16 GEMM (where the CPU has it) and the fp32 widening.
  const bool bf16_gemm = GENERATE(true, false);
  if (!std::is_same<T, Eigen::bfloat16>::value && !bf16_gemm) return;
  const bool statistics = GENERATE(false, true);
  INFO("seed " << seed << " dtype " << test::type_name<T>() << " strategy " << int(strategy)
               << " chunk rows " << chunk_rows << " bias " << with_bias << " bias grad "
               << bias_grad << " bf16 gemm " << bf16_gemm << " statistics " << statistics);
  test::FusedSpec spec;
  spec.vocab = 123;
  spec.dim = 24;
  auto fp = make_problem<T>(rng, spec);
  fp.with_bias = with_bias;
  kto::Options o;
  o.undesirable_weight = 1.33;
  o.token_statistics = statistics;
  auto cfg = config_rows<T>(fp, chunk_rows, strategy);
  cfg.bf16_gemm = bf16_gemm;
  const auto full = run_fused<T>(fp, o, cfg);
  const auto frozen = run_frozen<T>(fp, o, cfg, false, bias_grad);
  check_same_as_full(frozen, full);
  CHECK(frozen.d_weight.empty());
  if (bias_grad) CHECK(same_bits(frozen.d_bias, full.d_bias));
  // And within the float64 reference's rule (dW not compared: there is none).
  test::compare_fused(fp, test::fused_reference(fp, o), observe(frozen), o, test::rtol<T>());
}

TEST_CASE("frozen head: a d_bias alone, or dW alone, each equal the full run's",
          "[fused][frozen]") {
  std::mt19937_64 rng(test::fresh_seed());
  test::FusedSpec spec;
  spec.vocab = 301;
  const auto fp = make_problem<float>(rng, spec);
  kto::Options o;
  const auto cfg = config_rows<float>(fp, 5, FusedStrategy::keep_chunk);
  const auto full = run_fused<float>(fp, o, cfg);
  const auto weight_only = run_frozen<float>(fp, o, cfg, true, false);
  check_same_as_full(weight_only, full);
  CHECK(same_bits(weight_only.d_weight, full.d_weight));
  CHECK(weight_only.d_bias.empty());
  // Thread counts split output rows or vocab columns: still the same bits.
  const auto threads = run_frozen<float>(fp, o, cfg, false, false, kto::cpu::ExecutionPolicy{3});
  check_same_as_full(threads, full);
}

namespace {

/// Each rank's run on its vocabulary slice (2 ranks), frozen or not.
template <class T>
std::vector<Run<T>> sharded_runs(const FusedProblem& fp, const kto::Options& o, bool frozen) {
  using Acc = kto::accumulator_t<T>;
  const int ranks = 2;
  const auto cfg = config_rows<T>(fp, 6, FusedStrategy::keep_chunk);
  const Storage<T> st(fp);
  test::GatherBoard<Acc> board(ranks);
  std::vector<Run<T>> runs(static_cast<size_t>(ranks));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(ranks));
  std::vector<std::thread> threads;
  const index_t split = fp.vocab / 2;
  for (int k = 0; k < ranks; ++k) {
    threads.emplace_back([&, k] {
      try {
        kto::LinearHead<T> head = st.head();
        const index_t b = k == 0 ? 0 : split, n = k == 0 ? split : fp.vocab - split;
        head.weight = kto::matrix_view<const T>(st.weight.data() + b * fp.dim, n, fp.dim);
        head.bias = kto::make_span(st.bias.data() + b, n);
        head.vocab_begin = b;
        head.vocab_total = fp.vocab;
        kto::cpu::FusedLinearHooks<Acc> hooks;
        hooks.gather_partials = [&](const auto& local, auto& all) { board.gather(k, local, all); };
        runs[k] = frozen ? run_frozen<T>(fp, o, cfg, false, false, kto::cpu::ExecutionPolicy{1},
                                         &head, hooks)
                         : run_fused<T>(fp, o, cfg, kto::cpu::ExecutionPolicy{1}, &head, hooks);
      } catch (...) {
        errors[k] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return runs;
}

}  // namespace

TEMPLATE_TEST_CASE("frozen head, vocab-parallel: each slice's dH and outputs equal the full run's",
                   "[fused][frozen][tp]", float, Eigen::bfloat16) {
  using T = TestType;
  std::mt19937_64 rng(test::fresh_seed());
  test::FusedSpec spec;
  spec.vocab = 101;
  const auto fp = make_problem<T>(rng, spec);
  kto::Options o;
  o.undesirable_weight = 1.33;
  const auto full = sharded_runs<T>(fp, o, false);
  const auto frozen = sharded_runs<T>(fp, o, true);
  for (size_t k = 0; k < full.size(); ++k) {
    INFO("rank " << k);
    check_same_as_full(frozen[k], full[k]);
    CHECK(frozen[k].d_weight.empty());
  }
}

TEST_CASE("frozen head: an empty d_weight is accepted; any other shape is refused by name",
          "[fused][frozen][errors]") {
  FusedFixture f;
  SECTION("empty d_weight and d_bias: accepted, dH written") {
    f.grads.d_weight = {};
    f.grads.d_bias = {};
    std::fill(f.dh.begin(), f.dh.end(), std::numeric_limits<float>::quiet_NaN());
    f.run();
    CHECK(std::none_of(f.dh.begin(), f.dh.end(), [](float x) { return std::isnan(x); }));
  }
  SECTION("empty d_weight with a D-wide view of no rows (a [0, D] tensor): accepted") {
    f.grads.d_weight = kto::matrix_view<float>(nullptr, 0, f.fp.dim);
    f.run();
  }
  SECTION("rows short by one") {
    f.grads.d_weight.rows = 36;
    expect_error([&] { f.run(); }, "grads.d_weight", "have the shape of head.weight (37 x 16)",
                 "36 x 16");
  }
  SECTION("no rows but a buffer: not the empty view") {
    f.grads.d_weight.rows = 0;
    expect_error([&] { f.run(); }, "grads.d_weight", "have the shape of head.weight (37 x 16)",
                 "0 x 16");
  }
  SECTION("the wrong width") {
    f.grads.d_weight.cols = 15;
    expect_error([&] { f.run(); }, "grads.d_weight", "have the shape of head.weight (37 x 16)",
                 "37 x 15");
  }
  SECTION("rows but no buffer") {
    f.grads.d_weight.data = nullptr;
    expect_error([&] { f.run(); }, "grads.d_weight.data", "be non-null when there are rows",
                 "nullptr");
  }
}

TEST_CASE("frozen head: only the gradients asked for are bounded before the collective",
          "[fused][frozen][robustness]") {
  // Finite inputs whose dW = Σ dZ·h overflows fp32 (issue 27's case), while dH = dZ·W does not:
  // refused when dW is asked for, computed when the head is frozen.
  const auto strategy = GENERATE(FusedStrategy::keep_chunk, FusedStrategy::recompute);
  FusedFixture f;
  f.o.desirable_weight = f.o.undesirable_weight = 1e6;
  f.o.reduction = kto::Reduction::sum;
  for (double& x : f.fp.hidden) x *= 1e36;
  for (double& x : f.fp.weight) x *= 1e-36;
  f.restore();
  kto::cpu::FusedLinearConfig cfg;
  cfg.strategy = strategy;
  const auto step = [&] {
    kto::cpu::fused_linear_kto_step<float>(f.in, f.head, f.o, f.grads, cfg, {}, f.hooks);
  };
  CHECK_THROWS_WITH(step(), Catch::Contains("'hidden'") && Catch::Contains("grads.d_weight"));
  f.grads.d_weight = {};
  step();
  CHECK(std::all_of(f.dh.begin(), f.dh.end(), [](float x) { return std::isfinite(x); }));
}
