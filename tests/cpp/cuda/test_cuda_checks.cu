// Every host-visible check of the CUDA entry points, run on the CPU (label: cpu).
//
// can_implement() of each phase (phases.hpp), of the whole step and of the
// fused-linear step launches nothing and reads no device memory, so the checks
// run here on machines without a GPU: a valid problem passes, and each broken
// argument comes back as StatusCode::invalid_argument naming the public entry
// point and the argument. step_backward() is checked on the same inputs; its
// invalid calls return before any launch. Pointers are host addresses standing
// in for device ones (never dereferenced).
#include <catch2/catch.hpp>

#include <kto/cuda.hpp>
#include <kto/cuda/bind.hpp>
#include <kto/cuda/fused_linear.hpp>

#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace {

using kto::index_t;

/// `status` failed as invalid_argument with `fn` and `argument` in its message.
void expect_refused(const kto::cuda::Status& status, const std::string& fn,
                    const std::string& argument) {
  INFO("message: " << status.message);
  CHECK(status.code == kto::cuda::StatusCode::invalid_argument);
  CHECK(std::string(status.message).find(fn + ": argument '" + argument + "'") !=
        std::string::npos);
}

/// `good` with one argument broken by `brk`: can_implement refuses it, naming `argument`.
template <class Args, class Break>
void expect_refused_when(const Args& good, const std::string& fn, const std::string& argument,
                         Break&& brk) {
  Args bad = good;
  brk(bad);
  expect_refused(kto::cuda::can_implement(bad), fn, argument);
}

/// Host storage the views point into: 3 sequences over 7 rows of 11 logits.
struct Storage {
  static constexpr index_t kRows = 7, kVocab = 11, kSequences = 3;
  std::vector<float> logits = std::vector<float>(kRows * kVocab, 0.0f);
  std::vector<float> grad = std::vector<float>(kRows * kVocab, 0.0f);
  std::vector<index_t> targets = std::vector<index_t>(kRows, 1);
  std::vector<index_t> offsets = {0, 2, 5, 7};
  std::vector<float> per_sequence = std::vector<float>(8 * kSequences, 0.0f);
  std::vector<index_t> counts = std::vector<index_t>(kSequences, 1);
  std::vector<double> statistics = std::vector<double>(2 * kSequences, 0.0);
  std::vector<std::uint8_t> desirable = std::vector<std::uint8_t>(kSequences, 1);
  std::vector<float> row_lse = std::vector<float>(kRows, 0.0f);
  kto::KlPartial partial{};
  kto::Metrics metrics{};

  kto::LogitsView<const float> logits_view() const {
    return kto::logits_matrix<const float>(logits.data(), kRows, kVocab);
  }
  kto::LogitsView<float> grad_view() {
    return kto::logits_matrix<float>(grad.data(), kRows, kVocab);
  }
  kto::TargetsView targets_view() const { return kto::targets_vector(targets.data(), kRows); }
  kto::SequencesView sequences() const { return kto::sequences(offsets.data(), kSequences); }
  float* sequence_array(int k) { return per_sequence.data() + k * kSequences; }
  /// The target batch of a step (no KL batch).
  kto::cuda::StepInputs<float> step_inputs() {
    kto::cuda::StepInputs<float> in;
    in.policy_logits = logits_view();
    in.targets = targets_view();
    in.sequences = sequences();
    in.reference_logp = kto::reference_logp(sequence_array(1), kSequences);
    in.desirable = desirable.data();
    return in;
  }
};

}  // namespace

TEST_CASE("cuda checks: sequence_logprobs", "[cuda_checks]") {
  Storage st;
  kto::cuda::SequenceLogprobsArguments<float> a{st.logits_view(),     st.targets_view(),
                                                st.sequences(),       kto::Options{},
                                                st.sequence_array(0), st.counts.data()};
  const std::string fn = "kto::cuda::sequence_logprobs";
  CHECK(kto::cuda::can_implement(a).ok());
  CHECK(kto::cuda::workspace_bytes(a) == kto::cuda::sequence_logprobs_workspace_bytes(7));
  expect_refused_when(a, fn, "logp", [](auto& x) { x.logp = nullptr; });
  expect_refused_when(a, fn, "num_tokens", [](auto& x) { x.num_tokens = nullptr; });
  expect_refused_when(a, fn, "sequences.offsets", [](auto& x) { x.sequences.offsets = nullptr; });
  expect_refused_when(a, fn, "targets.rows", [](auto& x) { x.targets.rows.rows = 6; });
  auto bad = a;
  bad.options.token_statistics = true;  // and no statistics arrays
  expect_refused(kto::cuda::can_implement(bad), fn, "statistics.entropy_sum");
  bad.statistics = {st.statistics.data(), nullptr};
  expect_refused(kto::cuda::can_implement(bad), fn, "statistics.mean_logit_sum");
  bad.statistics = {st.statistics.data(), st.statistics.data() + 3};
  CHECK(kto::cuda::can_implement(bad).ok());
  expect_refused_when(a, fn, "options.logit_softcap",
                      [](auto& x) { x.options.logit_softcap = -1.0; });
  // The positional call runs the same checks (its workspace query never launches).
  size_t bytes = 0;
  expect_refused(
      kto::cuda::sequence_logprobs<float>(nullptr, bytes, a.logits, a.targets, a.sequences,
                                          a.options, nullptr, a.num_tokens, nullptr),
      fn, "logp");
  CHECK(kto::cuda::sequence_logprobs<float>(nullptr, bytes, a.logits, a.targets, a.sequences,
                                            a.options, a.logp, a.num_tokens, nullptr)
            .ok());
  CHECK(bytes == kto::cuda::workspace_bytes(a));
}

