// Properties of the KTO loss worth a test each (docs/math.md), finite-difference
// gradients, determinism across thread counts and the data-parallel split.
#include "check_step.hpp"

using test::Layout;

TEST_CASE("seed worked example: sigma(0.13), desirable and undesirable losses", "[scalar]") {
  kto::Options o;
  o.beta = 1.0;
  o.desirable_weight = 1.0;
  o.undesirable_weight = 1.33;
  CHECK(kto::sigmoid(0.13) == Approx(0.53245).margin(5e-6));
  // ρ − z0 = 0.13 with z0 = 0.
  const auto d = kto::example_terms(0.13, true, 0.0, o, 1.0);
  CHECK(d.loss == Approx(0.46755).margin(5e-6));
  // The same pair labelled undesirable: 1.33 · (1 − σ(−0.13)).
  const auto u = kto::example_terms(0.13, false, 0.0, o, 1.0);
  CHECK(u.loss == Approx(0.70816).margin(5e-6));
  // Same numbers with z0 ≠ 0: only ρ − z0 matters.
  CHECK(kto::example_terms(0.63, true, 0.5, o, 1.0).loss == Approx(d.loss).epsilon(1e-12));
}

TEST_CASE("scalar math is stable for |beta (rho - z0)| up to 1e4", "[scalar]") {
  for (double u : {-1e4, -700.0, -40.0, -1e-9, 0.0, 1e-9, 40.0, 700.0, 1e4}) {
    INFO("u = " << u);
    const double s = kto::sigmoid(u);
    CHECK(std::isfinite(s));
    CHECK(s >= 0.0);
    CHECK(s <= 1.0);
    CHECK(std::isfinite(kto::neg_log_sigmoid(u)));
    CHECK(std::isfinite(kto::sigmoid_derivative(u)));
    CHECK(kto::sigmoid(u) + kto::sigmoid(-u) == Approx(1.0).epsilon(1e-15));
    const float sf = kto::sigmoid(static_cast<float>(u));
    CHECK(std::isfinite(sf));
  }
  CHECK(kto::neg_log_sigmoid(-1e4) == 1e4);
  CHECK(kto::neg_log_sigmoid(1e4) == 0.0);
  CHECK(kto::neg_log_sigmoid(-1e4f) == 1e4f);
  CHECK(kto::sigmoid_derivative(1e4) == 0.0);
  kto::Options o;
  o.beta = 1.0;
  for (auto link : {kto::Link::one_minus_sigmoid, kto::Link::neg_log_sigmoid})
    for (double rho : {-1e4, 1e4})
      for (bool d : {true, false}) {
        o.link = link;
        const auto t = kto::example_terms(rho, d, 0.0, o, 1.0);
        CHECK(std::isfinite(t.loss));
        CHECK(std::isfinite(t.grad_logp));
      }
}

TEST_CASE("saturation: an undesirable example far above z0 costs lambda_U and has no gradient",
          "[properties]") {
  kto::Options o;
  o.beta = 0.1;
  o.undesirable_weight = 1.33;
  const auto t = kto::example_terms(/*rho=*/5e4, /*desirable=*/false, /*z0=*/0.2, o, 1.0);
  CHECK(t.loss == Approx(1.33).epsilon(1e-15));
  CHECK(t.grad_logp == 0.0);
  // The same in a full step: reference log-prob far below the policy's.
  std::mt19937_64 rng(test::fresh_seed());
  auto c = test::make_step_case<double>(rng, Layout::padded, {}, o, /*labels=*/0);
  for (auto& r : c.ref_logp) r -= 1e5;
  std::vector<double> g = c.st.poisoned_like();
  const auto res = kto::cpu::kto_step<double>(test::step_inputs(c), o, c.st.view_over(g));
  for (double gs : res.examples.grad_logp) CHECK(gs == 0.0);
  CHECK(res.metrics.loss == Approx(1.33).epsilon(1e-12));
  for (kto::index_t r = 0; r < c.st.problem.rows; ++r)
    for (kto::index_t v = 0; v < c.st.problem.vocab; ++v) CHECK(test::grad_at(c.st, g, r, v) == 0);
}

