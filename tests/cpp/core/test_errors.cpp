// One test per argument check: each bad input raises kto::Error whose message
// names the argument, the expectation and the value that came.
#include "step_fixture.hpp"

TEST_CASE("the fixture itself is valid", "[errors]") {
  Fixture f;
  CHECK_NOTHROW(f.run());
}

TEST_CASE("error: beta <= 0", "[errors]") {
  Fixture f;
  f.o.beta = 0.0;
  expect_error([&] { f.run(); }, "options.beta", "be finite, > 0 and <= 1e6", "0");
}
TEST_CASE("error: beta not finite", "[errors]") {
  Fixture f;
  f.o.beta = NAN;
  expect_error([&] { f.run(); }, "options.beta", "be finite, > 0 and <= 1e6", "nan");
}
TEST_CASE("error: negative desirable weight", "[errors]") {
  Fixture f;
  f.o.desirable_weight = -1.0;
  expect_error([&] { f.run(); }, "options.desirable_weight", "be finite, >= 0 and <= 1e6", "-1");
}
TEST_CASE("error: non-finite undesirable weight", "[errors]") {
  Fixture f;
  f.o.undesirable_weight = INFINITY;
  expect_error([&] { f.run(); }, "options.undesirable_weight", "be finite, >= 0 and <= 1e6", "inf");
}
TEST_CASE("error: unknown loss type", "[errors]") {
  Fixture f;
  f.o.loss_type = static_cast<kto::LossType>(7);
  expect_error([&] { f.run(); }, "options.loss_type", "be kto or apo_zero_unpaired", "7");
}
TEST_CASE("error: unknown link", "[errors]") {
  Fixture f;
  f.o.link = static_cast<kto::Link>(3);
  expect_error([&] { f.run(); }, "options.link", "be one_minus_sigmoid or neg_log_sigmoid", "3");
}
TEST_CASE("error: unknown reference point", "[errors]") {
  Fixture f;
  f.o.reference_point = static_cast<kto::ReferencePoint>(9);
  expect_error([&] { f.run(); }, "options.reference_point", "be kl_batch, fixed or zero", "9");
}
TEST_CASE("error: unknown KL estimator", "[errors]") {
  Fixture f;
  f.o.kl_estimator = static_cast<kto::KlEstimator>(4);
  expect_error([&] { f.run(); }, "options.kl_estimator", "be mean or nonempty_mean", "4");
}
TEST_CASE("error: unknown reduction", "[errors]") {
  Fixture f;
  f.o.reduction = static_cast<kto::Reduction>(2);
  expect_error([&] { f.run(); }, "options.reduction", "be mean or sum", "2");
}
TEST_CASE("error: non-finite fixed z0", "[errors]") {
  Fixture f;
  f.o.reference_point = kto::ReferencePoint::fixed;
  f.o.fixed_z0 = NAN;
  expect_error([&] { f.run(); }, "options.fixed_z0", "be finite", "nan");
}
TEST_CASE("error: negative mean denominator", "[errors]") {
  Fixture f;
  f.o.mean_denominator = -3;
  expect_error([&] { f.run(); }, "options.mean_denominator", "be >= 0", "-3");
}