TEST_CASE("cuda checks: kl_partial and finish", "[cuda_checks]") {
  Storage st;
  const kto::cuda::KlPartialArguments k{kto::policy_logp(st.sequence_array(0), 3),
                                        kto::reference_logp(st.sequence_array(1), 3),
                                        st.counts.data(), kto::Options{}, &st.partial};
  const std::string kfn = "kto::cuda::kl_partial";
  CHECK(kto::cuda::can_implement(k).ok());
  CHECK(kto::cuda::workspace_bytes(k) > 0);
  expect_refused_when(k, kfn, "kl.reference_logp.size", [](auto& x) { x.reference_logp.size = 2; });
  expect_refused_when(k, kfn, "partial", [](auto& x) { x.partial = nullptr; });
  auto bad = k;
  bad.num_tokens = nullptr;
  CHECK(kto::cuda::can_implement(bad).ok());  // the mean estimator reads no counts
  bad.options.kl_estimator = kto::KlEstimator::nonempty_mean;
  expect_refused(kto::cuda::can_implement(bad), kfn, "kl.num_tokens");

  const kto::cuda::FinishArguments f{
      &st.partial,
      kto::policy_logp(st.sequence_array(0), 3),
      kto::reference_logp(st.sequence_array(1), 3),
      st.desirable.data(),
      kto::Options{},
      {st.sequence_array(2), st.sequence_array(3), st.sequence_array(4), st.sequence_array(5)},
      &st.metrics};
  const std::string ffn = "kto::cuda::finish";
  CHECK(kto::cuda::can_implement(f).ok());
  expect_refused_when(f, ffn, "policy_logp.size", [](auto& x) {
    x.policy_logp.size = 0;
    x.reference_logp.size = 0;
  });
  expect_refused_when(f, ffn, "desirable", [](auto& x) { x.desirable = nullptr; });
  expect_refused_when(f, ffn, "out", [](auto& x) { x.out.loss = nullptr; });
  expect_refused_when(f, ffn, "metrics", [](auto& x) { x.metrics = nullptr; });
  expect_refused_when(f, ffn, "options.beta", [](auto& x) { x.options.beta = 0.0; });
}

TEST_CASE("cuda checks: backward and step_backward name their own arguments", "[cuda_checks]") {
  Storage st;
  const kto::cuda::BackwardArguments<float> a{
      st.logits_view(),     st.targets_view(), st.sequences(), st.row_lse.data(),
      st.sequence_array(0), st.counts.data(),  kto::Options{}, st.grad_view()};
  const std::string fn = "kto::cuda::backward";
  CHECK(kto::cuda::can_implement(a).ok());
  expect_refused_when(a, fn, "row_lse", [](auto& x) { x.row_lse = nullptr; });
  expect_refused_when(a, fn, "grad_logp", [](auto& x) { x.grad_logp = nullptr; });
  expect_refused_when(a, fn, "grad.vocab", [](auto& x) { x.grad.vocab = 10; });

  // The same checks from the step's inputs and the forward's outputs, named as
  // step_backward's caller wrote them.
  kto::cuda::StepInputs<float> in = st.step_inputs();
  kto::cuda::StepOutputs fwd;
  fwd.row_lse = nullptr;
  fwd.num_tokens = st.counts.data();
  fwd.examples.grad_logp = st.sequence_array(0);
  const std::string sfn = "kto::cuda::step_backward";
  expect_refused(kto::cuda::step_backward<float>(in, fwd, kto::Options{}, st.grad_view(), nullptr),
                 sfn, "forward.row_lse");
  fwd.row_lse = st.row_lse.data();
  fwd.examples.grad_logp = nullptr;
  expect_refused(kto::cuda::step_backward<float>(in, fwd, kto::Options{}, st.grad_view(), nullptr),
                 sfn, "forward.examples.grad_logp");
  fwd.examples.grad_logp = st.sequence_array(0);
  in.sequences.count = 0;  // a step has at least one example
  in.sequences.offsets = st.offsets.data();
  expect_refused(kto::cuda::step_backward<float>(in, fwd, kto::Options{}, st.grad_view(), nullptr),
                 sfn, "policy_sequences.count");
}

TEST_CASE("cuda checks: kto_step's can_implement", "[cuda_checks]") {
  Storage st;
  kto::cuda::StepInputs<float> in = st.step_inputs();
  in.kl.policy_logp = kto::policy_logp(st.sequence_array(2), 3);
  in.kl.reference_logp = kto::reference_logp(st.sequence_array(3), 3);
  kto::cuda::StepOutputs out;
  out.metrics = &st.metrics;
  const std::string fn = "kto::cuda::kto_step";
  kto::Options o;
  CHECK(kto::cuda::can_implement<float>(in, o, st.grad_view(), out).ok());
  auto bad = in;
  bad.kl.reference_logp.size = 2;
  expect_refused(kto::cuda::can_implement<float>(bad, o, st.grad_view(), out), fn,
                 "kl.reference_logp.size");
  bad = in;
  bad.desirable = nullptr;
  expect_refused(kto::cuda::can_implement<float>(bad, o, st.grad_view(), out), fn, "desirable");
  o.token_statistics = true;
  expect_refused(kto::cuda::can_implement<float>(in, o, st.grad_view(), out), fn,
                 "out.token_statistics.entropy_sum");
  out.token_statistics = {st.statistics.data(), st.statistics.data() + 3};
  CHECK(kto::cuda::can_implement<float>(in, o, st.grad_view(), out).ok());
  o.logit_scale = 0.5;  // transforms are computed on CUDA too
  o.logit_softcap = 30.0;
  o.temperature = 0.7;
  CHECK(kto::cuda::can_implement<float>(in, o, st.grad_view(), out).ok());
  o.temperature = 0.0;
  expect_refused(kto::cuda::can_implement<float>(in, o, st.grad_view(), out), fn,
                 "options.temperature");
}

