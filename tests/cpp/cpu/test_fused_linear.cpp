// The fused-linear CPU step against the float64 reference, the logits-level
// path, finite differences, its memory bound and its vocab-parallel form.
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>

#include <kto/cpu/fused_linear.hpp>

#include "fused_fixture.hpp"
#include "ranks.hpp"

#define KTO_DTYPES float, double, Eigen::half, Eigen::bfloat16

TEMPLATE_TEST_CASE("fused-linear step matches the float64 reference", "[fused]", KTO_DTYPES) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const auto strategy = GENERATE(FusedStrategy::keep_chunk, FusedStrategy::recompute);
  // 3 rows: groups of short sequences and long sequences split in pieces;
  // 1000: one chunk holds everything.
  const index_t chunk_rows = GENERATE(1, 3, 7, 1000);
  const bool with_bias = GENERATE(true, false);
  const index_t vocab = GENERATE(1, 37, 123);
  INFO("seed " << seed << " dtype " << test::type_name<T>() << " strategy " << int(strategy)
               << " chunk rows " << chunk_rows << " bias " << with_bias << " V " << vocab);
  test::FusedSpec spec;
  spec.vocab = vocab;
  spec.dim = 24;
  auto fp = make_problem<T>(rng, spec);
  fp.with_bias = with_bias;
  kto::Options o;
  o.undesirable_weight = 1.33;
  const auto run = run_fused<T>(fp, o, config_rows<T>(fp, chunk_rows, strategy));
  const auto R = test::fused_reference(fp, o);
  test::compare_fused(fp, R, observe(run), o, test::rtol<T>());
}

TEMPLATE_TEST_CASE("fused-linear step with a logit transform matches the float64 reference",
                   "[fused][logit_transform]", float, double) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const auto strategy = GENERATE(FusedStrategy::keep_chunk, FusedStrategy::recompute);
  const int transform = GENERATE(1, 2);  // scale and temperature; Gemma-2-style soft-cap
  INFO("seed " << seed << " dtype " << test::type_name<T>() << " strategy " << int(strategy)
               << " transform " << transform);
  test::FusedSpec spec;
  spec.vocab = 123;
  spec.dim = 24;
  auto fp = make_problem<T>(rng, spec);
  kto::Options o;
  test::set_test_transform(o, transform);
  const auto run = run_fused<T>(fp, o, config_rows<T>(fp, 3, strategy));
  test::compare_fused(fp, test::fused_reference(fp, o), observe(run), o, test::rtol<T>());
}

TEST_CASE("fused-linear step matches the reference for every option combination",
          "[fused][options]") {
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  INFO("seed " << seed);
  KTO_GENERATE_COMBINATION(o);
  auto fp = make_problem<float>(rng, test::FusedSpec{});
  const auto R = test::fused_reference(fp, o);
  const auto cfg = config_rows<float>(fp, 4, FusedStrategy::keep_chunk);
  if (R.step.empty_kl) {
    expect_error([&] { run_fused<float>(fp, o, cfg); }, "kl.count",
                 "be >= 1 with options.reference_point kl_batch", "0");
    return;
  }
  const auto run = run_fused<float>(fp, o, cfg);
  test::compare_fused(fp, R, observe(run), o, 1e-5);
}

TEST_CASE("fused-linear step equals the logits-level step on a larger problem", "[fused]") {
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  INFO("seed " << seed);
  test::FusedSpec spec;
  spec.sequences = 12;
  spec.max_len = 40;
  spec.dim = 48;
  spec.vocab = 2500;
  const auto fp = make_problem<float>(rng, spec);
  kto::Options o;
  o.beta = 0.3;
  const auto run = run_fused<float>(fp, o, config_rows<float>(fp, 64, FusedStrategy::keep_chunk));

  // The logits-level path on Z materialised in float64 and rounded to float.
  const ref::Problem zp = fp.target_problem();
  const ref::Problem kp = fp.kl_problem();
  std::vector<float> z(zp.logits.begin(), zp.logits.end()), kz(kp.logits.begin(), kp.logits.end());
  const auto kl_logits = kto::logits_matrix<const float>(kz.data(), kp.rows, kp.vocab);
  const auto kl_fwd = kto::cpu::sequence_logprobs<float>(
      kl_logits, kto::targets_vector(fp.kl_targets.data(), kp.rows),
      kto::sequences(fp.kl_offsets.data(), static_cast<index_t>(fp.kl_offsets.size()) - 1), o);
  const std::vector<float> ref32(fp.reference_logp.begin(), fp.reference_logp.end());
  const std::vector<float> kl_ref32(fp.kl_reference_logp.begin(), fp.kl_reference_logp.end());
  kto::cpu::StepInputs<float> in;
  in.policy_logits = kto::logits_matrix<const float>(z.data(), zp.rows, zp.vocab);
  in.targets = kto::targets_vector(fp.targets.data(), zp.rows);
  in.sequences = kto::sequences(fp.offsets.data(), static_cast<index_t>(fp.offsets.size()) - 1);
  in.reference_logp = kto::reference_logp(ref32);
  in.desirable = kto::make_span(fp.desirable);
  in.kl.policy_logp = kto::policy_logp(kl_fwd.logp);
  in.kl.reference_logp = kto::reference_logp(kl_ref32);
  in.kl.num_tokens = kto::make_span(kl_fwd.num_tokens);
  std::vector<float> dz(z.size());
  const auto step =
      kto::cpu::kto_step<float>(in, o, kto::logits_matrix<float>(dz.data(), zp.rows, zp.vocab));

  // Same loss, metrics and g_s within fp32 accuracy; dH = dZ W within the rule.
  const double rtol = 1e-5;
  const auto R = test::fused_reference(fp, o);
  KTO_CHECK_CLOSE(run.result.metrics.loss, step.metrics.loss, 1.0, rtol);
  KTO_CHECK_CLOSE(run.result.metrics.kl, step.metrics.kl, R.z0_scale, rtol);
  for (size_t s = 0; s < step.logp.size(); ++s) {
    double scale = 1.0;
    for (index_t r = fp.offsets[s]; r < fp.offsets[s + 1]; ++r)
      if (fp.targets[r] != o.ignore_index)
        scale += std::fabs(R.step.fwd.lse[r]) + std::fabs(R.step.fwd.token_logp[r]);
    KTO_CHECK_CLOSE(run.result.logp[s], step.logp[s], scale, rtol);
  }
  test::compare_fused(fp, R, observe(run), o, rtol);
  // The logits-level gradient mapped back through W agrees with the fused dH.
  index_t bad = 0;
  for (index_t r = 0; r < fp.rows; ++r)
    for (index_t k = 0; k < fp.dim; ++k) {
      double want = 0, scale = 0;
      for (index_t v = 0; v < fp.vocab; ++v) {
        want += double(dz[r * fp.vocab + v]) * double(fp.weight[v * fp.dim + k]);
        scale += std::fabs(double(dz[r * fp.vocab + v]) * double(fp.weight[v * fp.dim + k]));
      }
      const double got = run.d_hidden[r * fp.dim + k];
      if (std::fabs(got - want) > 1e-4 * scale + 1e-9) ++bad;
    }
  CHECK(bad == 0);
}

