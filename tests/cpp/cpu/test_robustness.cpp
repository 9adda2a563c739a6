// One regression test per defect class of the hostile-input review (D1–D19,
// the core-library side; the PyTorch side is tests/python/torch/test_torch_robustness.py),
// plus the guarantees of docs/guarantees.md: nothing is written on a
// validation error, and a data-parallel rank's failure raises on every rank.
#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <mutex>
#include <system_error>
#include <thread>

#include "fused_fixture.hpp"
#include "ranks.hpp"
#include "step_fixture.hpp"

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

/// The fused fixture's gradients after one run.
struct FusedGrads {
  std::vector<float> dh, dw, db;
  kto::Metrics metrics;
};
FusedGrads run_grads(FusedFixture& f, const kto::cpu::FusedLinearConfig& cfg = {}) {
  const auto r = kto::cpu::fused_linear_kto_step<float>(f.in, f.head, f.o, f.grads, cfg);
  return {f.dh, f.dw, f.db, r.metrics};
}

/// A row of the fused fixture's target batch that is not scored.
index_t ignored_row(const FusedFixture& f) {
  for (index_t r = 0; r < f.fp.rows; ++r)
    if (f.fp.targets[static_cast<size_t>(r)] == f.o.ignore_index) return r;
  return -1;
}

/// f() raises an E naming `function` and `argument`.
template <class E, class F>
void expect_named(F&& f, const std::string& function, const std::string& argument) {
  try {
    f();
    FAIL("no error from " << function << " for " << argument);
  } catch (const E& e) {
    INFO(e.what());
    CHECK(e.function() == function);
    CHECK(e.argument() == argument);
  }
}

template <class E>
std::string error_of(const std::exception_ptr& e) {
  try {
    if (e) std::rethrow_exception(e);
  } catch (const E& x) {
    return x.what();
  } catch (...) {
    return "another exception type";
  }
  return "no exception";
}

}  // namespace

TEST_CASE("D1: a NaN hidden state on an ignored row never reaches a gradient", "[robustness]") {
  const auto strategy =
      GENERATE(kto::cpu::FusedStrategy::keep_chunk, kto::cpu::FusedStrategy::recompute);
  FusedFixture f;
  kto::cpu::FusedLinearConfig cfg;
  cfg.strategy = strategy;
  const index_t r = ignored_row(f);
  REQUIRE(r >= 0);
  const FusedGrads clean = run_grads(f, cfg);
  for (index_t k = 0; k < f.fp.dim; ++k) f.fp.hidden[static_cast<size_t>(r * f.fp.dim + k)] = NAN;
  f.restore();
  const FusedGrads poisoned = run_grads(f, cfg);
  CHECK(all_finite(poisoned.dh));
  CHECK(all_finite(poisoned.dw));
  CHECK(all_finite(poisoned.db));
  CHECK(poisoned.dw == clean.dw);  // the ignored row is never read: same bits
  CHECK(poisoned.db == clean.db);
  CHECK(poisoned.metrics.loss == clean.metrics.loss);
}

TEST_CASE("D2: fused outputs that alias an input or each other are rejected", "[robustness]") {
  FusedFixture f;
  SECTION("d_hidden inside hidden") {
    f.grads.d_hidden.data = const_cast<float*>(f.in.hidden.data);
    expect_error([&] { f.run(); }, "grads.d_hidden", "share no memory with hidden", "an overlap");
  }
  SECTION("d_weight = weight") {
    f.grads.d_weight.data = const_cast<float*>(f.head.weight.data);
    expect_error([&] { f.run(); }, "grads.d_weight", "share no memory with head.weight",
                 "an overlap");
  }
  SECTION("d_bias inside d_weight") {
    f.grads.d_bias.data = f.dw.data() + 3;
    expect_error([&] { f.run(); }, "grads.d_weight", "share no memory with grads.d_bias",
                 "an overlap");
  }
  SECTION("d_hidden over the KL batch") {
    // The KL batch moved into d_hidden's storage (not d_hidden onto the KL batch: its
    // N x D floats could run on into whichever buffer the heap put after it).
    f.in.kl.hidden.data = f.grads.d_hidden.data;
    expect_error([&] { f.run(); }, "grads.d_hidden", "share no memory with kl.hidden",
                 "an overlap");
  }
}