TEST_CASE("contradiction: one sequence labelled both ways with lambda_D = lambda_U cancels exactly",
          "[properties]") {
  const kto::index_t V = 29, T = 4;
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<float> n(0.f, 2.f);
  std::vector<float> Z(2 * T * V);
  for (kto::index_t i = 0; i < T * V; ++i) Z[i] = Z[T * V + i] = n(rng);
  std::vector<kto::index_t> tg = {3, 7, -100, 11, 3, 7, -100, 11};
  const auto off = kto::padded_offsets(2, T);
  std::vector<float> ref = {-30.f, -30.f};
  std::vector<uint8_t> des = {1, 0};
  std::vector<float> klp = {-12.f, -9.f}, klr = {-12.5f, -9.4f};
  kto::Options o;
  o.desirable_weight = o.undesirable_weight = 1.2;
  kto::cpu::StepInputs<float> in{kto::logits_matrix<const float>(Z.data(), 2 * T, V),
                                 kto::targets_vector(tg.data(), 2 * T),
                                 kto::sequences(off.data(), 2),
                                 kto::reference_logp(ref),
                                 kto::make_span(des),
                                 {kto::policy_logp(klp), kto::reference_logp(klr), {}}};
  std::vector<float> G(Z.size());
  const auto r = kto::cpu::kto_step<float>(in, o, kto::logits_matrix<float>(G.data(), 2 * T, V));
  CHECK(r.metrics.kl > 0.0);
  CHECK(r.examples.grad_logp[0] != 0.0f);
  CHECK(r.examples.grad_logp[0] + r.examples.grad_logp[1] == 0.0f);
  for (kto::index_t i = 0; i < T * V; ++i) {
    INFO("element " << i);
    CHECK(G[i] + G[T * V + i] == 0.0f);
  }
}

TEST_CASE("KL detachment: the gradient treats z0 as a constant", "[properties]") {
  std::mt19937_64 rng(test::fresh_seed());
  kto::Options o;
  o.beta = 0.3;
  auto c = test::make_step_case<double>(rng, Layout::packed, {}, o);
  for (size_t j = 0; j < c.kl_policy.size(); ++j) c.kl_reference[j] = c.kl_policy[j] - 1.0;
  std::vector<double> g1 = c.st.poisoned_like(), g2 = c.st.poisoned_like();
  const auto a = kto::cpu::kto_step<double>(test::step_inputs(c), o, c.st.view_over(g1));
  REQUIRE(a.metrics.kl > 0.0);
  kto::Options fixed = o;
  fixed.reference_point = kto::ReferencePoint::fixed;
  fixed.fixed_z0 = a.metrics.kl;
  const auto b = kto::cpu::kto_step<double>(test::step_inputs(c), fixed, c.st.view_over(g2));
  CHECK(a.metrics.loss == b.metrics.loss);
  CHECK(std::memcmp(g1.data(), g2.data(), g1.size() * sizeof(double)) == 0);
  // Moving the KL batch moves z0 and the loss but never needs a KL gradient:
  // the step has no output for KL logits, and the target gradient changes only via z0.
  auto c2 = c;
  for (auto& x : c2.kl_policy) x += 0.5;
  std::vector<double> g3 = c.st.poisoned_like();
  const auto d = kto::cpu::kto_step<double>(test::step_inputs(c2), o, c.st.view_over(g3));
  CHECK(d.metrics.kl == Approx(a.metrics.kl + 0.5).epsilon(1e-12));
}