TEST_CASE("fused-linear gradients match central finite differences", "[fused][fd]") {
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const bool average = GENERATE(false, true);
  const auto link = GENERATE(kto::Link::one_minus_sigmoid, kto::Link::neg_log_sigmoid);
  INFO("seed " << seed << " average " << average << " link " << int(link));
  test::FusedSpec spec;
  spec.sequences = 4;
  spec.max_len = 4;
  spec.dim = 5;
  spec.vocab = 7;
  auto fp = make_problem<double>(rng, spec);
  kto::Options o;
  o.beta = 0.7;
  o.link = link;
  o.average_logprob = average;
  o.undesirable_weight = 1.4;
  const auto cfg = config_rows<double>(fp, 3, FusedStrategy::keep_chunk);
  const auto base = run_fused<double>(fp, o, cfg);
  // z0 is detached: differentiate with the KL batch's z0 held fixed.
  kto::Options fixed = o;
  fixed.reference_point = kto::ReferencePoint::fixed;
  fixed.fixed_z0 = base.result.metrics.kl;
  auto loss_at = [&](const FusedProblem& p) {
    return run_fused<double>(p, fixed, cfg).result.metrics.loss;
  };
  const double h = 1e-6;
  auto fd = [&](std::vector<double> FusedProblem::*member, index_t i) {
    auto plus = fp, minus = fp;
    (plus.*member)[i] += h;
    (minus.*member)[i] -= h;
    return (loss_at(plus) - loss_at(minus)) / (2 * h);
  };
  auto near = [](double got, double want) {
    return std::fabs(got - want) <= 1e-6 * std::max(1.0, std::fabs(want)) + 1e-9;
  };
  for (index_t i = 0; i < fp.rows * fp.dim; ++i) {
    INFO("d_hidden[" << i << "]");
    CHECK(near(base.d_hidden[i], fd(&FusedProblem::hidden, i)));
  }
  for (index_t i = 0; i < fp.vocab * fp.dim; ++i) {
    INFO("d_weight[" << i << "]");
    CHECK(near(base.d_weight[i], fd(&FusedProblem::weight, i)));
  }
  for (index_t i = 0; i < fp.vocab; ++i) {
    INFO("d_bias[" << i << "]");
    CHECK(near(base.d_bias[i], fd(&FusedProblem::bias, i)));
  }
}

TEST_CASE("fused-linear extra memory does not grow with the number of rows", "[fused][memory]") {
  std::mt19937_64 rng(test::fresh_seed());
  test::FusedSpec small, large;
  small.sequences = 2;
  large.sequences = 64;
  large.max_len = 50;
  const auto a = make_problem<Eigen::bfloat16>(rng, small);
  const auto b = make_problem<Eigen::bfloat16>(rng, large);
  const Storage<Eigen::bfloat16> sa(a), sb(b);
  REQUIRE(b.rows > 20 * a.rows);
  for (const bool bf16_gemm : {false, true}) {
    kto::cpu::FusedLinearConfig cfg;
    cfg.chunk_bytes = 8 * sizeof(float) * (37 + 16);  // 8 fp32 rows a chunk
    cfg.bf16_gemm = bf16_gemm;
    const bool gemm = kto::cpu::uses_bf16_gemm<Eigen::bfloat16>(cfg);
    INFO("bf16_gemm " << bf16_gemm << " (in use: " << gemm << ")");
    const size_t bytes_a = kto::cpu::fused_linear_workspace_bytes(sa.head(), cfg);
    const size_t bytes_b = kto::cpu::fused_linear_workspace_bytes(sb.head(), cfg);
    CHECK(bytes_a == bytes_b);
    // The engine holds exactly that: a chunk within the budget, and b in fp32; W in fp32 when
    // widened, none with gemm_bf16 (W read in place).
    const auto rows = kto::cpu::detail::chunk_rows_of(sb.head(), cfg, b.rows);
    kto::cpu::detail::ChunkEngine<Eigen::bfloat16> engine(sb.head(), rows, {}, {}, gemm);
    CHECK(engine.allocated_bytes() == bytes_b);
    if (gemm) {
      CHECK(rows == 6);  // 8·4·53 bytes over 4·53 + 2·16 a row
      CHECK(bytes_b <= cfg.chunk_bytes + sizeof(float) * 37);
    } else {
      CHECK(rows == 8);
      CHECK(bytes_b == cfg.chunk_bytes + sizeof(float) * (37 * 16 + 37));
    }
    // Far below materialising the logits of the large batch.
    CHECK(bytes_b < sizeof(float) * static_cast<size_t>(b.rows * 37) / 4);
  }
}