TEST_CASE("D3: a row stride of 0 repeats one row (expand), never reads as V", "[robustness]") {
  Fixture f;
  std::vector<float> row(5);
  for (int v = 0; v < 5; ++v) row[static_cast<size_t>(v)] = 0.3f * static_cast<float>(v) - 0.5f;
  std::vector<float> repeated;
  for (int r = 0; r < 6; ++r) repeated.insert(repeated.end(), row.begin(), row.end());
  auto in = f.inputs();
  in.policy_logits = kto::logits_matrix<const float>(repeated.data(), 6, 5);
  std::vector<float> g1(30), g2(30);
  const auto want = kto::cpu::kto_step<float>(in, f.o, kto::logits_matrix<float>(g1.data(), 6, 5));
  in.policy_logits = kto::logits_matrix<const float>(row.data(), 6, 5, 0);
  const auto got = kto::cpu::kto_step<float>(in, f.o, kto::logits_matrix<float>(g2.data(), 6, 5));
  CHECK(got.metrics.loss == want.metrics.loss);
  CHECK(got.logp == want.logp);
  CHECK(g2 == g1);
  // A gradient (an output) may not repeat rows.
  expect_error(
      [&] { kto::cpu::kto_step<float>(in, f.o, kto::logits_matrix<float>(g2.data(), 6, 5, 0)); },
      "grad.row_stride", "be >= 5 so rows do not overlap", "0");
}

TEST_CASE("D4: bias and d_bias carry their length, and it is checked", "[robustness]") {
  FusedFixture f;
  SECTION("bias too short") {
    f.head.bias.size = 1;
    expect_error([&] { f.run(); }, "head.bias.size", "be 0 (no bias) or head.weight.rows (37)",
                 "1");
  }
  SECTION("bias too long") {
    f.head.bias.size = 38;
    expect_error([&] { f.run(); }, "head.bias.size", "be 0 (no bias) or head.weight.rows", "38");
  }
  SECTION("d_bias too short") {
    f.grads.d_bias.size = 36;
    expect_error([&] { f.run(); }, "grads.d_bias.size", "be 0 (skipped) or head.weight.rows", "36");
  }
}

TEST_CASE("D6: vocab_begin + rows cannot overflow past the range check", "[robustness]") {
  FusedFixture f;
  f.head.vocab_total = 100;
  f.head.vocab_begin = std::numeric_limits<index_t>::max() - 3;
  expect_error([&] { f.run(); }, "head.vocab_begin", "place the slice inside [0, 100)",
               std::to_string(f.head.vocab_begin));
}

TEST_CASE("D7: view sizes and extents are overflow-checked", "[robustness]") {
  const index_t big = index_t{1} << 32;
  SECTION("batch x seq_len wraps") {
    expect_error([&] { kto::logits_batched<const float>(nullptr, big, big, 5, 0, 5); },
                 "batch x seq_len", "give a size that fits in 64 bits", "4294967296 x 4294967296");
    expect_error([&] { kto::targets_batched(nullptr, big, big, 0); }, "batch x seq_len",
                 "give a size that fits in 64 bits", "4294967296 x 4294967296");
  }
  SECTION("a batch stride near INT64_MAX") {
    Fixture f;
    auto in = f.inputs();
    in.policy_logits = kto::logits_batched<const float>(f.Z.data(), 2, 3, 5, INT64_MAX - 10, 5);
    expect_error([&] { f.run(in); }, "policy_logits.batch_stride",
                 "give a size that fits in 64 bits", std::to_string(INT64_MAX - 10) + " + 15");
  }
  SECTION("a row extent whose byte size overflows") {
    Fixture f;
    auto in = f.inputs();
    in.policy_logits = kto::logits_matrix<const float>(f.Z.data(), 6, 5, INT64_MAX / 8);
    expect_error([&] { f.run(in); }, "policy_logits", "give a size that fits in 64 bits",
                 std::to_string(5 * (INT64_MAX / 8) + 5) + " x 4");
  }
  SECTION("a huge hidden matrix") {
    FusedFixture f;
    f.in.hidden.rows = INT64_MAX / 4;
    f.in.hidden.stride = 16;
    expect_error([&] { f.run(); }, "hidden", "give a size that fits in 64 bits",
                 std::to_string(INT64_MAX / 4 - 1) + " x 16");
  }
}

TEST_CASE("D8: a thread that cannot start runs its range on the caller", "[robustness]") {
  const int fail_from = GENERATE(1, 2, 3);
  std::vector<std::atomic<int>> hits(1000);
  int starts = 0;
  kto::cpu::ExecutionPolicy exec{4};
  kto::cpu::detail::parallel_for_with(
      1000, exec,
      [&](index_t b, index_t e) {
        for (index_t i = b; i < e; ++i) ++hits[static_cast<size_t>(i)];
      },
      [&](auto&& fn) {
        if (++starts >= fail_from)
          throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again));
        return std::thread(std::forward<decltype(fn)>(fn));
      });
  for (const auto& h : hits) CHECK(h.load() == 1);
}