/// A valid fused-linear step over Storage's batch: D = 4, fp32 outputs, no KL batch.
struct FusedStep {
  static constexpr index_t D = 4;
  Storage st;
  std::vector<float> hidden = std::vector<float>(Storage::kRows * D);
  std::vector<float> weight = std::vector<float>(Storage::kVocab * D);
  std::vector<float> d_hidden = hidden, d_weight = weight;
  std::vector<float> bias = std::vector<float>(Storage::kVocab),
                     d_bias = bias;  // unused unless set
  kto::cuda::FusedLinearInputs<float> in;
  kto::LinearHead<float> head;
  kto::cuda::FusedLinearOutputs out;
  kto::Options o;
  FusedStep() {
    in.hidden = kto::matrix_view<const float>(hidden.data(), Storage::kRows, D);
    in.targets = st.targets_view();
    in.sequences = st.sequences();
    in.reference_logp = kto::reference_logp(st.sequence_array(1), 3);
    in.desirable = st.desirable.data();
    head.weight = kto::matrix_view<const float>(weight.data(), Storage::kVocab, D);
    out.metrics = &st.metrics;
    out.d_hidden = kto::matrix_view(d_hidden.data(), Storage::kRows, D);
    out.d_weight = kto::matrix_view(d_weight.data(), Storage::kVocab, D);
    o.reference_point = kto::ReferencePoint::zero;  // no KL batch needed
  }
  FusedStep(const FusedStep&) = delete;
};

TEST_CASE("cuda checks: the fused-linear step's can_implement", "[cuda_checks]") {
  FusedStep f;
  Storage& st = f.st;
  auto [in, head, out, o] = std::tie(f.in, f.head, f.out, f.o);
  constexpr index_t D = FusedStep::D;
  std::vector<float>& d_weight = f.d_weight;
  const std::string fn = "kto::cuda::fused_linear_kto_step";
  CHECK(kto::cuda::can_implement<float>(in, head, o, out).ok());
  o.token_statistics = true;
  expect_refused(kto::cuda::can_implement<float>(in, head, o, out), fn,
                 "out.token_statistics.entropy_sum");
  out.token_statistics = {st.statistics.data(), st.statistics.data() + 3};
  o.logit_softcap = 30.0;
  CHECK(kto::cuda::can_implement<float>(in, head, o, out).ok());
  auto bad = out;
  bad.d_weight = kto::matrix_view(d_weight.data(), Storage::kVocab - 1, D);
  expect_refused(kto::cuda::can_implement<float>(in, head, o, bad), fn, "out.d_weight");
  // Compact scoring: host targets need the host offsets too; with both, the plan counts
  // the scored rows per sequence as the device will.
  auto compact = in;
  compact.host_targets = st.targets.data();
  expect_refused(kto::cuda::can_implement<float>(compact, head, o, out), fn, "host_offsets");
  compact.host_offsets = st.offsets.data();
  CHECK(kto::cuda::can_implement<float>(compact, head, o, out).ok());
  st.targets[1] = -100;  // sequence 0 keeps one scored row
  st.targets[5] = -100;  // sequence 2's first row
  const auto plan = kto::cuda::detail::compact_plan(st.targets.data(), in.targets.rows,
                                                    st.offsets.data(), 3, -100);
  CHECK(plan.on);
  CHECK(plan.offsets == std::vector<index_t>{0, 1, 4, 5});
  CHECK(plan.rows() == 5);
}

TEST_CASE("cuda checks: vocab_blocks and dW in the input type", "[cuda_checks]") {
  FusedStep f;
  constexpr index_t D = FusedStep::D;
  const auto& [in, head, o, fp32] = std::tie(f.in, f.head, f.o, f.out);
  auto typed = fp32;
  typed.d_weight = {};
  typed.d_weight_in_input_type = kto::MatrixView<void>{f.d_weight.data(), Storage::kVocab, D, D};
  kto::cuda::FusedLinearConfig cfg;
  cfg.strategy = kto::FusedStrategy::vocab_blocks;
  const std::string fn = "kto::cuda::fused_linear_kto_step";
  CHECK(kto::cuda::can_implement<float>(in, head, o, fp32, cfg).ok());
  CHECK(kto::cuda::can_implement<float>(in, head, o, typed, cfg).ok());
  auto both = typed;
  both.d_weight = fp32.d_weight;
  expect_refused(kto::cuda::can_implement<float>(in, head, o, both, cfg), fn, "out.d_weight");
  auto wrong_shape = typed;
  wrong_shape.d_weight_in_input_type.cols = D - 1;
  expect_refused(kto::cuda::can_implement<float>(in, head, o, wrong_shape, cfg), fn,
                 "out.d_weight_in_input_type");
  auto over_weight = typed;  // dW written over the weight it is read from
  over_weight.d_weight_in_input_type.data = f.weight.data();
  expect_refused(kto::cuda::can_implement<float>(in, head, o, over_weight, cfg), fn,
                 "out.d_weight_in_input_type");
  for (const auto other : {kto::FusedStrategy::keep_chunk, kto::FusedStrategy::recompute}) {
    auto row_chunks = cfg;
    row_chunks.strategy = other;
    expect_refused(kto::cuda::can_implement<float>(in, head, o, typed, row_chunks), fn,
                   "out.d_weight_in_input_type");
  }
  auto unknown = cfg;
  unknown.strategy = static_cast<kto::FusedStrategy>(3);
  expect_refused(kto::cuda::can_implement<float>(in, head, o, fp32, unknown), fn,
                 "config.strategy");
}