TEMPLATE_TEST_CASE("fused-linear step reads strided hidden states and weights in place",
                   "[fused][strided]", float, Eigen::bfloat16) {
  // Rows dim + 5 apart with NaN in the padding: the result must be the contiguous run's, bit
  // for bit (every path copies or packs the rows it multiplies, so the layout cannot change a
  // sum), and no NaN may leak in. For bfloat16 both the gemm_bf16 path (W read in place) and
  // the fp32 widening run.
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const auto strategy = GENERATE(FusedStrategy::keep_chunk, FusedStrategy::recompute);
  const bool bf16_gemm = GENERATE(true, false);
  INFO("seed " << seed << " strategy " << int(strategy) << " bf16_gemm " << bf16_gemm);
  test::FusedSpec spec;
  spec.vocab = 77;
  spec.dim = 24;
  const auto fp = make_problem<T>(rng, spec);
  kto::Options o;
  auto cfg = config_rows<T>(fp, 5, strategy);
  cfg.bf16_gemm = bf16_gemm;
  const auto dense = run_fused<T>(fp, o, cfg);
  const auto strided = run_fused<T>(fp, o, cfg, {}, nullptr, {}, 5);
  CHECK(strided.result.metrics.loss == dense.result.metrics.loss);
  CHECK(strided.result.logp == dense.result.logp);
  CHECK(strided.d_hidden == dense.d_hidden);
  CHECK(strided.d_weight == dense.d_weight);
  CHECK(strided.d_bias == dense.d_bias);
  test::compare_fused(fp, test::fused_reference(fp, o), observe(strided), o, test::rtol<T>());
}

TEST_CASE("bf16 heads: gemm_bf16 and the fp32 widening both match the reference and each other",
          "[fused][bf16]") {
  // Both multiply the same bfloat16 values exactly (their products fit in fp32) and sum in fp32,
  // in different orders; the gemm's backward also splits fp32 dZ into bf16 hi + lo (|error| <=
  // 2^-17 of each). So they differ by fp32 rounding over sums of D or rows (<= 2·n·2^-24 of the
  // sum of magnitudes) plus 2^-17: within 2^-12 of the largest entry for these sizes, and each is
  // within the bf16 rule of the float64 reference.
  using BF = Eigen::bfloat16;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const auto strategy = GENERATE(FusedStrategy::keep_chunk, FusedStrategy::recompute);
  INFO("seed " << seed << " strategy " << int(strategy));
  if (!kto::cpu::bf16_gemm_supported())
    WARN(
        "this CPU lacks AVX512-BF16: both runs below widen to fp32 (the bf16 GEMM's own "
        "scalar path is tested in test_gemm_bf16)");
  test::FusedSpec spec;
  spec.sequences = 7;
  spec.vocab = 301;
  spec.dim = 40;
  const auto fp = make_problem<BF>(rng, spec);
  kto::Options o;
  auto cfg = config_rows<BF>(fp, 6, strategy);
  const auto gemm = run_fused<BF>(fp, o, cfg);
  cfg.bf16_gemm = false;
  const auto widened = run_fused<BF>(fp, o, cfg);
  const auto R = test::fused_reference(fp, o);
  test::compare_fused(fp, R, observe(gemm), o, test::rtol<BF>());
  test::compare_fused(fp, R, observe(widened), o, test::rtol<BF>());
  CHECK(std::abs(gemm.result.metrics.loss - widened.result.metrics.loss) <=
        1e-5 * std::abs(widened.result.metrics.loss));
  auto close = [](const std::vector<float>& a, const std::vector<float>& b) {
    float scale = 0.0f, worst = 0.0f;
    for (size_t i = 0; i < a.size(); ++i) {
      scale = std::max(scale, std::abs(b[i]));
      worst = std::max(worst, std::abs(a[i] - b[i]));
    }
    INFO("largest difference " << worst << " of largest entry " << scale);
    CHECK(scale > 0.0f);
    CHECK(worst <= std::ldexp(scale, -12));
  };
  close(gemm.d_hidden, widened.d_hidden);
  close(gemm.d_weight, widened.d_weight);
}