TEST_CASE("error: vocab < 1", "[errors]") {
  Fixture f;
  auto in = f.inputs();
  in.policy_logits.vocab = 0;
  expect_error([&] { f.run(in); }, "policy_logits.vocab", "be >= 1", "0");
}
TEST_CASE("error: negative row count", "[errors]") {
  Fixture f;
  auto in = f.inputs();
  in.policy_logits.rows.rows = -2;
  expect_error([&] { f.run(in); }, "policy_logits.rows", "be >= 0", "-2");
}
TEST_CASE("error: row stride smaller than the vocabulary", "[errors]") {
  Fixture f;
  auto in = f.inputs();
  in.policy_logits.rows.row_stride = 4;
  expect_error([&] { f.run(in); }, "policy_logits.row_stride", "be >= 5 so rows do not overlap",
               "4");
}
TEST_CASE("error: a gradient whose batch entries overlap", "[errors]") {
  Fixture f;
  std::vector<float> g(40);
  expect_error(
      [&] {
        kto::cpu::kto_step<float>(f.inputs(), f.o,
                                  kto::logits_batched<float>(g.data(), 2, 3, 5, 12, 5));
      },
      "grad.batch_stride", "be >= 15 so batch entries do not overlap", "12");
}
TEST_CASE("error: negative batch stride", "[errors]") {
  Fixture f;
  auto in = f.inputs();
  in.policy_logits = kto::logits_batched<const float>(f.Z.data() + 15, 2, 3, 5, -15, 5);
  expect_error([&] { f.run(in); }, "policy_logits.batch_stride", "be >= 0", "-15");
}
TEST_CASE("error: null logits", "[errors]") {
  Fixture f;
  auto in = f.inputs();
  in.policy_logits.data = nullptr;
  expect_error([&] { f.run(in); }, "policy_logits.data", "be non-null", "nullptr");
}
TEST_CASE("error: targets with a different row count", "[errors]") {
  Fixture f;
  auto in = f.inputs();
  in.targets = kto::targets_vector(f.targets.data(), 5);
  expect_error([&] { f.run(in); }, "targets.rows", "equal the number of logit rows (6)", "5");
}
TEST_CASE("error: null targets", "[errors]") {
  Fixture f;
  auto in = f.inputs();
  in.targets.data = nullptr;
  expect_error([&] { f.run(in); }, "targets.data", "be non-null", "nullptr");
}
TEST_CASE("error: negative target stride", "[errors]") {
  Fixture f;
  auto in = f.inputs();
  in.targets.rows.row_stride = -1;
  expect_error([&] { f.run(in); }, "targets.row_stride",
               "be >= 1 so rows do not overlap, or 0 to repeat one row", "-1");
}
TEST_CASE("error: target id >= vocab", "[errors]") {
  Fixture f;
  f.targets[4] = 5;
  expect_error([&] { f.run(); }, "targets[4]", "be in [0, 5) or ignore_index (-100)", "5");
}
TEST_CASE("error: negative target id other than ignore_index", "[errors]") {
  Fixture f;
  f.targets[1] = -1;
  expect_error([&] { f.run(); }, "targets[1]", "be in [0, 5) or ignore_index (-100)", "-1");
}
TEST_CASE("error: empty batch", "[errors]") {
  Fixture f;
  auto in = f.inputs();
  in.sequences.count = 0;
  expect_error([&] { f.run(in); }, "sequences.count", "be >= 1 (an empty batch has no loss)", "0");
}
TEST_CASE("error: null offsets", "[errors]") {
  Fixture f;
  auto in = f.inputs();
  in.sequences.offsets = nullptr;
  expect_error([&] { f.run(in); }, "sequences.offsets", "be non-null", "nullptr");
}
TEST_CASE("error: negative first offset", "[errors]") {
  Fixture f;
  f.offsets[0] = -1;
  expect_error([&] { f.run(); }, "sequences.offsets[0]", "be >= 0", "-1");
}
TEST_CASE("error: offsets not monotone", "[errors]") {
  Fixture f;
  f.offsets = {0, 4, 3};
  expect_error([&] { f.run(); }, "sequences.offsets[2]", "be >= offsets[1] = 4 (non-decreasing)",
               "3");
}
TEST_CASE("error: offsets past the rows", "[errors]") {
  Fixture f;
  f.offsets = {0, 3, 7};
  expect_error([&] { f.run(); }, "sequences.offsets[2]", "be <= the number of rows (6)", "7");
}
TEST_CASE("error: reference log-probs of the wrong size", "[errors]") {
  Fixture f;
  f.ref.pop_back();
  expect_error([&] { f.run(); }, "reference_logp.size", "be 2", "1");
}
TEST_CASE("error: non-finite reference log-prob", "[errors]") {
  Fixture f;
  f.ref[1] = -INFINITY;
  expect_error([&] { f.run(); }, "reference_logp[1]", "be finite", "-inf");
}
TEST_CASE("error: labels of the wrong size", "[errors]") {
  Fixture f;
  f.desirable.push_back(1);
  expect_error([&] { f.run(); }, "desirable.size", "be 2", "3");
}
TEST_CASE("error: label other than 0 or 1", "[errors]") {
  Fixture f;
  f.desirable[0] = 2;
  expect_error([&] { f.run(); }, "desirable[0]", "be 0 (undesirable) or 1 (desirable)", "2");
}
TEST_CASE("error: KL reference log-probs of another size than the policy's", "[errors]") {
  Fixture f;
  f.klr.push_back(0.f);
  expect_error([&] { f.run(); }, "kl.reference_logp.size", "be 2", "3");
}
TEST_CASE("error: nonempty_mean without KL token counts", "[errors]") {
  Fixture f;
  f.o.kl_estimator = kto::KlEstimator::nonempty_mean;
  auto in = f.inputs();
  in.kl.num_tokens = {};
  expect_error([&] { f.run(in); }, "kl.num_tokens.size", "be 2", "0");
}
TEST_CASE("error: non-finite KL log-prob", "[errors]") {
  Fixture f;
  f.klp[0] = NAN;
  expect_error([&] { f.run(); }, "kl.policy_logp[0]", "be finite", "nan");
}
TEST_CASE("error: gradient with another vocabulary", "[errors]") {
  Fixture f;
  expect_error(
      [&] {
        kto::cpu::kto_step<float>(f.inputs(), f.o, kto::logits_matrix<float>(f.G.data(), 5, 6));
      },
      "grad.vocab", "equal logits.vocab (5)", "6");
}
TEST_CASE("error: gradient with another row count", "[errors]") {
  Fixture f;
  expect_error(
      [&] {
        kto::cpu::kto_step<float>(f.inputs(), f.o, kto::logits_matrix<float>(f.G.data(), 5, 5));
      },
      "grad.rows", "equal logits.rows (6)", "5");
}
TEST_CASE("error: gradient that partially overlaps the logits", "[errors]") {
  Fixture f;
  std::vector<float> both(40, 0.5f);
  auto in = f.inputs();
  in.policy_logits = kto::logits_matrix<const float>(both.data(), 6, 5);
  expect_error(
      [&] { kto::cpu::kto_step<float>(in, f.o, kto::logits_matrix<float>(both.data() + 5, 6, 5)); },
      "grad", "either share no element with the logits or alias them exactly", "a partial overlap");
}
TEST_CASE("error: backward with a row_lse of the wrong size", "[errors]") {
  Fixture f;
  const auto in = f.inputs();
  std::vector<float> lse(5, 0.f), g(2, 0.f);
  std::vector<index_t> n = {3, 2};
  expect_error(
      [&] {
        kto::cpu::backward<float>(in.policy_logits, in.targets, in.sequences, kto::make_span(lse),
                                  kto::make_span(g), kto::make_span(n), f.o, f.grad());
      },
      "row_lse.size", "be 6", "5");
}
TEST_CASE("error: backward with non-finite g_s", "[errors]") {
  Fixture f;
  const auto in = f.inputs();
  std::vector<float> lse(6, 0.f), g = {0.f, NAN};
  std::vector<index_t> n = {3, 2};
  expect_error(
      [&] {
        kto::cpu::backward<float>(in.policy_logits, in.targets, in.sequences, kto::make_span(lse),
                                  kto::make_span(g), kto::make_span(n), f.o, f.grad());
      },
      "grad_logp[1]", "be finite", "nan");
}
TEST_CASE("error: finish with a non-finite KL partial", "[errors]") {
  Fixture f;
  kto::KlPartial p;
  p.sum = NAN;
  p.count = 1;
  expect_error(
      [&] {
        kto::finish<float>(p, kto::policy_logp(f.ref), kto::reference_logp(f.ref),
                           kto::make_span(f.desirable), f.o);
      },
      "kl.sum", "be finite", "nan");
}
TEST_CASE("error: weight proposal with an empty side", "[errors]") {
  expect_error([] { kto::propose_weights(0, 4); }, "num_desirable", "be >= 1", "0");
}
TEST_CASE("error: weight proposal outside the band", "[errors]") {
  expect_error([] { kto::propose_weights(3, 4, 2.0); }, "target_ratio", "be in [1, 4/3]", "2");
}
TEST_CASE("error: weight check with a negative weight", "[errors]") {
  expect_error([] { kto::check_weights(-1.0, 1.0, 3, 4); }, "desirable_weight",
               "be finite and >= 0", "-1");
}