TEST_CASE("D9: the fused step without a KL batch, and KL errors named as KL", "[robustness]") {
  FusedFixture f;
  SECTION("default-constructed KL views: an empty KL batch raises where z0 needs it") {
    f.in.kl.hidden = {};
    f.in.kl.targets = {};
    f.in.kl.sequences = {};
    f.in.kl.reference_logp = {};
    expect_error([&] { f.run(); }, "kl.count", "be >= 1 with options.reference_point kl_batch",
                 "0");
    f.o.reference_point = kto::ReferencePoint::zero;  // the caller's choice: z0 = 0
    const FusedGrads g = run_grads(f);
    CHECK(g.metrics.kl == 0.0);
    CHECK(all_finite(g.dw));
  }
  SECTION("a bad KL target names kl.targets") {
    const index_t r = f.fp.kl_offsets[0];
    f.fp.kl_targets[static_cast<size_t>(r)] = 99;
    f.restore();
    expect_error([&] { f.run(); }, "kl.targets[" + std::to_string(r) + "]", "be in [0, 37)", "99");
  }
  SECTION("bad KL offsets name kl.sequences") {
    f.fp.kl_offsets.back() = f.fp.kl_rows + 1;
    f.restore();
    expect_error([&] { f.run(); },
                 "kl.sequences.offsets[" + std::to_string(f.fp.kl_offsets.size() - 1) + "]",
                 "be <= the number of rows", std::to_string(f.fp.kl_rows + 1));
  }
}

TEST_CASE("D12: negative strides are errors, never replaced", "[robustness]") {
  Fixture f;
  auto in = f.inputs();
  in.policy_logits = kto::logits_matrix<const float>(f.Z.data() + 25, 6, 5, -5);
  expect_error([&] { f.run(in); }, "policy_logits.row_stride", "be >= 5 so rows do not overlap",
               "-5");
  FusedFixture g;
  g.in.hidden.stride = -16;
  expect_error([&] { g.run(); }, "hidden.stride", "be >= cols (16)", "-16");
}

TEST_CASE("D13: a huge beta or weight is rejected up front", "[robustness]") {
  Fixture f;
  f.o.beta = 1e300;
  expect_error([&] { f.run(); }, "options.beta", "<= 1e6", "1e+300");
  f.o.beta = 0.1;
  f.o.undesirable_weight = 1e30;
  expect_error([&] { f.run(); }, "options.undesirable_weight", "<= 1e6", "1e+30");
  f.o.undesirable_weight = 1e6;  // the bound itself is fine, and stays finite
  const auto r = kto::cpu::kto_step<float>(f.inputs(), f.o, f.grad());
  CHECK(std::isfinite(r.metrics.loss));
  CHECK(all_finite(f.G));
}

TEST_CASE("D14: a bad KL count is reported as the count", "[robustness]") {
  Fixture f;
  kto::KlPartial p{1.0, -2.0, 0.0};
  expect_error(
      [&] {
        kto::finish<float>(p, kto::policy_logp(f.ref), kto::reference_logp(f.ref),
                           kto::make_span(f.desirable), f.o);
      },
      "kl.count", "be finite and >= 0", "-2");
}

TEST_CASE("D15: finite logits whose log-prob overflows are not blamed on a NaN", "[robustness]") {
  Fixture f;
  std::fill(f.Z.begin(), f.Z.end(), 0.0f);
  f.Z[0] = -3e38f;  // row 0's target (0) is finite, its log-prob overflows fp32
  f.Z[1] = 3e38f;
  try {
    f.run();
    FAIL("no NonFiniteLogitsError");
  } catch (const kto::NonFiniteLogitsError& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(e.row() == 0);
    CHECK(msg.find("every logit is finite") != std::string::npos);
    CHECK(e.function() == "kto::cpu::kto_step");
  }
}

TEST_CASE("D16: a non-finite weight or bias is named as such", "[robustness]") {
  FusedFixture f;
  std::string want;
  SECTION("weight") {
    f.fp.weight[static_cast<size_t>(5 * f.fp.dim + 2)] = INFINITY;
    want = "head.weight";
  }
  SECTION("bias") {
    f.fp.bias[7] = NAN;
    want = "head.bias";
  }
  f.restore();
  try {
    f.run();
    FAIL("no NonFiniteLogitsError");
  } catch (const kto::NonFiniteLogitsError& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(e.argument() == want);
    CHECK(msg.find(want + "[") != std::string::npos);
  }
}