TEST_CASE("cuda checks: a frozen head (no dW, no db) is accepted, its workspace smaller",
          "[cuda_checks][frozen]") {
  // Empty d_weight (and d_weight_in_input_type) and d_bias views ask for no dW and no db,
  // each on its own, for every strategy and a vocabulary slice. A view that is given is
  // checked as before. The workspace gives back the db GEMV's ones without db; dW never
  // had workspace (its GEMM writes the caller's array, which a frozen head does without).
  FusedStep f;
  const kto::cuda::FusedLinearInputs<float>& in = f.in;
  kto::LinearHead<float>& head = f.head;
  const kto::Options& o = f.o;
  kto::cuda::FusedLinearOutputs& full = f.out;
  constexpr index_t D = FusedStep::D, V = Storage::kVocab;
  const std::string fn = "kto::cuda::fused_linear_kto_step";
  head.bias = kto::make_span<const float>(f.bias.data(), V);
  full.d_bias = kto::make_span(f.d_bias.data(), V);
  auto frozen = full;  // LoRA: neither
  frozen.d_weight = {};
  frozen.d_bias = {};
  auto bias_only = frozen;  // a trainable bias on a frozen weight
  bias_only.d_bias = full.d_bias;
  auto weight_only = full;
  weight_only.d_bias = {};
  kto::cuda::RowPartialsAllGather gather;  // a vocabulary slice: rows [5, 5 + V) of V + 9
  gather.ranks = 2;
  gather.gather = [](const kto::RowPartial<float>*, kto::RowPartial<float>*, index_t,
                     cudaStream_t) { return kto::cuda::Status::success(); };
  auto slice = head;
  slice.vocab_begin = 5;
  slice.vocab_total = V + 9;
  for (const auto strategy : {kto::FusedStrategy::keep_chunk, kto::FusedStrategy::recompute,
                              kto::FusedStrategy::vocab_blocks}) {
    for (const bool sharded : {false, true}) {
      if (sharded && strategy == kto::FusedStrategy::vocab_blocks) continue;  // refused
      kto::cuda::FusedLinearConfig cfg;
      cfg.strategy = strategy;
      const auto& h = sharded ? slice : head;
      const auto& g = sharded ? gather : kto::cuda::RowPartialsAllGather{};
      INFO("strategy " << int(strategy) << " sharded " << sharded);
      for (const auto* out : {&full, &frozen, &bias_only, &weight_only})
        CHECK(kto::cuda::can_implement<float>(in, h, o, *out, cfg, g).ok());
      auto bytes = [&](const kto::cuda::FusedLinearOutputs& out) {
        return kto::cuda::fused_linear_workspace_bytes<float>(in, h, out, cfg, g);
      };
      CHECK(bytes(full) == kto::cuda::fused_linear_workspace_bytes<float>(in, h, cfg, g));
      CHECK(bytes(bias_only) == bytes(full));
      CHECK(bytes(frozen) == bytes(weight_only));
      CHECK(bytes(full) - bytes(frozen) == 256);  // 7 rows of float ones, 256-byte aligned
      const kto::cuda::FusedLinearArguments<float> args{in, h, o, frozen, cfg, {{}, g}};
      CHECK(kto::cuda::can_implement(args).ok());
      CHECK(kto::cuda::workspace_bytes(args) == bytes(frozen));
    }
  }
  // dW in the input type is dW too: with vocab_blocks, given or left out with d_weight.
  kto::cuda::FusedLinearConfig blocks;
  blocks.strategy = kto::FusedStrategy::vocab_blocks;
  auto typed = frozen;
  typed.d_weight_in_input_type = kto::MatrixView<void>{f.d_weight.data(), V, D, D};
  CHECK(kto::cuda::can_implement<float>(in, head, o, typed, blocks).ok());
  typed.d_weight_in_input_type.data = nullptr;  // rows without a buffer
  expect_refused(kto::cuda::can_implement<float>(in, head, o, typed, blocks), fn,
                 "out.d_weight_in_input_type.data");
  // A view that is given is checked as before: rows without a buffer, a buffer without
  // rows, the wrong rows; a db of the wrong size or without a buffer.
  auto refused = [&](auto&& brk, const std::string& argument) {
    auto bad = frozen;
    brk(bad);
    expect_refused(kto::cuda::can_implement<float>(in, head, o, bad), fn, argument);
  };
  refused(
      [&](auto& x) {
        x.d_weight = kto::MatrixView<float>{nullptr, V, D, D};
      },
      "out.d_weight.data");
  refused(
      [&](auto& x) {
        x.d_weight = kto::MatrixView<float>{f.d_weight.data(), 0, D, D};
      },
      "out.d_weight");
  refused([&](auto& x) { x.d_weight = kto::matrix_view(f.d_weight.data(), V - 1, D); },
          "out.d_weight");
  refused([&](auto& x) { x.d_bias = kto::make_span(f.d_bias.data(), V - 1); }, "out.d_bias.size");
  refused([&](auto& x) { x.d_bias = kto::Span<float>{nullptr, V}; }, "out.d_bias.data");
  // At scale (bf16, N = 16384, V = 128256, 1 GB chunks: 1395 rows of fp32 logits and bf16
  // gradient), no db gives back 1395 bf16 ones rounded up to 256 bytes; vocab_blocks sums
  // every row at once, 16384 of them.
  kto::LinearHead<__nv_bfloat16> big;
  big.weight = kto::matrix_view<const __nv_bfloat16>(nullptr, 128256, 1024);
  kto::cuda::FusedLinearInputs<__nv_bfloat16> batch;
  batch.hidden.rows = 16384;
  batch.sequences.count = 32;
  kto::cuda::FusedLinearOutputs with_db, without_db;
  with_db.d_bias.size = 128256;
  kto::cuda::FusedLinearConfig cfg;
  cfg.chunk_bytes = size_t{1} << 30;
  REQUIRE(kto::cuda::detail::ChunkShape<__nv_bfloat16>(128256, cfg.chunk_bytes, 16384).rows ==
          1395);
  for (const auto strategy : {kto::FusedStrategy::keep_chunk, kto::FusedStrategy::recompute,
                              kto::FusedStrategy::vocab_blocks}) {
    cfg.strategy = strategy;
    const size_t saved = strategy == kto::FusedStrategy::vocab_blocks ? 32768 : 2816;
    CHECK(kto::cuda::fused_linear_workspace_bytes(batch, big, with_db, cfg) -
              kto::cuda::fused_linear_workspace_bytes(batch, big, without_db, cfg) ==
          saved);
  }
}