TEST_CASE("finite differences agree with the analytic logit gradient", "[gradient]") {
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const auto link = GENERATE(kto::Link::one_minus_sigmoid, kto::Link::neg_log_sigmoid);
  const bool average = GENERATE(false, true);
  const auto loss_type = GENERATE(kto::LossType::kto, kto::LossType::apo_zero_unpaired);
  INFO("seed " << seed << " link " << int(link) << " average " << average);
  kto::Options o;
  o.beta = 0.7;
  o.link = link;
  o.average_logprob = average;
  o.loss_type = loss_type;
  o.desirable_weight = 1.3;
  o.undesirable_weight = 0.8;
  test::ShapeSpec spec;
  spec.vocab = 11;
  spec.sequences = 4;
  spec.max_len = 3;
  spec.logit_scale = 1.0;
  auto c = test::make_step_case<double>(rng, Layout::packed, spec, o);
  std::vector<double> g = c.st.poisoned_like();
  const auto base = kto::cpu::kto_step<double>(test::step_inputs(c), o, c.st.view_over(g));
  (void)base;
  auto loss_at = [&](const std::vector<double>& buffer) {
    auto cc = c;
    cc.st.buffer = buffer;
    cc.st.logits.data = cc.st.buffer.data();
    std::vector<double> scratch = cc.st.poisoned_like();
    return kto::cpu::kto_step<double>(test::step_inputs(cc), o, cc.st.view_over(scratch))
        .metrics.loss;
  };
  const double h = 1e-5;
  for (kto::index_t r = 0; r < c.st.problem.rows; ++r)
    for (kto::index_t v = 0; v < spec.vocab; ++v) {
      const auto at = static_cast<size_t>(c.st.logits.rows.offset(r) + v);
      std::vector<double> plus = c.st.buffer, minus = c.st.buffer;
      plus[at] += h;
      minus[at] -= h;
      const double fd = (loss_at(plus) - loss_at(minus)) / (2 * h);
      INFO("row " << r << " col " << v);
      // Central differences: O(h²) truncation + O(eps/h) rounding.
      CHECK(g[at] == Approx(fd).margin(1e-8));
    }
}

TEST_CASE("outputs are bit-identical for any thread count", "[determinism]") {
  std::mt19937_64 rng(test::fresh_seed());
  kto::Options o;
  test::ShapeSpec spec;
  spec.vocab = 3001;
  spec.sequences = 9;
  spec.max_len = 7;
  const auto c = test::make_step_case<Eigen::bfloat16>(rng, Layout::packed, spec, o);
  auto run = [&](int threads) {
    std::vector<Eigen::bfloat16> g = c.st.poisoned_like();
    kto::cpu::ExecutionPolicy exec;
    exec.num_threads = threads;
    exec.min_rows_per_thread = 1;
    auto r = kto::cpu::kto_step<Eigen::bfloat16>(test::step_inputs(c), o, c.st.view_over(g), exec);
    return std::make_pair(r, g);
  };
  const auto one = run(1);
  for (int threads : {2, 3, 7, 16}) {
    INFO("threads " << threads);
    const auto many = run(threads);
    CHECK(std::memcmp(&one.first.metrics, &many.first.metrics, sizeof(kto::Metrics)) == 0);
    CHECK(one.first.logp == many.first.logp);
    CHECK(one.first.examples.grad_logp == many.first.examples.grad_logp);
    CHECK(std::memcmp(one.second.data(), many.second.data(),
                      one.second.size() * sizeof(Eigen::bfloat16)) == 0);
  }
  // And run after run.
  const auto again = run(2);
  CHECK(std::memcmp(one.second.data(), again.second.data(),
                    one.second.size() * sizeof(Eigen::bfloat16)) == 0);
}