// The binding contract for options (kto/options.hpp): one array, checked value by value.
TEST_CASE("options array: round trip and named checks", "[errors][options]") {
  kto::Options o;
  o.beta = 0.25;
  o.desirable_weight = 1.5;
  o.undesirable_weight = 0.75;
  o.loss_type = kto::LossType::apo_zero_unpaired;
  o.link = kto::Link::neg_log_sigmoid;
  o.reference_point = kto::ReferencePoint::fixed;
  o.kl_estimator = kto::KlEstimator::nonempty_mean;
  o.clamp_kl = false;
  o.fixed_z0 = -0.5;
  o.average_logprob = true;
  o.reduction = kto::Reduction::sum;
  o.mean_denominator = 64;
  o.ignore_index = -1;
  o.token_statistics = true;
  o.logit_scale = 0.125;
  o.logit_softcap = 30.0;
  o.temperature = 0.7;
  double values[kto::kOptionCount];
  kto::options_to_array(o, values);
  const kto::Options back = kto::options_from_array(values, kto::kOptionCount, "test");
  double again[kto::kOptionCount];
  kto::options_to_array(back, again);
  for (int k = 0; k < kto::kOptionCount; ++k) {
    INFO(kto::kOptionNames[k]);
    CHECK(again[k] == values[k]);
  }
  CHECK(back.beta == 0.25);
  CHECK(back.kl_estimator == kto::KlEstimator::nonempty_mean);
  CHECK(back.token_statistics);

  CHECK_THROWS_WITH(
      kto::options_from_array(values, kto::kOptionCount - 1, "f"),
      "f: argument 'options' must hold kOptionCount = " + std::to_string(kto::kOptionCount) +
          " values; got " + std::to_string(kto::kOptionCount - 1));
  values[kto::kOptionLossType] = 0.5;
  CHECK_THROWS_WITH(kto::options_from_array(values, kto::kOptionCount, "f"),
                    "f: argument 'options.loss_type' must be a whole number in [0, 1]; got 0.5");
  values[kto::kOptionLossType] = 0;
  values[kto::kOptionReferencePoint] = 3;
  CHECK_THROWS_WITH(
      kto::options_from_array(values, kto::kOptionCount, "f"),
      "f: argument 'options.reference_point' must be a whole number in [0, 2]; got 3");
  values[kto::kOptionReferencePoint] = 0;
  values[kto::kOptionClampKl] = NAN;
  CHECK_THROWS_WITH(
      kto::options_from_array(values, kto::kOptionCount, "f"),
      Catch::Contains("argument 'options.clamp_kl' must be a whole number in [0, 1]"));
  values[kto::kOptionClampKl] = 1;
  values[kto::kOptionBeta] = -1;  // then validate_options()
  CHECK_THROWS_WITH(kto::options_from_array(values, kto::kOptionCount, "f"),
                    Catch::Contains("argument 'options.beta' must be finite, > 0"));
}