TEST_CASE("D17: small validation gaps", "[robustness]") {
  SECTION("negative KL token counts") {
    Fixture f;
    f.kln = {2, -1};
    expect_error([&] { f.run(); }, "kl.num_tokens[1]", "be >= 0", "-1");
  }
  SECTION("an unknown fused strategy") {
    FusedFixture f;
    kto::cpu::FusedLinearConfig cfg;
    cfg.strategy = static_cast<kto::FusedStrategy>(7);
    expect_error([&] { kto::cpu::fused_linear_kto_step<float>(f.in, f.head, f.o, f.grads, cfg); },
                 "config.strategy", "be keep_chunk (0) or recompute (1)", "7");
  }
  SECTION("vocab_blocks is refused on the CPU, naming the device it runs on") {
    FusedFixture f;
    kto::cpu::FusedLinearConfig cfg;
    cfg.strategy = kto::FusedStrategy::vocab_blocks;
    expect_error([&] { kto::cpu::fused_linear_kto_step<float>(f.in, f.head, f.o, f.grads, cfg); },
                 "config.strategy", "(vocab_blocks is CUDA only)", "2");
  }
  SECTION("chunk_bytes = SIZE_MAX is capped at the batch, same result") {
    FusedFixture f;
    const FusedGrads want = run_grads(f);
    kto::cpu::FusedLinearConfig cfg;
    cfg.chunk_bytes = SIZE_MAX;
    const FusedGrads got = run_grads(f, cfg);
    CHECK(got.metrics.loss == want.metrics.loss);
    CHECK(got.dw == want.dw);
    const auto& head = f.head;
    CHECK(kto::cpu::fused_linear_workspace_bytes(head, cfg, f.fp.rows) ==
          kto::cpu::fused_linear_workspace_bytes(head, kto::cpu::FusedLinearConfig{}, f.fp.rows));
  }
}

TEST_CASE("D18: a gradient interleaved with the logits, sharing no element, is accepted",
          "[robustness]") {
  Fixture f;
  std::vector<float> want_grad(30);
  const auto want =
      kto::cpu::kto_step<float>(f.inputs(), f.o, kto::logits_matrix<float>(want_grad.data(), 6, 5));
  // Logits on the even rows of a stride-10 buffer, the gradient on the odd rows.
  std::vector<float> both(60, 0.0f);
  for (int r = 0; r < 6; ++r)
    std::copy(f.Z.begin() + r * 5, f.Z.begin() + r * 5 + 5, both.begin() + r * 10);
  auto in = f.inputs();
  in.policy_logits = kto::logits_matrix<const float>(both.data(), 6, 5, 10);
  const auto got =
      kto::cpu::kto_step<float>(in, f.o, kto::logits_matrix<float>(both.data() + 5, 6, 5, 10));
  CHECK(got.metrics.loss == want.metrics.loss);
  for (int r = 0; r < 6; ++r)
    for (int v = 0; v < 5; ++v)
      CHECK(both[static_cast<size_t>(r * 10 + 5 + v)] == want_grad[static_cast<size_t>(r * 5 + v)]);
}

TEST_CASE("review: views that are valid however they are built", "[robustness]") {
  Fixture f;
  std::vector<float> want_grad(30);
  const auto want =
      kto::cpu::kto_step<float>(f.inputs(), f.o, kto::logits_matrix<float>(want_grad.data(), 6, 5));
  SECTION("a transposed [T, B, V] buffer read as [B, T, V]: entries interleave") {
    std::vector<float> tb(30);
    for (int b = 0; b < 2; ++b)
      for (int t = 0; t < 3; ++t)
        std::copy(f.Z.begin() + (b * 3 + t) * 5, f.Z.begin() + (b * 3 + t) * 5 + 5,
                  tb.begin() + (t * 2 + b) * 5);
    auto in = f.inputs();
    in.policy_logits = kto::logits_batched<const float>(tb.data(), 2, 3, 5, 5, 10);
    std::vector<float> g(30);
    const auto got = kto::cpu::kto_step<float>(in, f.o, kto::logits_matrix<float>(g.data(), 6, 5));
    CHECK(got.metrics.loss == want.metrics.loss);
    CHECK(g == want_grad);
  }
  SECTION("in place through a view built another way: same rows, same memory") {
    auto in = f.inputs();
    in.policy_logits = kto::logits_batched<const float>(f.Z.data(), 2, 3, 5, 15, 5);
    const auto got =
        kto::cpu::kto_step<float>(in, f.o, kto::logits_matrix<float>(f.Z.data(), 6, 5));
    CHECK(got.metrics.loss == want.metrics.loss);
    CHECK(f.Z == want_grad);
  }
  SECTION("negative sizes in the builders") {
    expect_error([] { kto::logits_batched<const float>(nullptr, -2, -3, 5, 15, 5); }, "batch",
                 "be >= 0", "-2");
    expect_error([] { kto::targets_batched(nullptr, 2, -3, 3); }, "seq_len", "be >= 0", "-3");
  }
}