TEST_CASE("cuda checks: vocab block geometry", "[cuda_checks]") {
  using Shape = kto::cuda::detail::VocabBlockShape;
  constexpr index_t kMin = Shape::kMinCols;
  // Wide enough budgets: the most whole multiples of kMinCols the chunk holds over the rows.
  CHECK(Shape(128256, size_t{16384} * 1000, 16384).cols == 960);
  CHECK(Shape(128256, size_t{100} * 1000, 100).cols == 960);
  // One block when the chunk holds every column; its width rounded up to kMinCols.
  CHECK(Shape(123, size_t{1} << 30, 7).cols == 128);
  CHECK(Shape(37, size_t{1} << 30, 7).cols == kMin);
  // A budget under kMinCols columns still gets kMinCols (the carve reserves rows x kMinCols).
  CHECK(Shape(128256, 10, 7).cols == kMin);
  CHECK(Shape(128256, 1000, 0).cols == kMin);
  for (const index_t rows : {1, 3, 1000, 16384})
    for (const size_t elements : {size_t{64}, size_t{5000}, size_t{1} << 20, size_t{1} << 28}) {
      const Shape s(50257, elements, rows);
      INFO("rows " << rows << " elements " << elements << " cols " << s.cols);
      CHECK(s.cols % kMin == 0);
      CHECK(s.cols >= kMin);
      CHECK(s.cols <= 50304);  // 50257 rounded up to kMinCols
      if (elements >= static_cast<size_t>(rows * kMin))
        CHECK(static_cast<size_t>(rows * s.cols) <= elements);
    }
}

TEST_CASE("cuda checks: FusedLinearArguments, the fused-linear step in CUTLASS's shape",
          "[cuda_checks]") {
  FusedStep f;
  const kto::cuda::FusedLinearArguments<float> args{f.in, f.head, f.o, f.out, {}, {}};
  const std::string fn = "kto::cuda::fused_linear_kto_step";
  CHECK(kto::cuda::can_implement(args).ok());
  CHECK(kto::cuda::workspace_bytes(args) ==
        kto::cuda::fused_linear_workspace_bytes(f.in, f.head, f.out));
  // Without outputs the query answers for any (dW and db asked): no less.
  CHECK(kto::cuda::workspace_bytes(args) <= kto::cuda::fused_linear_workspace_bytes(f.in, f.head));
  expect_refused_when(args, fn, "desirable", [](auto& a) { a.inputs.desirable = nullptr; });
  expect_refused_when(args, fn, "out.d_weight", [](auto& a) { a.outputs.d_weight.rows -= 1; });
  expect_refused_when(args, fn, "config.chunk_bytes", [](auto& a) { a.config.chunk_bytes = 0; });
  expect_refused_when(args, fn, "gather_partials", [](auto& a) {  // the head is whole
    a.hooks.gather_partials.ranks = 2;
    a.hooks.gather_partials.gather = [](const kto::RowPartial<float>*, kto::RowPartial<float>*,
                                        index_t,
                                        cudaStream_t) { return kto::cuda::Status::success(); };
  });
  // run() checks first: a refused call answers no size; then the handle, by name.
  auto bad = args;
  bad.inputs.desirable = nullptr;
  size_t bytes = 0;
  expect_refused(kto::cuda::run(nullptr, nullptr, bytes, bad, nullptr), fn, "desirable");
  CHECK(bytes == 0);
  expect_refused(kto::cuda::run(nullptr, nullptr, bytes, args, nullptr), fn, "handle");
  CHECK(bytes == 0);
}