TEST_CASE("options contract: the enum options' value names, one table", "[errors]") {
  // Each name sits at its enum value's code, and options_from_array accepts exactly
  // the codes that have a name.
  auto name_of = [](int option, int code) {
    const kto::OptionChoices c = kto::option_choices(option);
    REQUIRE(code < c.count);
    return std::string(c.names[code]);
  };
  CHECK(name_of(kto::kOptionLossType, static_cast<int>(kto::LossType::kto)) == "kto");
  CHECK(name_of(kto::kOptionLossType, static_cast<int>(kto::LossType::apo_zero_unpaired)) ==
        "apo_zero_unpaired");
  CHECK(name_of(kto::kOptionLink, static_cast<int>(kto::Link::one_minus_sigmoid)) ==
        "one_minus_sigmoid");
  CHECK(name_of(kto::kOptionLink, static_cast<int>(kto::Link::neg_log_sigmoid)) ==
        "neg_log_sigmoid");
  CHECK(name_of(kto::kOptionReferencePoint, static_cast<int>(kto::ReferencePoint::kl_batch)) ==
        "kl_batch");
  CHECK(name_of(kto::kOptionReferencePoint, static_cast<int>(kto::ReferencePoint::fixed)) ==
        "fixed");
  CHECK(name_of(kto::kOptionReferencePoint, static_cast<int>(kto::ReferencePoint::zero)) == "zero");
  CHECK(name_of(kto::kOptionKlEstimator, static_cast<int>(kto::KlEstimator::mean)) == "mean");
  CHECK(name_of(kto::kOptionKlEstimator, static_cast<int>(kto::KlEstimator::nonempty_mean)) ==
        "nonempty_mean");
  CHECK(name_of(kto::kOptionReduction, static_cast<int>(kto::Reduction::mean)) == "mean");
  CHECK(name_of(kto::kOptionReduction, static_cast<int>(kto::Reduction::sum)) == "sum");
  int enums = 0;
  for (int k = 0; k < kto::kOptionCount; ++k) {
    const kto::OptionChoices c = kto::option_choices(k);
    if (c.count == 0) continue;
    ++enums;
    INFO(kto::kOptionNames[k]);
    double values[kto::kOptionCount];
    kto::options_to_array(kto::Options{}, values);
    values[k] = c.count - 1;
    CHECK_NOTHROW(kto::options_from_array(values, kto::kOptionCount, "f"));
    values[k] = c.count;
    CHECK_THROWS_WITH(
        kto::options_from_array(values, kto::kOptionCount, "f"),
        Catch::Contains("must be a whole number in [0, " + std::to_string(c.count - 1) + "]"));
  }
  CHECK(enums == 5);
}