TEST_CASE("review: fused-step checks that run before anything is read", "[robustness]") {
  FusedFixture f;
  SECTION("null offsets raise, never crash") {
    f.in.sequences = kto::sequences(nullptr, 1);
    expect_error([&] { f.run(); }, "sequences.offsets", "be non-null", "nullptr");
  }
  SECTION("a one-row matrix whose byte size overflows") {
    f.in.hidden.rows = 1;
    f.in.hidden.cols = INT64_MAX / 2;
    expect_error([&] { f.run(); }, "hidden", "give a size that fits in 64 bits",
                 std::to_string(INT64_MAX / 2) + " x 4");
  }
  SECTION("a gradient over the targets") {
    f.grads.d_hidden.data = reinterpret_cast<float*>(const_cast<index_t*>(f.in.targets.data));
    expect_error([&] { f.run(); }, "grads.d_hidden", "share no memory with targets", "an overlap");
  }
}

TEST_CASE("review: overflow found on the rank, before the collective", "[robustness]") {
  const bool fused = GENERATE(false, true);
  test::ThreadSum all_reduce(2);
  const auto errors = test::run_ranks(2, [&](int rank) {
    kto::KlAllReduce hook = [&](kto::KlPartial& p) { all_reduce(p); };
    if (!fused) {
      // Finite token log-probs whose sum overflows float.
      Fixture f;
      if (rank == 1) {
        std::fill(f.Z.begin(), f.Z.end(), 0.0f);
        for (int r = 0; r < 3; ++r) f.Z[static_cast<size_t>(r * 5 + 1)] = 2e38f;
        f.targets = {0, 0, 0, 3, 4, -100};
      }
      kto::cpu::kto_step<float>(f.inputs(), f.o, f.grad(), {}, hook);
    } else {
      // recompute: finite inputs whose target logits overflow, found before the collective.
      FusedFixture f;
      if (rank == 1) {  // Z = 16 x 10 x 1e37 overflows fp32; every input is finite
        std::fill(f.fp.weight.begin(), f.fp.weight.end(), 1e37);
        std::fill(f.fp.hidden.begin(), f.fp.hidden.end(), 10.0);
        f.restore();
      }
      f.hooks.kl_all_reduce = hook;
      kto::cpu::FusedLinearConfig cfg;
      cfg.strategy = kto::cpu::FusedStrategy::recompute;
      f.o.reference_point = kto::ReferencePoint::zero;  // no KL forward to find it first
      kto::cpu::fused_linear_kto_step<float>(f.in, f.head, f.o, f.grads, cfg, {}, f.hooks);
    }
  });
  INFO("rank 0: " << error_of<kto::Error>(errors[0]));
  INFO("rank 1: " << error_of<kto::Error>(errors[1]));
  CHECK(error_of<kto::PeerError>(errors[0]).find("1 data-parallel rank(s) failed") !=
        std::string::npos);
  CHECK(error_of<kto::NonFiniteLogitsError>(errors[1]).find("finite") != std::string::npos);
}

TEST_CASE("D19: errors name the public entry point and the caller's argument", "[robustness]") {
  Fixture f;
  SECTION("an empty batch") {
    auto in = f.inputs();
    in.sequences.count = 0;
    in.reference_logp.size = 0;
    in.desirable.size = 0;
    expect_named<kto::Error>([&] { f.run(in); }, "kto::cpu::kto_step", "sequences.count");
  }
  SECTION("NaN logits") {
    f.Z[7] = NAN;
    expect_named<kto::NonFiniteLogitsError>([&] { f.run(); }, "kto::cpu::kto_step",
                                            "policy_logits");
  }
  SECTION("a KL-batch error raised inside the step") {
    f.klp[1] = NAN;
    expect_named<kto::Error>([&] { f.run(); }, "kto::cpu::kto_step", "kl.policy_logp[1]");
  }
  SECTION("a bad total vocabulary") {
    FusedFixture g;
    g.head.vocab_total = 5;
    expect_error([&] { g.run(); }, "head.vocab_total", "be 0 (not sharded) or >= head.weight.rows",
                 "5");
  }
}

TEST_CASE("guarantee: nothing is written when validation fails", "[robustness]") {
  SECTION("logits path") {
    Fixture f;
    std::fill(f.G.begin(), f.G.end(), 42.0f);
    f.ref[1] = NAN;
    CHECK_THROWS_AS(f.run(), kto::Error);
    CHECK(std::all_of(f.G.begin(), f.G.end(), [](float x) { return x == 42.0f; }));
  }
  SECTION("fused path: a bad argument, and a NaN on a scored hidden row") {
    FusedFixture f;
    std::fill(f.dh.begin(), f.dh.end(), 42.0f);
    std::fill(f.dw.begin(), f.dw.end(), 42.0f);
    const bool nan_row = GENERATE(false, true);
    if (nan_row) {
      index_t r = f.fp.offsets.back() - 1;  // the last scored row of the batch
      while (f.fp.targets[static_cast<size_t>(r)] == f.o.ignore_index) --r;
      f.fp.hidden[static_cast<size_t>(r * f.fp.dim)] = NAN;
      f.restore();
    } else {
      f.grads.d_bias.size = 3;
    }
    CHECK_THROWS_AS(f.run(), kto::Error);
    CHECK(std::all_of(f.dh.begin(), f.dh.end(), [](float x) { return x == 42.0f; }));
    CHECK(std::all_of(f.dw.begin(), f.dw.end(), [](float x) { return x == 42.0f; }));
  }
}