TEST_CASE("cuda checks: vocab-parallel slices need the gather and refuse what it cannot carry",
          "[cuda_checks]") {
  FusedStep f;
  auto [in, head, o, out] = std::tie(f.in, f.head, f.o, f.out);
  head.vocab_begin = 5;  // this rank: rows [5, 5 + kVocab) of a vocabulary of kVocab + 9
  head.vocab_total = Storage::kVocab + 9;
  const std::string fn = "kto::cuda::fused_linear_kto_step";
  kto::cuda::RowPartialsAllGather gather;
  gather.ranks = 2;
  gather.gather = [](const kto::RowPartial<float>*, kto::RowPartial<float>*, index_t,
                     cudaStream_t) { return kto::cuda::Status::success(); };
  const kto::cuda::FusedLinearConfig cfg;
  CHECK(kto::cuda::can_implement<float>(in, head, o, out, cfg, gather).ok());
  expect_refused(kto::cuda::can_implement<float>(in, head, o, out, cfg), fn, "gather_partials");
  for (const index_t bad : {index_t{0}, index_t{1}, Storage::kVocab + 10, index_t{1} << 61}) {
    auto wrong = gather;  // fewer than two slices, more than the vocabulary's columns
    wrong.ranks = bad;
    expect_refused(kto::cuda::can_implement<float>(in, head, o, out, cfg, wrong), fn,
                   "gather_partials.ranks");
  }
  auto whole = head;  // a gather the step would never call: the other ranks would wait
  whole.vocab_begin = 0;
  whole.vocab_total = 0;
  expect_refused(kto::cuda::can_implement<float>(in, whole, o, out, cfg, gather), fn,
                 "gather_partials");
  auto blocks = cfg;
  blocks.strategy = kto::FusedStrategy::vocab_blocks;
  expect_refused(kto::cuda::can_implement<float>(in, head, o, out, blocks, gather), fn,
                 "config.strategy");
  auto statistics = o;
  statistics.token_statistics = true;
  out.token_statistics = {f.st.statistics.data(), f.st.statistics.data() + 3};
  expect_refused(kto::cuda::can_implement<float>(in, head, statistics, out, cfg, gather), fn,
                 "options.token_statistics");
  auto past = head;  // the slice runs past the vocabulary
  past.vocab_begin = 10;
  expect_refused(kto::cuda::can_implement<float>(in, past, o, out, cfg, gather), fn,
                 "head.vocab_begin");
  // The workspace holds ranks x (KL rows + rows) gathered partials besides the local ones.
  auto eight = gather;
  eight.ranks = 8;
  CHECK(kto::cuda::fused_linear_workspace_bytes(in, head, cfg, eight) >
        kto::cuda::fused_linear_workspace_bytes(in, head, cfg, gather));
  CHECK(kto::cuda::fused_linear_workspace_bytes(in, head, cfg, gather) >
        kto::cuda::fused_linear_workspace_bytes(in, head, cfg));
  // Partials gathered ahead of the step: accepted instead of the gather, never with it.
  // Their count: ranks x (the KL rows, when the step uses the KL batch, + the rows).
  const bool kl_used = kto::uses_kl_batch(o) && in.kl.sequences.count > 0;
  const index_t rows = (kl_used ? in.kl.hidden.rows : 0) + in.hidden.rows;
  std::vector<kto::RowPartial<float>> ahead(static_cast<size_t>(2 * rows));
  auto given = gather;
  given.gather = {};
  given.gathered = kto::make_span(ahead);
  CHECK(kto::cuda::can_implement<float>(in, head, o, out, cfg, given).ok());
  // Gathered ahead, the step carves no room for a gather.
  CHECK(kto::cuda::fused_linear_workspace_bytes(in, head, cfg, given) ==
        kto::cuda::fused_linear_workspace_bytes(in, head, cfg));
  for (const index_t size : {2 * rows - 1, 2 * rows + 1, rows, 3 * rows}) {
    auto short_or_long = given;
    short_or_long.gathered.size = size;
    expect_refused(kto::cuda::can_implement<float>(in, head, o, out, cfg, short_or_long), fn,
                   "gather_partials.gathered.size");
  }
  auto both = gather;
  both.gathered = kto::make_span(ahead);
  expect_refused(kto::cuda::can_implement<float>(in, head, o, out, cfg, both), fn,
                 "gather_partials.gathered");
  expect_refused(kto::cuda::can_implement<float>(in, whole, o, out, cfg, given), fn,
                 "gather_partials");
  // A slice's partials, gathered ahead: checked before anything runs, by their own name.
  const std::string rp = "kto::cuda::fused_linear_row_partials";
  size_t rp_bytes = 0;
  const auto& batch = f.in;  // (structured bindings cannot be captured in C++17)
  auto row_partials = [&](const kto::LinearHead<float>& h, const kto::Options& opts,
                          kto::RowPartial<float>* into) {
    return kto::cuda::fused_linear_row_partials<float>(nullptr, nullptr, rp_bytes, batch.hidden,
                                                       batch.targets, batch.sequences, h, opts,
                                                       into, nullptr);
  };
  expect_refused(row_partials(head, o, ahead.data()), rp, "handle");  // every argument passed
  expect_refused(row_partials(head, o, nullptr), rp, "partials");
  expect_refused(row_partials(head, statistics, ahead.data()), rp, "options.token_statistics");
  expect_refused(row_partials(past, o, ahead.data()), rp, "head.vocab_begin");
  expect_refused(kto::cuda::fused_linear_row_partials<float>(
                     nullptr, nullptr, rp_bytes, batch.hidden, batch.targets, batch.sequences, head,
                     o, ahead.data(), nullptr, kto::cuda::FusedLinearConfig{0}),
                 rp, "config.chunk_bytes");
  CHECK(rp_bytes == 0);
  CHECK(kto::cuda::fused_linear_row_partials_workspace_bytes(in.hidden.rows, head) > 0);
  // The forward-only entry takes whole heads only (slices merge in the step).
  float logp[3];
  index_t num_tokens[3];
  size_t bytes = 0;
  expect_refused(
      kto::cuda::fused_linear_logprobs<float>(nullptr, nullptr, bytes, in.hidden, in.targets,
                                              in.sequences, head, o, logp, num_tokens, nullptr),
      "kto::cuda::fused_linear_logprobs", "head.vocab_total");
}