TEST_CASE("the fused strategies' names sit at their codes", "[errors]") {
  using kto::FusedStrategy;
  auto name_of = [](FusedStrategy s) { return std::string(kto::kFusedStrategyNames[int(s)]); };
  CHECK(name_of(FusedStrategy::keep_chunk) == "keep_chunk");
  CHECK(name_of(FusedStrategy::recompute) == "recompute");
  CHECK(name_of(FusedStrategy::vocab_blocks) == "vocab_blocks");
  CHECK(kto::kFusedStrategyCount == int(FusedStrategy::vocab_blocks) + 1);
}

TEST_CASE("error: a kto step estimating z0 from an empty KL batch", "[errors]") {
  // z0 from no KL example would silently be 0; the caller must choose that.
  Fixture f;
  f.klp.clear();
  f.klr.clear();
  f.kln.clear();
  expect_error([&] { f.run(); }, "kl.count", "be >= 1 with options.reference_point kl_batch", "0");
  f.o.kl_estimator = kto::KlEstimator::nonempty_mean;  // examples, but none with a token
  f.klp = {0.f, 0.f};
  f.klr = {0.f, 0.f};
  f.kln = {0, 0};
  expect_error([&] { f.run(); }, "kl.count", "be >= 1 with options.reference_point kl_batch", "0");
  f.o.reference_point = kto::ReferencePoint::zero;
  CHECK_NOTHROW(f.run());
  f.o.reference_point = kto::ReferencePoint::kl_batch;
  f.o.loss_type = kto::LossType::apo_zero_unpaired;  // no KL batch used
  CHECK_NOTHROW(f.run());
}