TEST_CASE("data parallel: one rank's bad input raises on every rank, none waits", "[robustness]") {
  const bool fused = GENERATE(false, true);
  test::ThreadSum all_reduce(2);
  const auto errors = test::run_ranks(2, [&](int rank) {
    kto::KlAllReduce hook = [&](kto::KlPartial& p) { all_reduce(p); };
    if (!fused) {
      Fixture f;
      if (rank == 1) f.Z[12] = NAN;
      kto::cpu::kto_step<float>(f.inputs(), f.o, f.grad(), {}, hook);
    } else {
      FusedFixture f;
      if (rank == 1) {
        f.fp.kl_targets[static_cast<size_t>(f.fp.kl_offsets[0])] = 1000;
        f.restore();
      }
      f.hooks.kl_all_reduce = hook;
      f.run();
    }
  });
  INFO("rank 0: " << error_of<kto::Error>(errors[0]));
  INFO("rank 1: " << error_of<kto::Error>(errors[1]));
  CHECK(error_of<kto::PeerError>(errors[0]).find("1 data-parallel rank(s) failed") !=
        std::string::npos);
  const std::string own = error_of<kto::Error>(errors[1]);
  CHECK(own.find(fused ? "kl.targets" : "policy_logits") != std::string::npos);
}

TEST_CASE("data parallel: healthy ranks agree with one process", "[robustness]") {
  test::ThreadSum all_reduce(2);
  std::vector<kto::Metrics> metrics(2);
  const auto errors = test::run_ranks(2, [&](int rank) {
    Fixture f;
    kto::KlAllReduce hook = [&](kto::KlPartial& p) { all_reduce(p); };
    metrics[static_cast<size_t>(rank)] =
        kto::cpu::kto_step<float>(f.inputs(), f.o, f.grad(), {}, hook).metrics;
  });
  CHECK(!errors[0]);
  CHECK(!errors[1]);
  Fixture one;
  // Two identical ranks: (S, C) doubles, z0 = S/C is unchanged.
  const auto single = kto::cpu::kto_step<float>(one.inputs(), one.o, one.grad()).metrics;
  CHECK(metrics[0].kl == single.kl);
  CHECK(metrics[1].loss == single.loss);
}

namespace {

/// Issue 27's logits-path rank: B one-row sequences of half logits [0, 0], target 0, a
/// reference log-prob of -log 2 (ρ = 0, where σ' is largest), reference_point zero.
struct HalfRank {
  std::vector<Eigen::half> Z, G;
  std::vector<index_t> targets, offsets;
  std::vector<float> ref;
  std::vector<std::uint8_t> desirable;
  kto::Options o;
  explicit HalfRank(index_t B)
      : Z(static_cast<size_t>(2 * B), Eigen::half(0.0f)),
        G(static_cast<size_t>(2 * B), Eigen::half(42.0f)),
        targets(static_cast<size_t>(B), 0),
        ref(static_cast<size_t>(B), static_cast<float>(-std::log(2.0))),
        desirable(static_cast<size_t>(B), 1) {
    for (index_t s = 0; s <= B; ++s) offsets.push_back(s);
    o.beta = 1e6;  // inside the documented bound: λβ/B·σ'(0) = 250000 / B
    o.reference_point = kto::ReferencePoint::zero;
  }
  index_t rows() const { return static_cast<index_t>(targets.size()); }
  kto::cpu::StepInputs<Eigen::half> inputs() const {
    kto::cpu::StepInputs<Eigen::half> in;
    in.policy_logits = kto::logits_matrix<const Eigen::half>(Z.data(), rows(), 2);
    in.targets = kto::targets_vector(targets.data(), rows());
    in.sequences = kto::sequences(offsets.data(), rows());
    in.reference_logp = kto::reference_logp(ref);
    in.desirable = kto::make_span(desirable);
    return in;
  }
  kto::LogitsView<Eigen::half> grad() {
    return kto::logits_matrix<Eigen::half>(G.data(), rows(), 2);
  }
};

}  // namespace