TEST_CASE("cuda checks: random fused-step arguments are refused by name or carve sanely",
          "[cuda_checks]") {
  // A checker for the checks one forgot: mutate a valid fused step at random (sizes,
  // strides, slices, outputs, strategy, budget, gather) and require can_implement either
  // to refuse with invalid_argument naming the entry point and an argument, or to accept
  // a problem whose workspace query does not wrap around (it holds at least the row
  // scalars and one hidden row per scored row).
  const uint64_t seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto pick = [&](std::initializer_list<index_t> values) {
    return values.begin()[rng() % values.size()];
  };
  const std::string fn = "kto::cuda::fused_linear_kto_step";
  index_t accepted = 0, refused = 0;
  for (int it = 0; it < 4000; ++it) {
    FusedStep f;
    auto [in, head, o, out] = std::tie(f.in, f.head, f.o, f.out);
    kto::cuda::FusedLinearConfig cfg;
    kto::cuda::RowPartialsAllGather gather;
    const int mutations = 1 + static_cast<int>(rng() % 3);
    for (int m = 0; m < mutations; ++m) switch (rng() % 13) {
        case 0:
          in.hidden.rows = pick({-1, 0, 3, Storage::kRows, index_t{1} << 31, index_t{1} << 40});
          break;
        case 1:
          in.hidden.stride = pick({-4, 0, 2, FusedStep::D, FusedStep::D + 3, index_t{1} << 31});
          break;
        case 2:
          head.weight.rows = pick({-1, 0, 1, Storage::kVocab, index_t{1} << 31});
          break;
        case 3:
          head.vocab_begin = pick({-1, 0, 2, 5, Storage::kVocab});
          head.vocab_total = pick(
              {0, Storage::kVocab - 1, Storage::kVocab, Storage::kVocab + 7, index_t{1} << 40});
          break;
        case 4:
          gather.ranks = pick({-1, 0, 1, 2, 3, 1 << 16, index_t{1} << 20, index_t{1} << 62});
          gather.gather = [](const kto::RowPartial<float>*, kto::RowPartial<float>*, index_t,
                             cudaStream_t) { return kto::cuda::Status::success(); };
          break;
        case 5:
          cfg.strategy = static_cast<kto::FusedStrategy>(pick({-1, 0, 1, 2, 3}));
          break;
        case 6:
          cfg.chunk_bytes = static_cast<size_t>(pick({0, 1, 4096, index_t{1} << 40}));
          break;
        case 7:  // dW in the input type instead of fp32, or both, or over an input
          out.d_weight_in_input_type =
              kto::MatrixView<void>{rng() % 2 ? f.d_weight.data() : f.weight.data(),
                                    Storage::kVocab, FusedStep::D, FusedStep::D};
          if (rng() % 2) out.d_weight = {};
          break;
        case 8:
          out.d_hidden.stride = pick({0, FusedStep::D - 1, FusedStep::D, FusedStep::D * 2});
          break;
        case 9:
          o.reference_point = kto::ReferencePoint::kl_batch;
          in.kl.hidden =
              kto::matrix_view<const float>(f.hidden.data(), pick({-3, 0, 4}), FusedStep::D);
          in.kl.targets = kto::targets_vector(f.st.targets.data(), in.kl.hidden.rows);
          in.kl.sequences = kto::sequences(f.st.offsets.data(), pick({0, 1, 3}));
          in.kl.reference_logp = kto::reference_logp(f.st.sequence_array(2), 3);
          break;
        case 11:  // a frozen head, a bias gradient, or a gradient view half given
          switch (rng() % 4) {
            case 0:
              out.d_weight = {};
              break;
            case 1:
              out.d_bias =
                  kto::make_span(f.d_bias.data(), pick({0, Storage::kVocab - 1, Storage::kVocab}));
              break;
            case 2:
              out.d_weight =
                  kto::MatrixView<float>{rng() % 2 ? f.d_weight.data() : nullptr,
                                         pick({0, 1, Storage::kVocab}), FusedStep::D, FusedStep::D};
              break;
            default:
              out.d_bias = kto::Span<float>{nullptr, pick({0, Storage::kVocab})};
              break;
          }
          break;
        case 10:
          o.token_statistics = rng() % 2;
          if (rng() % 2)
            out.token_statistics = {f.st.statistics.data(), f.st.statistics.data() + 3};
          break;
        default:
          in.host_targets = rng() % 2 ? f.st.targets.data() : nullptr;
          in.host_offsets = rng() % 2 ? f.st.offsets.data() : nullptr;
          break;
      }
    const kto::cuda::Status s = kto::cuda::can_implement<float>(in, head, o, out, cfg, gather);
    if (!s.ok()) {
      ++refused;
      INFO("iteration " << it << ": " << s.message);
      CHECK(s.code == kto::cuda::StatusCode::invalid_argument);
      CHECK(std::string(s.message).rfind(fn + ": argument '", 0) == 0);
      continue;
    }
    ++accepted;
    const size_t bytes = kto::cuda::fused_linear_workspace_bytes<float>(in, head, cfg, gather);
    // The query without outputs is the most any outputs need (dW and db asked for).
    CHECK(kto::cuda::fused_linear_workspace_bytes<float>(in, head, out, cfg, gather) <= bytes);
    const size_t floor =
        sizeof(float) * static_cast<size_t>(in.hidden.rows) *
        (1 + (cfg.strategy == kto::FusedStrategy::vocab_blocks ? static_cast<size_t>(FusedStep::D)
                                                               : 0));
    INFO("iteration " << it << ": rows " << in.hidden.rows << " bytes " << bytes);
    CHECK(bytes >= floor);
  }
  CHECK(accepted > 100);  // both sides of the checks were reached
  CHECK(refused > 100);
}

// ---------------------------------------------------------------- binding core --

namespace {

/// A binding's fused call (kto/bind/arguments.hpp) over host storage standing in for
/// device memory: 3 sequences over 7 rows, D = 4, V = 11, z0 from a given (S, C).
struct BindCall {
  static constexpr index_t N = 7, D = 4, V = 11, B = 3;
  std::vector<float> hidden = std::vector<float>(N * D), weight = std::vector<float>(V * D),
                     bias = std::vector<float>(V), reference = std::vector<float>(B),
                     per_example = std::vector<float>(5 * B), dh = std::vector<float>(N * D),
                     dw = std::vector<float>(V * D), db = std::vector<float>(V),
                     global_kl = {1.0f, 3.0f};
  std::vector<index_t> targets = std::vector<index_t>(N, 1), offsets = {0, 2, 5, 7},
                       counts = std::vector<index_t>(B);
  std::vector<std::uint8_t> desirable = std::vector<std::uint8_t>(B, 1);
  std::vector<double> metrics = std::vector<double>(kto::kMetricCount);
  std::vector<kto::RowPartial<float>> gathered = std::vector<kto::RowPartial<float>>(2 * N);
  kto::Metrics m{};
  kto::bind::FusedLinearCall call;