TEST_CASE(
    "fused-linear step is bit-identical run after run and across thread counts; strategies agree",
    "[fused]") {
  std::mt19937_64 rng(test::fresh_seed());
  test::FusedSpec spec;
  spec.sequences = 9;
  spec.vocab = 301;
  const auto fp = make_problem<Eigen::bfloat16>(rng, spec);
  kto::Options o;
  kto::cpu::ExecutionPolicy exec;
  exec.num_threads = 3;
  using BF = Eigen::bfloat16;
  const auto keep = config_rows<BF>(fp, 5, FusedStrategy::keep_chunk);
  const auto a = run_fused<BF>(fp, o, keep, exec);
  const auto b = run_fused<BF>(fp, o, keep, exec);
  auto same = [](const auto& x, const auto& y) {
    return std::memcmp(x.data(), y.data(), x.size() * sizeof(x[0])) == 0;
  };
  CHECK(same(a.d_hidden, b.d_hidden));
  CHECK(same(a.d_weight, b.d_weight));
  CHECK(same(a.d_bias, b.d_bias));
  CHECK(std::memcmp(&a.result.metrics, &b.result.metrics, sizeof(kto::Metrics)) == 0);
  // The thread count splits output rows or vocab columns, never a sum: same bits.
  const auto one = run_fused<BF>(fp, o, keep, kto::cpu::ExecutionPolicy{1});
  CHECK(same(a.d_hidden, one.d_hidden));
  CHECK(same(a.d_weight, one.d_weight));
  CHECK(same(a.d_bias, one.d_bias));
  const auto c = run_fused<BF>(fp, o, config_rows<BF>(fp, 5, FusedStrategy::recompute), exec);
  test::compare_fused(fp, test::fused_reference(fp, o), observe(c), o, 1e-5);
}