TEST_CASE("issue 27: a half gradient scale that cannot fit raises before the collective",
          "[robustness]") {
  // Rank 0 (B = 1) has a gradient scale of 250000 > 65504; rank 1 (B = 4) of 62500.
  const bool split = GENERATE(false, true);  // kto_step, or step_forward (then the backward)
  INFO((split ? "step_forward" : "kto_step"));
  test::ThreadSum all_reduce(2);
  const auto errors = test::run_ranks(2, [&](int rank) {
    kto::KlAllReduce hook = [&](kto::KlPartial& p) { all_reduce(p); };
    HalfRank h(rank == 0 ? 1 : 4);
    if (split) {
      const auto fwd = kto::cpu::step_forward<Eigen::half>(h.inputs(), h.o, {}, hook);
      kto::cpu::step_backward<Eigen::half>(h.inputs(), fwd, h.o, h.grad());
    } else {
      kto::cpu::kto_step<Eigen::half>(h.inputs(), h.o, h.grad(), {}, hook);
    }
  });
  INFO("rank 0: " << error_of<kto::Error>(errors[0]));
  INFO("rank 1: " << error_of<kto::Error>(errors[1]));
  const std::string own = error_of<kto::Error>(errors[0]);
  CHECK(own.find("'options.beta'") != std::string::npos);
  CHECK(own.find("half") != std::string::npos);
  CHECK(own.find("65504") != std::string::npos);
  CHECK(own.find("grad_logp") == std::string::npos);
  CHECK(error_of<kto::PeerError>(errors[1]).find("1 data-parallel rank(s) failed") !=
        std::string::npos);
}

TEST_CASE("issue 27: the half gradient-scale refusal names options.beta and writes nothing",
          "[robustness]") {
  HalfRank h(1);
  std::vector<Eigen::half> before = h.G;
  SECTION("kto_step") {
    expect_named<kto::Error>([&] { kto::cpu::kto_step<Eigen::half>(h.inputs(), h.o, h.grad()); },
                             "kto::cpu::kto_step", "options.beta");
  }
  SECTION("step_forward") {
    expect_named<kto::Error>([&] { kto::cpu::step_forward<Eigen::half>(h.inputs(), h.o); },
                             "kto::cpu::step_forward", "options.beta");
  }
  CHECK(std::equal(before.begin(), before.end(), h.G.begin(),
                   [](Eigen::half a, Eigen::half b) { return float(a) == float(b); }));
  SECTION("a scale that fits passes") {
    HalfRank ok(4);
    const auto r = kto::cpu::kto_step<Eigen::half>(ok.inputs(), ok.o, ok.grad());
    CHECK(std::isfinite(r.metrics.loss));
    CHECK(std::all_of(ok.G.begin(), ok.G.end(),
                      [](Eigen::half g) { return std::isfinite(static_cast<float>(g)); }));
  }
}

TEST_CASE("issue 27: a fused gradient that overflows raises before the collective",
          "[robustness]") {
  const auto strategy =
      GENERATE(kto::cpu::FusedStrategy::keep_chunk, kto::cpu::FusedStrategy::recompute);
  test::ThreadSum all_reduce(2);
  const auto errors = test::run_ranks(2, [&](int rank) {
    FusedFixture f;
    f.o.desirable_weight = f.o.undesirable_weight = 1e6;  // g_s of about 1e3 to 1e4
    f.o.reduction = kto::Reduction::sum;
    if (rank == 1) {  // the same logits, finite inputs, but dW = Σ dZ·h overflows fp32
      for (double& x : f.fp.hidden) x *= 1e36;
      for (double& x : f.fp.weight) x *= 1e-36;
      f.restore();
    }
    f.hooks.kl_all_reduce = [&](kto::KlPartial& p) { all_reduce(p); };
    kto::cpu::FusedLinearConfig cfg;
    cfg.strategy = strategy;
    kto::cpu::fused_linear_kto_step<float>(f.in, f.head, f.o, f.grads, cfg, {}, f.hooks);
  });
  INFO("rank 0: " << error_of<kto::Error>(errors[0]));
  INFO("rank 1: " << error_of<kto::Error>(errors[1]));
  CHECK(error_of<kto::PeerError>(errors[0]).find("1 data-parallel rank(s) failed") !=
        std::string::npos);
  CHECK(error_of<kto::Error>(errors[1]).find("'hidden'") != std::string::npos);
}