  explicit BindCall(kto::bind::DType dtype = kto::bind::DType::f32) {
    namespace bind = kto::bind;
    call.hidden = bind::matrix(dtype, hidden.data(), N, D);
    call.batch = {kto::targets_vector(targets.data(), N), kto::sequences(offsets.data(), B)};
    call.reference_logp = kto::make_span<const float>(reference.data(), B);
    call.desirable = desirable.data();
    call.head = {bind::matrix(dtype, weight.data(), V, D), bias.data(), V};
    call.outputs = {metrics.data(), bind::DType::f64, per_example.data(),
                    counts.data(),  nullptr,          nullptr};
    call.gradients = {dh.data(), dw.data(), bind::DType::f32, db.data()};
    call.global_kl = {bind::DType::f32, global_kl.data()};
  }

  /// can_implement of the library arguments the core builds from `c`.
  template <class T>
  kto::cuda::Status check(const kto::bind::FusedLinearCall& c) {
    return kto::cuda::can_implement(kto::bind::cuda_detail::fused_arguments<T>(c, &m));
  }
};

}  // namespace

TEST_CASE("cuda checks: the binding core's fused call is a step the library accepts",
          "[cuda_checks]") {
  namespace bind = kto::bind;
  const std::string fn = "kto::cuda::fused_linear_kto_step";
  BindCall b;
  auto& c = b.call;
  SECTION("z0 from global_kl: no KL batch of its own, reference_point kl_batch") {
    const auto s = b.check<float>(c);
    INFO("message: " << s.message);
    CHECK(s.ok());
  }
  SECTION("compact scoring: the host copies of the ids reach the step") {
    const auto compact =
        bind::CompactBatch::of(b.targets.data(), BindCall::N, b.offsets.data(), BindCall::B);
    auto cc = c;
    cc.batch = compact.applied_to(c.batch);
    CHECK(cc.batch.host_targets == compact.targets.data());
    CHECK(compact.offsets == b.offsets);
    CHECK(b.check<float>(cc).ok());
    const auto args = bind::cuda_detail::fused_arguments<float>(cc, &b.m);
    CHECK(args.inputs.host_offsets == compact.offsets.data());
    auto broken = compact;  // offsets past the rows: the library's check names them
    broken.offsets.back() = BindCall::N + 1;
    cc.batch = broken.applied_to(c.batch);
    expect_refused(b.check<float>(cc), fn, "host_offsets.offsets[3]");
  }
  SECTION("dW in the input type goes with vocab_blocks only") {
    BindCall h(bind::DType::f16);
    auto hc = h.call;
    hc.gradients.d_weight_dtype = bind::DType::f16;
    expect_refused(h.check<__half>(hc), fn, "out.d_weight_in_input_type");
    hc.strategy = kto::FusedStrategy::vocab_blocks;
    CHECK(h.check<__half>(hc).ok());
    hc.gradients.d_weight_dtype = bind::DType::bf16;  // neither fp32 nor hidden's dtype
    std::size_t bytes = 0;
    const std::string message = bind::fused_linear_kto_step(hc, nullptr, &bytes, nullptr);
    CHECK(message.find(fn + ": argument 'd_weight' must be float32 or hidden's dtype (float16); "
                            "got bfloat16") != std::string::npos);
  }
  SECTION("a vocabulary slice takes every slice's gathered partials through the hook") {
    c.head.vocab_total = 2 * BindCall::V;
    expect_refused(b.check<float>(c), fn, "gather_partials");
    c.vocab = {2, BindCall::N, b.gathered.data()};
    CHECK(b.check<float>(c).ok());
  }
  SECTION("the workspace query: the library's bytes and the core's metrics") {
    std::size_t bytes = 0;
    CHECK(bind::fused_linear_kto_step(c, nullptr, &bytes, nullptr).empty());
    const auto args = bind::cuda_detail::fused_arguments<float>(c, nullptr);
    CHECK(bytes ==
          bind::cuda_detail::round_up(kto::cuda::workspace_bytes(args)) + sizeof(kto::Metrics));
  }
  SECTION("a dtype the CUDA path does not take is refused by name") {
    c.hidden.dtype = bind::DType::f64;
    std::size_t bytes = 0;
    CHECK(bind::fused_linear_kto_step(c, nullptr, &bytes, nullptr) ==
          fn + ": argument 'hidden' must be float32, bfloat16 or float16; got float64");
  }
}

TEST_CASE("cuda checks: a library message raised as the CPU path raises it", "[cuda_checks]") {
  using kto::bind::raise_library_error;
  try {
    raise_library_error(
        "kto::cuda::read_status: argument 'logits' must be finite on scored "
        "rows; got nan in sequence 2, row 5");
    FAIL("no exception");
  } catch (const kto::NonFiniteLogitsError& e) {
    CHECK(e.function() == "kto::cuda::read_status");
    CHECK(e.sequence() == 2);
    CHECK(e.row() == 5);
  }
  try {
    raise_library_error("kto::cuda::step_forward: argument 'options.beta' must be > 0; got 0");
    FAIL("no exception");
  } catch (const kto::NonFiniteLogitsError&) {
    FAIL("not a non-finite logit");
  } catch (const kto::Error& e) {
    CHECK(e.argument() == "options.beta");
  }
  CHECK_THROWS_AS(raise_library_error("kto::cuda::read_status: CUDA error cudaErrorLaunchFailure"),
                  std::runtime_error);
  CHECK(kto::bind::message_of([]() -> std::string {
          throw kto::Error("f", "x", "f: argument 'x' must be 1; got 2");
        }) == "f: argument 'x' must be 1; got 2");
}