TEST_CASE("data parallel: two ranks with one all-reduce equal one process", "[distributed]") {
  std::mt19937_64 rng(test::fresh_seed());
  kto::Options o;
  o.kl_estimator = GENERATE(kto::KlEstimator::mean, kto::KlEstimator::nonempty_mean);
  test::ShapeSpec spec;
  spec.sequences = 6;
  spec.vocab = 50;
  const auto whole = test::make_step_case<double>(rng, Layout::padded, spec, o);
  std::vector<double> g_whole = whole.st.poisoned_like();
  const auto single =
      kto::cpu::kto_step<double>(test::step_inputs(whole), o, whole.st.view_over(g_whole));

  // Rank k holds target sequences [3k, 3k+3) and KL examples of the same parity.
  const kto::index_t T = spec.max_len, V = spec.vocab;
  std::vector<kto::KlPartial> partials(2);
  std::vector<test::StepCase<double>> ranks(2);
  for (int k = 0; k < 2; ++k) {
    auto& rc = ranks[k];
    rc.st.buffer.assign(whole.st.buffer.begin() + 3 * k * T * V,
                        whole.st.buffer.begin() + 3 * (k + 1) * T * V);
    rc.st.target_buffer.assign(whole.st.target_buffer.begin() + 3 * k * T,
                               whole.st.target_buffer.begin() + 3 * (k + 1) * T);
    rc.st.logits = kto::logits_matrix<const double>(rc.st.buffer.data(), 3 * T, V);
    rc.st.targets = kto::targets_vector(rc.st.target_buffer.data(), 3 * T);
    rc.st.offsets = kto::padded_offsets(3, T);
    rc.ref_logp.assign(whole.ref_logp.begin() + 3 * k, whole.ref_logp.begin() + 3 * k + 3);
    rc.desirable.assign(whole.desirable.begin() + 3 * k, whole.desirable.begin() + 3 * k + 3);
    for (size_t j = k; j < whole.kl_policy.size(); j += 2) {
      rc.kl_policy.push_back(whole.kl_policy[j]);
      rc.kl_reference.push_back(whole.kl_reference[j]);
      rc.kl_tokens.push_back(whole.kl_tokens[j]);
    }
    partials[k] = kto::kl_partial<double>(kto::policy_logp(rc.kl_policy),
                                          kto::reference_logp(rc.kl_reference),
                                          kto::make_span(rc.kl_tokens), o);
  }
  // The all-reduce every rank performs: sum of the two doubles.
  const kto::KlPartial global = kto::merge(partials[0], partials[1]);
  kto::Options dp = o;
  dp.mean_denominator = 6;  // gradients are summed across ranks, not averaged
  double loss = 0;
  for (int k = 0; k < 2; ++k) {
    auto& rc = ranks[k];
    std::vector<double> g(rc.st.buffer.size(), NAN);
    const auto res = kto::cpu::kto_step<double>(test::step_inputs(rc), dp,
                                                kto::logits_matrix<double>(g.data(), 3 * T, V), {},
                                                [&](kto::KlPartial& p) { p = global; });
    loss += res.metrics.loss;
    CHECK(res.metrics.kl == Approx(single.metrics.kl).epsilon(1e-14));
    for (size_t i = 0; i < g.size(); ++i)
      CHECK(g[i] == Approx(g_whole[3 * k * T * V + i]).epsilon(1e-12).margin(1e-300));
  }
  CHECK(loss == Approx(single.metrics.loss).epsilon(1e-13));
}