TEMPLATE_TEST_CASE("vocab-parallel fused step equals the unsharded one", "[fused][tp]", float,
                   Eigen::bfloat16) {
  using T = TestType;
  using Acc = kto::accumulator_t<T>;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const int ranks = GENERATE(2, 3);
  // The gather inside the step (hooks.gather_partials), or before it, as kto_jax does:
  // each slice's fused_linear_row_partials all-gathered, then hooks.gathered_partials.
  const bool pre_gathered = GENERATE(false, true);
  // z0 from the KL batch (its rows gathered too), or 0 with the KL batch still given: the
  // partials then hold no KL rows, on both sides.
  const bool kl = GENERATE(true, false);
  INFO("seed " << seed << " ranks " << ranks << " pre_gathered " << pre_gathered << " kl " << kl);
  test::FusedSpec spec;
  spec.vocab = 101;
  const auto fp = make_problem<T>(rng, spec);
  kto::Options o;
  o.undesirable_weight = 1.33;
  if (!kl) o.reference_point = kto::ReferencePoint::zero;
  const auto cfg = config_rows<T>(fp, 6, FusedStrategy::keep_chunk);
  const Storage<T> st(fp);
  test::GatherBoard<Acc> board(ranks);
  std::vector<Run<T>> runs(static_cast<size_t>(ranks));
  std::vector<index_t> begins;
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(ranks));
  for (int k = 0; k < ranks; ++k) begins.push_back(fp.vocab * k / ranks);
  begins.push_back(fp.vocab);
  for (int k = 0; k < ranks; ++k) {
    threads.emplace_back([&, k] {
      try {
        kto::LinearHead<T> head = st.head();
        const index_t b = begins[k], n = begins[k + 1] - begins[k];
        head.weight = kto::matrix_view<const T>(st.weight.data() + b * fp.dim, n, fp.dim);
        head.bias = kto::make_span(st.bias.data() + b, n);
        head.vocab_begin = b;
        head.vocab_total = fp.vocab;
        kto::cpu::FusedLinearHooks<Acc> hooks;
        std::vector<kto::RowPartial<Acc>> gathered;
        if (pre_gathered) {
          const auto local = kto::cpu::fused_linear_row_partials<T>(st.inputs(), head, o, cfg,
                                                                    kto::cpu::ExecutionPolicy{1});
          board.gather(k, local, gathered);
          hooks.gathered_partials = {kto::make_span(gathered), ranks};
        } else {
          hooks.gather_partials = [&](const auto& local, auto& all) {
            board.gather(k, local, all);
          };
        }
        runs[k] = run_fused<T>(fp, o, cfg, kto::cpu::ExecutionPolicy{1}, &head, hooks);
      } catch (...) {
        errors[k] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  // Every rank has the same loss and metrics; dW and db are slices; dH sums.
  for (int k = 1; k < ranks; ++k)
    CHECK(std::memcmp(&runs[k].result.metrics, &runs[0].result.metrics, sizeof(kto::Metrics)) == 0);
  FusedObserved obs = observe(runs[0]);
  obs.d_weight.clear();
  obs.d_bias.clear();
  for (int k = 0; k < ranks; ++k) {
    obs.d_weight.insert(obs.d_weight.end(), runs[k].d_weight.begin(), runs[k].d_weight.end());
    obs.d_bias.insert(obs.d_bias.end(), runs[k].d_bias.begin(), runs[k].d_bias.end());
    if (k > 0)
      for (size_t i = 0; i < obs.d_hidden.size(); ++i) obs.d_hidden[i] += runs[k].d_hidden[i];
  }
  test::compare_fused(fp, test::fused_reference(fp, o), obs, o, test::rtol<T>());
}

TEST_CASE("merge_row_partials is the log-sum-exp of the slices", "[fused][tp]") {
  using P = kto::RowPartial<double>;
  const double inf = std::numeric_limits<double>::infinity();
  // Two rows, three ranks: lse values of slices {1, 2, 3} and {−inf, 0, −inf}.
  const std::vector<P> all = {{1.0, 0.0}, {-inf, 0.0}, {2.0, 0.5},
                              {0.0, 0.0}, {3.0, 0.0},  {-inf, 0.0}};
  const auto m = kto::merge_row_partials(all, 3);
  REQUIRE(m.size() == 2);
  CHECK(m[0].lse == Approx(std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0))).epsilon(1e-15));
  CHECK(m[0].target_logit == 0.5);
  CHECK(m[1].lse == 0.0);
  CHECK_THROWS_WITH(kto::merge_row_partials(all, 4),
                    Catch::Contains("gathered.size()") && Catch::Contains("multiple of ranks"));
}

// ------------------------------------------------------------------ errors --

TEST_CASE("fused error: the fixture itself is valid", "[fused][errors]") {
  FusedFixture f;
  CHECK_NOTHROW(f.run());
}

TEST_CASE("fused error: hidden width differs from the weight's", "[fused][errors]") {
  FusedFixture f;
  f.in.hidden.cols = f.fp.dim - 1;
  f.in.hidden.stride = f.fp.dim;
  expect_error([&] { f.run(); }, "hidden.cols", "equal head.weight.cols (16)", "15");
}

TEST_CASE("fused error: KL hidden width differs from the weight's", "[fused][errors]") {
  FusedFixture f;
  f.in.kl.hidden.cols = f.fp.dim + 1;
  f.in.kl.hidden.stride = f.fp.dim + 1;
  expect_error([&] { f.run(); }, "kl.hidden.cols", "equal head.weight.cols (16)", "17");
}

TEST_CASE("fused error: hidden stride below its width", "[fused][errors]") {
  FusedFixture f;
  f.in.hidden.stride = f.fp.dim - 2;
  expect_error([&] { f.run(); }, "hidden.stride", "be >= cols (16)", "14");
}

TEST_CASE("fused error: null hidden data", "[fused][errors]") {
  FusedFixture f;
  f.in.hidden.data = nullptr;
  expect_error([&] { f.run(); }, "hidden.data", "be non-null when there are rows", "nullptr");
}

TEST_CASE("fused error: empty weight", "[fused][errors]") {
  FusedFixture f;
  f.head.weight.rows = 0;
  expect_error([&] { f.run(); }, "head.weight.rows", "be >= 1", "0");
}

TEST_CASE("fused error: vocabulary slice outside the vocabulary", "[fused][errors]") {
  FusedFixture f;
  f.head.vocab_begin = 5;
  f.head.vocab_total = 40;
  expect_error([&] { f.run(); }, "head.vocab_begin", "inside [0, 40) with its 37 rows", "5");
}

TEST_CASE("fused error: negative total vocabulary", "[fused][errors]") {
  FusedFixture f;
  f.head.vocab_total = -1;
  expect_error([&] { f.run(); }, "head.vocab_total", "be 0 (not sharded) or >= head.weight.rows",
               "-1");
}

TEST_CASE("fused error: target id outside the whole vocabulary", "[fused][errors]") {
  FusedFixture f;
  const index_t r = f.fp.offsets[0];
  f.fp.targets[r] = 37;
  f.restore();
  expect_error([&] { f.run(); }, "targets[" + std::to_string(r) + "]", "be in [0, 37)", "37");
}

TEST_CASE("fused error: d_hidden of the wrong shape", "[fused][errors]") {
  FusedFixture f;
  f.grads.d_hidden.rows -= 1;
  expect_error([&] { f.run(); }, "grads.d_hidden", "have the shape of hidden",
               std::to_string(f.fp.rows - 1) + " x 16");
}

TEST_CASE("fused error: d_weight of the wrong shape", "[fused][errors]") {
  FusedFixture f;
  f.grads.d_weight.rows = 36;
  expect_error([&] { f.run(); }, "grads.d_weight", "have the shape of head.weight (37 x 16)",
               "36 x 16");
}

/// The fixture's head as the slice of its first 20 rows of 37 (and its dW and db with it).
static void slice_first_rows(FusedFixture& f) {
  f.head.weight.rows = 20;
  f.head.bias.size = 20;
  f.head.vocab_total = 37;
  f.grads.d_weight.rows = 20;
  f.grads.d_bias.size = 20;
}

TEST_CASE("fused error: a sharded head without a gather hook", "[fused][errors]") {
  FusedFixture f;
  slice_first_rows(f);
  expect_error([&] { f.run(); }, "hooks.gather_partials",
               "be set (or hooks.gathered_partials given) when head.weight holds a vocabulary "
               "slice (20 of 37 rows)",
               "an empty function");
}

TEST_CASE("fused error: gathered partials with a gather hook, or for a whole head",
          "[fused][errors]") {
  FusedFixture f;
  const auto n = f.fp.rows + f.fp.kl_rows;
  std::vector<kto::RowPartial<float>> gathered(static_cast<size_t>(2 * n));
  f.hooks.gathered_partials = {kto::make_span(gathered), 2};
  expect_error([&] { f.run(); }, "hooks.gathered_partials",
               "be empty when head.weight holds the whole vocabulary", std::to_string(2 * n));
  slice_first_rows(f);
  f.hooks.gather_partials = [](const auto& local, auto& all) { all = local; };
  expect_error([&] { f.run(); }, "hooks.gathered_partials",
               "be empty when hooks.gather_partials is set (one or the other)",
               std::to_string(2 * n));
}

/// Rank 0 of two slices of the fixture's head, with the partials gathered ahead from
/// kto::cpu::fused_linear_row_partials (the fixture's inputs and options).
struct TwoSlices {
  FusedFixture f;
  std::vector<kto::RowPartial<float>> gathered;
  TwoSlices() {
    const index_t V = f.head.weight.rows, half = V / 2;
    auto slice = [&](index_t begin, index_t rows) {
      kto::LinearHead<float> h = f.head;
      h.weight.data += begin * h.weight.stride;
      h.weight.rows = rows;
      h.bias = kto::make_span(h.bias.data ? h.bias.data + begin : nullptr, h.bias.data ? rows : 0);
      h.vocab_begin = begin;
      h.vocab_total = V;
      return h;
    };
    gathered = kto::cpu::fused_linear_row_partials<float>(f.in, slice(0, half), f.o);
    const auto other = kto::cpu::fused_linear_row_partials<float>(f.in, slice(half, V - half), f.o);
    gathered.insert(gathered.end(), other.begin(), other.end());
    f.head = slice(0, half);
    f.grads.d_weight.rows = half;
    f.grads.d_bias.size = f.grads.d_bias.size ? half : 0;
    f.hooks.gathered_partials = {kto::make_span(gathered), 2};
  }
  kto::cpu::StepResult<float> run() {
    return kto::cpu::fused_linear_kto_step<float>(f.in, f.head, f.o, f.grads, {}, {}, f.hooks);
  }
};

/// The first scored row of a batch and its sequence.
static std::pair<index_t, index_t> first_scored(const std::vector<index_t>& targets,
                                                const std::vector<index_t>& offsets,
                                                index_t ignore_index) {
  for (index_t s = 0; s + 1 < static_cast<index_t>(offsets.size()); ++s)
    for (index_t r = offsets[s]; r < offsets[s + 1]; ++r)
      if (targets[r] != ignore_index) return {r, s};
  return {-1, -1};
}

TEST_CASE("vocab parallel: the step reads the gathered partials it is given", "[fused][tp]") {
  // One scored row's target logit moved by +1 in rank 0's partials: a target row moves its
  // sequence's log-prob (a sum) by +1 and no other, z0 unchanged; a KL row moves z0 and no
  // target log-prob. So the step reads each row where the layout puts it.
  TwoSlices t;
  REQUIRE(kto::uses_kl_batch(t.f.o));  // the KL batch's rows come first
  REQUIRE(!t.f.o.average_logprob);
  const auto base = t.run();
  const index_t kl_rows = t.f.fp.kl_rows;
  const auto [row, sequence] = first_scored(t.f.fp.targets, t.f.fp.offsets, t.f.o.ignore_index);
  REQUIRE(row >= 0);
  t.gathered[static_cast<size_t>(kl_rows + row)].target_logit += 1.0f;
  const auto moved = t.run();
  CHECK(moved.metrics.kl == base.metrics.kl);
  for (index_t s = 0; s < static_cast<index_t>(base.logp.size()); ++s) {
    INFO("sequence " << s << " (moved: " << sequence << ")");
    const double delta = double(moved.logp[s]) - double(base.logp[s]);
    CHECK(std::fabs(delta - (s == sequence ? 1.0 : 0.0)) <= 1e-4 * (1 + std::fabs(base.logp[s])));
  }
  t.gathered[static_cast<size_t>(kl_rows + row)].target_logit -= 1.0f;
  const auto kl_row = first_scored(t.f.fp.kl_targets, t.f.fp.kl_offsets, t.f.o.ignore_index).first;
  REQUIRE(kl_row >= 0);
  t.gathered[static_cast<size_t>(kl_row)].target_logit += 1.0f;
  const auto kl_moved = t.run();
  CHECK(kl_moved.metrics.kl != base.metrics.kl);
  CHECK(kl_moved.logp == base.logp);
}

TEST_CASE("fused error: gathered partials of another layout, count or rank number",
          "[fused][errors]") {
  // The KL rows gathered while the step takes z0 without its KL batch (kto_jax's pattern
  // done wrong): 2 x (KL rows + rows) is no longer read as more ranks.
  {
    TwoSlices t;
    t.f.in.kl = {};
    t.f.in.kl.hidden.cols = t.f.fp.dim;
    t.f.hooks.kl_all_reduce = [](kto::KlPartial&) {};
    const auto n = t.f.fp.rows;
    expect_error([&] { t.run(); }, "hooks.gathered_partials.partials.size",
                 "be ranks x " + std::to_string(n), std::to_string(2 * (n + t.f.fp.kl_rows)));
  }
  FusedFixture f;
  slice_first_rows(f);
  const auto n = f.fp.rows + f.fp.kl_rows;
  std::vector<kto::RowPartial<float>> gathered(static_cast<size_t>(3 * n));
  for (const index_t size : {2 * n - 1, 2 * n + 1, 3 * n}) {
    f.hooks.gathered_partials = {kto::make_span(gathered.data(), size), 2};
    expect_error([&] { f.run(); }, "hooks.gathered_partials.partials.size",
                 "be ranks x " + std::to_string(n), std::to_string(size));
  }
  // One slice's partials alone would give a loss over its part of the vocabulary.
  for (const index_t ranks : {index_t{1}, index_t{38}}) {
    f.hooks.gathered_partials = {kto::make_span(gathered.data(), ranks * n), ranks};
    expect_error([&] { f.run(); }, "hooks.gathered_partials.ranks",
                 "be in [2, min(head.vocab_total, 65536)]", std::to_string(ranks));
  }
  f.hooks.gathered_partials = {};
  f.hooks.gather_partials = [](const auto& local, auto& all) { all = local; };
  expect_error([&] { f.run(); }, "hooks.gather_partials",
               "return ranks x " + std::to_string(n) + " partials", std::to_string(n));
}

TEST_CASE("fused error: a gather hook that returns the wrong count", "[fused][errors]") {
  FusedFixture f;
  slice_first_rows(f);
  f.hooks.gather_partials = [](const auto& local, auto& all) {
    all = local;
    all.pop_back();
  };
  const auto n = f.fp.rows + f.fp.kl_rows;
  expect_error([&] { f.run(); }, "hooks.gather_partials",
               "return ranks x " + std::to_string(n) + " partials", std::to_string(n - 1));
}

TEST_CASE("fused error: reference_logp of the wrong size", "[fused][errors]") {
  FusedFixture f;
  f.in.reference_logp.size -= 1;
  expect_error([&] { f.run(); }, "reference_logp.size", "be 5", "4");
}

TEST_CASE("fused error: KL reference_logp of the wrong size", "[fused][errors]") {
  FusedFixture f;
  f.in.kl.reference_logp.size += 1;
  expect_error([&] { f.run(); }, "kl.reference_logp.size", "be 4", "5");
}

TEST_CASE("fused error: a NaN hidden state names its sequence and row", "[fused][errors]") {
  FusedFixture f;
  const index_t s = 3, r = f.fp.offsets[s];
  REQUIRE(f.fp.offsets[s + 1] > r);
  for (index_t q = r; q < f.fp.offsets[s + 1]; ++q) f.fp.targets[q] = 1;
  f.fp.hidden[r * f.fp.dim + 2] = std::numeric_limits<float>::quiet_NaN();
  f.restore();
  const auto strategy = GENERATE(FusedStrategy::keep_chunk, FusedStrategy::recompute);
  kto::cpu::FusedLinearConfig cfg;
  cfg.strategy = strategy;
  try {
    kto::cpu::fused_linear_kto_step<float>(f.in, f.head, f.o, f.grads, cfg);
    FAIL("no NonFiniteLogitsError");
  } catch (const kto::NonFiniteLogitsError& e) {
    INFO(e.what());
    CHECK(e.sequence() == s);
    CHECK(e.row() == r);
    CHECK(e.argument() == "hidden");
  }
}

TEST_CASE("fused error: a NaN weight in the KL batch's forward is reported there",
          "[fused][errors]") {
  FusedFixture f;
  f.fp.kl_hidden[f.fp.kl_offsets[0] * f.fp.dim] = std::numeric_limits<float>::infinity();
  f.fp.kl_targets[f.fp.kl_offsets[0]] = 0;
  f.restore();
  try {
    f.run();
    FAIL("no NonFiniteLogitsError");
  } catch (const kto::NonFiniteLogitsError& e) {
    INFO(e.what());
    CHECK(e.argument() == "kl.hidden");
    CHECK(e.row() == f.fp.kl_offsets[0]);
  }
}

TEST_CASE("fused-linear logprobs equal the reference forward", "[fused]") {
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const bool average = GENERATE(false, true);
  INFO("seed " << seed << " average " << average);
  const auto fp = make_problem<Eigen::bfloat16>(rng, test::FusedSpec{});
  const Storage<Eigen::bfloat16> st(fp);
  const auto in = st.inputs();
  kto::Options o;
  o.average_logprob = average;
  kto::cpu::FusedLinearConfig cfg = config_rows<Eigen::bfloat16>(fp, 3, FusedStrategy::keep_chunk);
  const auto got =
      kto::cpu::fused_linear_logprobs(in.hidden, in.targets, in.sequences, st.head(), o, cfg);
  const ref::Forward want = ref::forward(fp.target_problem(), o.ignore_index, average);
  for (size_t s = 0; s < want.logp.size(); ++s) {
    double scale = 1.0;
    for (index_t r = fp.offsets[s]; r < fp.offsets[s + 1]; ++r)
      if (fp.targets[r] != o.ignore_index)
        scale += std::fabs(want.lse[r]) + std::fabs(want.token_logp[r]);
    if (average && want.num_tokens[s] > 0) scale /= double(want.num_tokens[s]);
    CHECK(got.num_tokens[s] == want.num_tokens[s]);
    KTO_CHECK_CLOSE(got.logp[s], want.logp[s], scale, 1e-5);
  }
}

TEST_CASE("fused_linear_row_partials: a vocabulary slice's lse and target logit of every row",
          "[fused][vocab_parallel]") {
  // Two slices of a V = 9 head; each slice's partials against float64 logits of its rows
  // (KL rows first, then target rows, as the step's gather hook receives them), and the
  // merge of the two slices against the whole row (rtol 1e-5 of the row's largest |z|).
  using kto::index_t;
  const index_t N = 5, KN = 3, D = 4, V = 9, half = 5;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<float> h(N * D), kh(KN * D), w(V * D);
  for (auto* v : {&h, &kh, &w})
    for (auto& x : *v) x = static_cast<float>(nd(rng));
  std::vector<index_t> t = {1, -100, 8, 4, 0}, kt = {2, 6, -100}, off = {0, 2, 5}, koff = {0, 3};
  kto::cpu::FusedLinearInputs<float> in;
  in.hidden = kto::matrix_view<const float>(h.data(), N, D);
  in.targets = kto::targets_vector(t.data(), N);
  in.sequences = kto::sequences(off.data(), 2);
  in.kl.hidden = kto::matrix_view<const float>(kh.data(), KN, D);
  in.kl.targets = kto::targets_vector(kt.data(), KN);
  in.kl.sequences = kto::sequences(koff.data(), 1);
  std::vector<std::vector<kto::RowPartial<float>>> slices;
  for (const auto& [begin, rows] : {std::pair<index_t, index_t>{0, half}, {half, V - half}}) {
    kto::LinearHead<float> head{
        kto::matrix_view<const float>(w.data() + begin * D, rows, D), {}, begin, V};
    slices.push_back(kto::cpu::fused_linear_row_partials<float>(in, head, kto::Options{}));
  }
  const auto merged = kto::merge_row_partials(
      [&] {
        auto all = slices[0];
        all.insert(all.end(), slices[1].begin(), slices[1].end());
        return all;
      }(),
      2);
  REQUIRE(merged.size() == static_cast<size_t>(KN + N));
  for (index_t r = 0; r < KN + N; ++r) {
    const bool kl_row = r < KN;
    const float* x = kl_row ? kh.data() + r * D : h.data() + (r - KN) * D;
    const index_t target = kl_row ? kt[r] : t[r - KN];
    INFO("row " << r);
    if (target == -100) {  // each slice's partial is the documented {0, 0}
      for (const auto& slice : slices)
        CHECK((slice[r].lse == 0.0f && slice[r].target_logit == 0.0f));
      continue;
    }
    std::vector<double> z(V);
    double m = -INFINITY, zmax = 0;
    for (index_t v = 0; v < V; ++v) {
      for (index_t d = 0; d < D; ++d) z[v] += double(x[d]) * w[v * D + d];
      m = std::max(m, z[v]);
      zmax = std::max(zmax, std::fabs(z[v]));
    }
    double s = 0;
    for (double v : z) s += std::exp(v - m);
    KTO_CHECK_CLOSE(merged[r].lse, m + std::log(s), 1 + zmax, 1e-5);
    KTO_CHECK_CLOSE(merged[r].target_logit, z[target], 1 + zmax, 1e-5);
  }
}

TEST_CASE("chunk buffers: kept by the calling thread, reused, never shared by nested users",
          "[fused][scratch]") {
  using kto::cpu::detail::ScratchArray;
  using kto::cpu::detail::Slot;
  kto::cpu::release_scratch();
  const float* first = nullptr;
  {
    ScratchArray<float> a(Slot::logits, 1000);
    first = a.data();
    REQUIRE(first != nullptr);
    CHECK(reinterpret_cast<std::uintptr_t>(first) % kto::cpu::detail::kScratchAlignment == 0);
    // A nested user of the same role gets memory of its own.
    ScratchArray<float> nested(Slot::logits, 10);
    CHECK(nested.data() != first);
    nested.data()[9] = 1.0f;
  }
  {
    ScratchArray<float> again(Slot::logits, 500);  // smaller: the same buffer
    CHECK(again.data() == first);
    ScratchArray<float> other(Slot::hidden, 500);  // another role: another buffer
    CHECK(other.data() != first);
  }
  // Another thread has buffers of its own: this thread's block is untouched by it.
  const auto* blocks = kto::cpu::detail::scratch_blocks();
  const auto logits = static_cast<int>(Slot::logits);
  std::thread([&] {
    ScratchArray<float> t(Slot::logits, 5000);
    CHECK(t.data() != first);
  }).join();
  CHECK(blocks[logits].capacity == 1000 * sizeof(float));
  // Slot::none: the array's own buffer, nothing kept.
  { ScratchArray<float> own(Slot::none, 10); }
  {
    ScratchArray<float> in_use(Slot::hidden, 10);
    kto::cpu::release_scratch();  // frees what is kept and idle, not what is in use
    CHECK(blocks[logits].capacity == 0);
    CHECK(blocks[static_cast<int>(Slot::hidden)].capacity >= 10 * sizeof(float));
  }
  // A size that cannot be held is refused, not wrapped around (bytes, or bytes rounded up).
  CHECK_THROWS_AS(ScratchArray<float>(Slot::logits, static_cast<size_t>(-1) / 4),
                  std::length_error);
  CHECK_THROWS_AS(ScratchArray<double>(Slot::logits, static_cast<size_t>(-1) / 4),
                  std::length_error);
  CHECK(blocks[logits].capacity == 0);
}

TEST_CASE("chunk buffers: back-to-back fused steps give the same bits", "[fused][scratch]") {
  // The second call reuses the first call's (uninitialised, dirty) buffers.
  std::mt19937_64 rng(test::fresh_seed());
  test::FusedSpec spec;
  spec.vocab = 123;
  const auto fp = make_problem<Eigen::bfloat16>(rng, spec);
  kto::Options o;
  const auto cfg = config_rows<Eigen::bfloat16>(fp, 5, FusedStrategy::keep_chunk);
  kto::cpu::release_scratch();
  const auto a = run_fused<Eigen::bfloat16>(fp, o, cfg);
  // Poison what the first call left in the kept buffers: a stale read would show.
  auto* blocks = kto::cpu::detail::scratch_blocks();
  for (int i = 0; i < static_cast<int>(kto::cpu::detail::Slot::count); ++i)
    if (blocks[i].capacity) std::memset(blocks[i].memory.get(), 0xFF, blocks[i].capacity);
  const auto b = run_fused<Eigen::bfloat16>(fp, o, cfg);
  CHECK(std::memcmp(a.d_weight.data(), b.d_weight.data(), a.d_weight.size() * 4) == 0);
  CHECK(std::memcmp(a.d_hidden.data(), b.d_hidden.data(), a.d_hidden.size() * 4) == 0);
  CHECK(std::memcmp(&a.result.metrics, &b.result.metrics, sizeof(kto::Metrics)) == 0);
}