TEST_CASE("issue 27: step_backward names the cotangent", "[robustness]") {
  Fixture f;
  const auto fwd = kto::cpu::step_forward<float>(f.inputs(), f.o);
  std::fill(f.G.begin(), f.G.end(), 42.0f);
  SECTION("a product g_s x cotangent past the accumulation type") {
    expect_named<kto::Error>(
        [&] { kto::cpu::step_backward<float>(f.inputs(), fwd, f.o, f.grad(), {}, 1e300); },
        "kto::cpu::step_backward", "cotangent");
  }
  SECTION("a non-finite cotangent") {
    expect_named<kto::Error>(
        [&] { kto::cpu::step_backward<float>(f.inputs(), fwd, f.o, f.grad(), {}, INFINITY); },
        "kto::cpu::step_backward", "cotangent");
  }
  SECTION("a half gradient scale past 65504") {
    HalfRank h(4);
    const auto hf = kto::cpu::step_forward<Eigen::half>(h.inputs(), h.o);
    expect_named<kto::Error>(
        [&] { kto::cpu::step_backward<Eigen::half>(h.inputs(), hf, h.o, h.grad(), {}, 2.0); },
        "kto::cpu::step_backward", "cotangent");
  }
  CHECK(std::all_of(f.G.begin(), f.G.end(), [](float x) { return x == 42.0f; }));
}

TEST_CASE("issue 27: one spelling for the KL batch on both paths", "[robustness]") {
  SECTION("logits path: the KL policy log-probs") {
    Fixture f;
    f.klp[1] = NAN;
    expect_named<kto::Error>([&] { f.run(); }, "kto::cpu::kto_step", "kl.policy_logp[1]");
  }
  SECTION("logits path: the KL reference log-probs") {
    Fixture f;
    f.klr[1] = NAN;
    expect_named<kto::Error>([&] { f.run(); }, "kto::cpu::kto_step", "kl.reference_logp[1]");
  }
  SECTION("logits path: the KL token counts") {
    Fixture f;
    f.kln[1] = -1;
    expect_named<kto::Error>([&] { f.run(); }, "kto::cpu::kto_step", "kl.num_tokens[1]");
  }
  SECTION("fused path: the KL reference log-probs") {
    FusedFixture g;
    g.fp.kl_reference_logp[1] = NAN;
    g.restore();
    expect_named<kto::Error>([&] { g.run(); }, "kto::cpu::fused_linear_kto_step",
                             "kl.reference_logp[1]");
  }
  SECTION("kl_partial") {
    const std::vector<float> p = {-1.f, NAN}, r = {-1.f, -2.f};
    expect_named<kto::Error>(
        [&] { kto::kl_partial<float>(kto::policy_logp(p), kto::reference_logp(r), {}, {}); },
        "kto::kl_partial", "kl.policy_logp[1]");
  }
}

TEST_CASE("issue 27: with a soft-cap, a raw +-inf logit is capped, not refused", "[robustness]") {
  // The non-finite check applies to the logits the loss sees, z' = c tanh(a z / c) / tau:
  // a raw +-inf becomes +-c/tau, exactly what a huge finite logit gives, with a zero
  // gradient (dz'/dz = 0 there). NaN still raises, and so does +inf without a cap.
  auto run = [](float poison, index_t column, double softcap, std::vector<float>& G) {
    std::vector<float> Z = {0.5f, 1.0f, -0.25f, 2.0f};
    Z[static_cast<size_t>(column)] = poison;
    const std::vector<index_t> targets = {1}, offsets = {0, 1};
    const std::vector<float> ref = {-1.0f};
    const std::vector<std::uint8_t> desirable = {1};
    kto::Options o;
    o.reference_point = kto::ReferencePoint::zero;
    o.logit_softcap = softcap;
    kto::cpu::StepInputs<float> in;
    in.policy_logits = kto::logits_matrix<const float>(Z.data(), 1, 4);
    in.targets = kto::targets_vector(targets.data(), 1);
    in.sequences = kto::sequences(offsets.data(), 1);
    in.reference_logp = kto::reference_logp(ref);
    in.desirable = kto::make_span(desirable);
    G.assign(4, 42.0f);
    return kto::cpu::kto_step<float>(in, o, kto::logits_matrix<float>(G.data(), 1, 4));
  };
  const index_t column = GENERATE(1, 3);  // the target, another logit
  const float sign = GENERATE(1.0f, -1.0f);
  INFO("column " << column << ", sign " << sign);
  std::vector<float> g_inf, g_big;
  const auto capped = run(sign * INFINITY, column, 5.0, g_inf);
  const auto big = run(sign * 1e30f, column, 5.0, g_big);  // tanh(1e30 / 5) is exactly +-1
  CHECK(capped.metrics.loss == big.metrics.loss);
  CHECK(capped.logp[0] == big.logp[0]);
  CHECK(g_inf == g_big);
  CHECK(g_inf[static_cast<size_t>(column)] == 0.0f);
  CHECK(all_finite(g_inf));
  std::vector<float> g;
  CHECK_THROWS_AS(run(NAN, column, 5.0, g), kto::NonFiniteLogitsError);
  if (sign > 0) CHECK_THROWS_AS(run(INFINITY, column, 0.0, g), kto::NonFiniteLogitsError);
}