TEST_CASE("non-finite logits are reported with their sequence and row", "[errors][nonfinite]") {
  const kto::index_t V = 5000, rows = 6;  // more than one chunk per row
  std::vector<float> Z(rows * V, 0.25f);
  std::vector<kto::index_t> tg = {1, 2, 3, 4, 5, 6};
  std::vector<kto::index_t> off = {0, 2, 4, 6};
  const auto seqs = kto::sequences(off.data(), 3);
  const float bad_values[] = {NAN, INFINITY};
  for (float bad : bad_values)
    for (kto::index_t col : {kto::index_t{0}, kto::index_t{4999}, kto::index_t{2048}}) {
      std::vector<float> z = Z;
      z[3 * V + col] = bad;  // sequence 1, row 3
      INFO("value " << bad << " col " << col);
      try {
        kto::cpu::sequence_logprobs<float>(kto::logits_matrix<const float>(z.data(), rows, V),
                                           kto::targets_vector(tg.data(), rows), seqs, {});
        FAIL("no exception");
      } catch (const kto::NonFiniteLogitsError& e) {
        CHECK(e.sequence() == 1);
        CHECK(e.row() == 3);
        CHECK(std::string(e.what()).find("sequence 1, row 3") != std::string::npos);
      }
    }
  // A row of only NaN, and NaNs hidden in an otherwise −inf chunk: the max of
  // such a chunk may come out −inf, and the NaN must still be reported.
  for (int variant = 0; variant < 3; ++variant) {
    std::vector<float> z = Z;
    if (variant == 0) std::fill(z.begin() + 2 * V, z.begin() + 3 * V, NAN);
    if (variant == 1) {
      std::fill(z.begin() + 2 * V, z.begin() + 2 * V + 2048, -INFINITY);
      z[2 * V + 100] = NAN;
    }
    if (variant == 2) {
      std::fill(z.begin() + 2 * V + 2048, z.begin() + 2 * V + 4096, NAN);
      z[2 * V + 3000] = -INFINITY;
    }
    INFO("variant " << variant);
    try {
      kto::cpu::sequence_logprobs<float>(kto::logits_matrix<const float>(z.data(), rows, V),
                                         kto::targets_vector(tg.data(), rows), seqs, {});
      FAIL("no exception");
    } catch (const kto::NonFiniteLogitsError& e) {
      CHECK(e.row() == 2);
      CHECK(e.sequence() == 1);
    }
  }
  // An all −inf row, and a −inf target logit, have no finite log-prob either.
  std::vector<float> z = Z;
  std::fill(z.begin() + 4 * V, z.begin() + 5 * V, -INFINITY);
  CHECK_THROWS_AS(
      kto::cpu::sequence_logprobs<float>(kto::logits_matrix<const float>(z.data(), rows, V),
                                         kto::targets_vector(tg.data(), rows), seqs, {}),
      kto::NonFiniteLogitsError);
  z = Z;
  z[5 * V + tg[5]] = -INFINITY;
  CHECK_THROWS_AS(
      kto::cpu::sequence_logprobs<float>(kto::logits_matrix<const float>(z.data(), rows, V),
                                         kto::targets_vector(tg.data(), rows), seqs, {}),
      kto::NonFiniteLogitsError);
  // −inf on non-target logits (a masked vocabulary) is legitimate, even a whole chunk.
  z = Z;
  std::fill(z.begin(), z.begin() + 2100, -INFINITY);
  tg[0] = 2500;
  const auto ok =
      kto::cpu::sequence_logprobs<float>(kto::logits_matrix<const float>(z.data(), rows, V),
                                         kto::targets_vector(tg.data(), rows), seqs, {});
  CHECK(ok.token_logp[0] == Approx(-std::log(double(V - 2100))).epsilon(1e-6));
  // A NaN on an ignored row or outside every sequence is never read.
  z = Z;
  tg[0] = -100;
  z[0] = NAN;
  CHECK_NOTHROW(
      kto::cpu::sequence_logprobs<float>(kto::logits_matrix<const float>(z.data(), rows, V),
                                         kto::targets_vector(tg.data(), rows), seqs, {}));
}

TEST_CASE("class weights: proposal and the paper's band", "[weights]") {
  const auto w = kto::propose_weights(1, 4);  // desirable minority, 1:4
  CHECK(w.desirable == 4.0);
  CHECK(w.undesirable == 1.0);
  CHECK(kto::check_weights(w.desirable, w.undesirable, 1, 4).within_band);
  const auto w2 = kto::propose_weights(10, 2, 4.0 / 3.0);
  CHECK(w2.desirable == 1.0);
  CHECK(w2.undesirable == Approx(3.75));
  CHECK(kto::check_weights(w2.desirable, w2.undesirable, 10, 2).ratio == Approx(4.0 / 3.0));
  CHECK(kto::check_weights(w2.desirable, w2.undesirable, 10, 2).within_band);
  // The seed article's λ_D = 1, λ_U = 1.33 on balanced data gives 0.75: outside.
  const auto seed = kto::check_weights(1.0, 1.33, 100, 100);
  CHECK_FALSE(seed.within_band);
  CHECK(seed.ratio == Approx(1.0 / 1.33));
  CHECK(seed.message.find("outside") != std::string::npos);
  CHECK(seed.message.find("propose") != std::string::npos);
  CHECK_FALSE(kto::check_weights(2.0, 1.0, 100, 100).within_band);  // 2 > 4/3
  CHECK(kto::check_weights(1.0, 1.0, 0, 5).within_band);            // band does not apply
}
