// The CUDA path against the float64 reference (label: gpu).
//
// Every test draws fresh inputs, poisons every output buffer (0xFF bytes: NaN
// for float/half/bf16, -1 for counts), runs the kernels and checks each output
// element under the tolerance rule of problem.hpp; repeat runs must be
// bit-identical and a graph-captured run must equal the eager one.
#include <catch2/catch.hpp>

#include <kto/cuda.hpp>

#include <cstring>
#include <functional>
#include <vector>

#include "../compare.hpp"
#include "../problem.hpp"
#include "../reference.hpp"
#include "device_support.cuh"

namespace {

using kto::index_t;
using test::Layout;

/// One target batch and one KL batch, on the host and on the device.
template <class T>
struct Case {
  test::Plan plan, kl_plan;
  std::vector<T> logits, kl_logits;
  std::vector<index_t> targets, kl_targets;
  std::vector<float> ref_logp, kl_ref_logp, kl_policy_logp;  // kl_policy_logp: exact, from ref
  std::vector<index_t> kl_tokens;
  std::vector<std::uint8_t> desirable;

  Case(std::mt19937_64& rng, Layout layout, const test::ShapeSpec& spec, const kto::Options& o,
       int labels = -1) {
    auto round = [](double x) { return Type<T>::up(Type<T>::from(x)); };
    plan = test::make_plan(rng, layout, spec, o.ignore_index, round);
    test::fill_storage(plan, Type<T>::from(NAN), Type<T>::from, logits, targets);
    test::ShapeSpec kl_spec = spec;
    kl_spec.sequences = spec.sequences + 1;
    kl_plan = test::make_plan(rng, Layout::packed, kl_spec, o.ignore_index, round);
    test::fill_storage(kl_plan, Type<T>::from(NAN), Type<T>::from, kl_logits, kl_targets);

    const ref::Forward f = ref::forward(plan.problem, o.ignore_index, o.average_logprob);
    const ref::Forward kf = ref::forward(kl_plan.problem, o.ignore_index, o.average_logprob);
    std::normal_distribution<double> noise(0.0, 0.5);
    std::bernoulli_distribution coin(0.4);
    for (index_t s = 0; s < plan.problem.num_sequences(); ++s) {
      ref_logp.push_back(static_cast<float>(f.logp[s] + noise(rng)));
      desirable.push_back(labels < 0 ? std::uint8_t(coin(rng)) : std::uint8_t(labels));
    }
    for (index_t j = 0; j < kl_plan.problem.num_sequences(); ++j) {
      kl_policy_logp.push_back(static_cast<float>(kf.logp[j]));
      kl_ref_logp.push_back(static_cast<float>(kf.logp[j] - 0.3 + noise(rng)));
      kl_tokens.push_back(kf.num_tokens[j]);
    }
  }

  /// The reference step; the KL policy log-probs are the float64 forward's.
  ref::Step reference(const kto::Options& o) const {
    const ref::Forward kf = ref::forward(kl_plan.problem, o.ignore_index, o.average_logprob);
    std::vector<double> kl_rho;
    for (size_t j = 0; j < kl_ref_logp.size(); ++j) kl_rho.push_back(kf.logp[j] - kl_ref_logp[j]);
    return ref::step(plan.problem, std::vector<double>(ref_logp.begin(), ref_logp.end()), desirable,
                     kl_rho, kf.num_tokens, o);
  }
};

template <class T>
struct Outcome {
  kto::cuda::Status status;
  kto::Metrics metrics;
  std::vector<float> logp, ratio, reward, loss, grad_logp;
  std::vector<index_t> num_tokens;
  std::vector<T> grad;                              ///< storage layout of the logits
  std::vector<double> entropy_sum, mean_logit_sum;  ///< with options.token_statistics
};

enum class Mode { eager, graph };

/// A case uploaded to the device, with the views kto_step takes. The KL batch
/// goes in as logits (forwarded inside the step) or as precomputed log-probs.
template <class T>
struct DeviceStep {
  index_t B, K, V;
  DeviceArray<T> logits, grad, kl_logits;
  DeviceArray<index_t> targets, offsets, kl_targets, kl_offsets, kl_tokens, num_tokens;
  DeviceArray<float> ref_logp, kl_ref, kl_pol, logp, ratio, reward, loss, grad_logp;
  DeviceArray<std::uint8_t> desirable;
  DeviceArray<kto::Metrics> metrics;
  DeviceArray<double> entropy_sum, mean_logit_sum;
  kto::cuda::StepInputs<T> in;
  kto::cuda::StepOutputs out;
  kto::LogitsView<T> grad_view;
  cudaStream_t stream = nullptr;

  DeviceStep(const Case<T>& c, bool in_place, bool kl_as_logits)
      : B(c.plan.problem.num_sequences()),
        K(c.kl_plan.problem.num_sequences()),
        V(c.plan.problem.vocab),
        logits(c.logits),
        grad(c.logits.size()),
        kl_logits(c.kl_logits),
        targets(c.targets),
        offsets(c.plan.problem.offsets),
        kl_targets(c.kl_targets),
        kl_offsets(c.kl_plan.problem.offsets),
        kl_tokens(c.kl_tokens),
        num_tokens(B),
        ref_logp(c.ref_logp),
        kl_ref(c.kl_ref_logp),
        kl_pol(c.kl_policy_logp),
        logp(B),
        ratio(B),
        reward(B),
        loss(B),
        grad_logp(B),
        desirable(c.desirable),
        metrics(1),
        entropy_sum(B),
        mean_logit_sum(B) {
    CUDA_REQUIRE(cudaStreamCreate(&stream));
    if (in_place)
      grad.upload(c.logits);
    else
      grad.poison();
    for (auto* a : {&logp, &ratio, &reward, &loss, &grad_logp}) a->poison();
    num_tokens.poison();
    metrics.poison();
    entropy_sum.poison();
    mean_logit_sum.poison();
    in.policy_logits =
        kto::LogitsView<const T>{in_place ? grad.get() : logits.get(), V, c.plan.logit_rows};
    in.targets = kto::TargetsView{targets.get() + c.plan.target_base, c.plan.target_rows};
    in.sequences = kto::sequences(offsets.get(), B);
    in.reference_logp = kto::reference_logp(ref_logp.get(), B);
    in.desirable = desirable.get();
    if (kl_as_logits) {
      in.kl.logits = kto::LogitsView<const T>{kl_logits.get(), V, c.kl_plan.logit_rows};
      in.kl.targets =
          kto::TargetsView{kl_targets.get() + c.kl_plan.target_base, c.kl_plan.target_rows};
      in.kl.sequences = kto::sequences(kl_offsets.get(), K);
    } else {
      in.kl.policy_logp = kto::policy_logp(kl_pol.get(), K);
      in.kl.num_tokens = kl_tokens.get();
    }
    in.kl.reference_logp = kto::reference_logp(kl_ref.get(), K);
    out.metrics = metrics.get();
    out.logp = logp.get();
    out.num_tokens = num_tokens.get();
    out.examples = {ratio.get(), reward.get(), loss.get(), grad_logp.get()};
    out.token_statistics = {entropy_sum.get(), mean_logit_sum.get()};  // read with the option only
    grad_view = kto::LogitsView<T>{grad.get(), V, c.plan.logit_rows};
  }
  ~DeviceStep() { cudaStreamDestroy(stream); }

  kto::cuda::Status launch(void* workspace, size_t& bytes, const kto::Options& o) {
    return kto::cuda::kto_step<T>(workspace, bytes, in, o, grad_view, out, stream);
  }
};

template <class T>
Outcome<T> run_step(const Case<T>& c, const kto::Options& o, bool in_place, bool kl_as_logits,
                    Mode mode = Mode::eager) {
  DeviceStep<T> d(c, in_place, kl_as_logits);
  Outcome<T> res;
  size_t bytes = 0;
  res.status = d.launch(nullptr, bytes, o);
  INFO(res.status.message);
  REQUIRE(res.status.ok());
  REQUIRE(bytes > 0);
  DeviceArray<char> workspace(bytes);
  if (mode == Mode::graph) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA_REQUIRE(cudaStreamBeginCapture(d.stream, cudaStreamCaptureModeGlobal));
    res.status = d.launch(workspace.get(), bytes, o);
    CUDA_REQUIRE(cudaStreamEndCapture(d.stream, &graph));
    REQUIRE(res.status.ok());
    CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_REQUIRE(cudaGraphLaunch(exec, d.stream));
    CUDA_REQUIRE(cudaStreamSynchronize(d.stream));
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  } else {
    res.status = d.launch(workspace.get(), bytes, o);
    REQUIRE(res.status.ok());
  }
  res.status = kto::cuda::read_status(workspace.get(), d.stream, d.in.sequences);
  res.metrics = d.metrics.download()[0];
  res.logp = d.logp.download();
  res.ratio = d.ratio.download();
  res.reward = d.reward.download();
  res.loss = d.loss.download();
  res.grad_logp = d.grad_logp.download();
  res.num_tokens = d.num_tokens.download();
  res.grad = d.grad.download();
  res.entropy_sum = d.entropy_sum.download();
  res.mean_logit_sum = d.mean_logit_sum.download();
  return res;
}

template <class T>
double kl_scale(const Case<T>& c, const kto::Options& o) {
  return test::kl_condition_scale(c.kl_plan.problem, o);
}

/// `derivative(r, v)`: ∂z'/∂z at a logit when `c` holds transformed logits z' (the
/// reference gradient is then multiplied by it, and the tolerance by max(1, |a|/τ), the
/// largest factor an error in ∂L/∂z' can grow by); null: no transform.
template <class T>
void check_against_reference(const Case<T>& c, const kto::Options& o, const Outcome<T>& got,
                             bool in_place, bool kl_as_logits,
                             const std::function<double(index_t, index_t)>& derivative = {}) {
  INFO("status: " << got.status.message);
  REQUIRE(got.status.ok());
  test::Observed obs;
  obs.metrics = got.metrics;
  obs.num_tokens = got.num_tokens;
  obs.logp.assign(got.logp.begin(), got.logp.end());
  obs.ratio.assign(got.ratio.begin(), got.ratio.end());
  obs.reward.assign(got.reward.begin(), got.reward.end());
  obs.loss.assign(got.loss.begin(), got.loss.end());
  obs.grad_logp.assign(got.grad_logp.begin(), got.grad_logp.end());
  obs.grad = [&](index_t r, index_t v) {
    return Type<T>::up(got.grad[static_cast<size_t>(c.plan.logit_rows.offset(r) + v)]);
  };
  ref::Step want = c.reference(o);
  double slope = 1.0;
  if (derivative) {
    const index_t V = c.plan.problem.vocab;
    for (index_t r = 0; r < c.plan.problem.rows; ++r)
      for (index_t v = 0; v < V; ++v) want.grad[static_cast<size_t>(r * V + v)] *= derivative(r, v);
    slope = std::max(1.0, std::fabs(o.logit_scale) / o.temperature);
  }
  test::compare_step(c.plan.problem, std::vector<double>(c.ref_logp.begin(), c.ref_logp.end()),
                     want, obs, o, 1e-5 * slope, Type<T>::unit_roundoff,
                     kl_as_logits ? kl_scale(c, o) : 1.0);
  if (!in_place)
    CHECK(test::written_padding(got.grad, c.plan.logit_rows, c.plan.problem.vocab,
                                [](T x) { return Type<T>::up(x); }) == 0);
}

template <class T>
bool same_bits(const Outcome<T>& a, const Outcome<T>& b) {
  auto eq = [](const auto& x, const auto& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(x[0])) == 0;
  };
  return std::memcmp(&a.metrics, &b.metrics, sizeof(kto::Metrics)) == 0 && eq(a.logp, b.logp) &&
         eq(a.grad_logp, b.grad_logp) && eq(a.loss, b.loss) && eq(a.grad, b.grad);
}

#define KTO_GPU_DTYPES float, __half, __nv_bfloat16

}  // namespace

TEMPLATE_TEST_CASE("gpu kto_step matches the float64 reference in every layout", "[gpu][small]",
                   KTO_GPU_DTYPES) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const Layout layout = GENERATE(Layout::padded, Layout::packed, Layout::strided, Layout::shifted);
  const bool in_place = GENERATE(false, true);
  const bool kl_as_logits = GENERATE(true, false);
  const kto::index_t vocab = GENERATE(1, 3, 123, 5001);
  INFO("seed " << seed << " dtype " << Type<T>::name() << " layout " << test::layout_name(layout)
               << " in_place " << in_place << " kl_as_logits " << kl_as_logits << " V " << vocab);
  kto::Options o;
  o.undesirable_weight = 1.33;
  test::ShapeSpec spec;
  spec.vocab = vocab;
  const Case<T> c(rng, layout, spec, o);
  const auto got = run_step(c, o, in_place, kl_as_logits);
  check_against_reference(c, o, got, in_place, kl_as_logits);
}

TEST_CASE("gpu kto_step matches the reference for every option combination", "[gpu][small]") {
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  INFO("seed " << seed);
  KTO_GENERATE_COMBINATION(o);
  test::ShapeSpec spec;
  spec.vocab = 41;
  const Case<float> c(rng, Layout::packed, spec, o);
  check_against_reference(c, o, run_step(c, o, false, true), false, true);
}

TEMPLATE_TEST_CASE("gpu kto_step with a logit transform and token statistics matches float64",
                   "[gpu][small]", KTO_GPU_DTYPES) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const Layout layout = GENERATE(Layout::padded, Layout::strided);
  const kto::index_t vocab = GENERATE(3, 123, 5001, 50257);
  const int transform = GENERATE(0, 1, 2);  // statistics only; scale and temperature; soft-cap
  INFO("seed " << seed << " dtype " << Type<T>::name() << " layout " << test::layout_name(layout)
               << " V " << vocab << " transform " << transform);
  kto::Options o;
  o.token_statistics = true;
  test::set_test_transform(o, transform);
  test::ShapeSpec spec;
  spec.vocab = vocab;
  spec.sequences = 3;
  const Case<T> c(rng, layout, spec, o);
  const auto got = run_step(c, o, false, true);

  // The float64 reference: the step on logits z' = f(z), its gradient times ∂z'/∂z.
  Case<T> zt = c;
  zt.plan.problem = ref::transformed(c.plan.problem, o);
  zt.kl_plan.problem = ref::transformed(c.kl_plan.problem, o);
  const ref::Problem& raw = c.plan.problem;
  check_against_reference(zt, o, got, false, true, [&](index_t r, index_t v) {
    return ref::transform_derivative(raw.logits[static_cast<size_t>(r * raw.vocab + v)],
                                     o.logit_scale, o.logit_softcap, o.temperature);
  });

  test::compare_token_statistics(zt.plan.problem, o.ignore_index, got.entropy_sum,
                                 got.mean_logit_sum);
}

TEMPLATE_TEST_CASE("gpu kto_step at large vocabularies (block per row)", "[gpu][large]",
                   KTO_GPU_DTYPES) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const kto::index_t vocab = GENERATE(50257, 128256);
  const int labels = GENERATE(-1, 0, 1);  // mixed, all undesirable, all desirable
  INFO("seed " << seed << " dtype " << Type<T>::name() << " V " << vocab << " labels " << labels);
  kto::Options o;
  test::ShapeSpec spec;
  spec.vocab = vocab;
  spec.sequences = 3;
  spec.max_len = 3;
  const Case<T> c(rng, Layout::packed, spec, o, labels);
  check_against_reference(c, o, run_step(c, o, false, true), false, true);
}

TEMPLATE_TEST_CASE("gpu results are bit-identical run to run and under graph capture",
                   "[gpu][small]", KTO_GPU_DTYPES) {
  using T = TestType;
  std::mt19937_64 rng(test::fresh_seed());
  kto::Options o;
  test::ShapeSpec spec;
  spec.vocab = GENERATE(123, 20000);
  spec.sequences = 6;
  const Case<T> c(rng, Layout::strided, spec, o);
  const auto first = run_step(c, o, false, true);
  REQUIRE(first.status.ok());
  for (int i = 0; i < 3; ++i) CHECK(same_bits(first, run_step(c, o, false, true)));
  CHECK(same_bits(first, run_step(c, o, false, true, Mode::graph)));
}

TEST_CASE("gpu errors: host-visible arguments come back from the call", "[gpu][small][errors]") {
  std::mt19937_64 rng(test::fresh_seed());
  kto::Options o;
  const Case<float> c(rng, Layout::padded, {}, o);
  DeviceStep<float> d(c, false, true);
  size_t bytes = 0;
  REQUIRE(d.launch(nullptr, bytes, o).ok());
  DeviceArray<char> workspace(bytes + 256);

  kto::Options bad = o;
  bad.beta = -1.0;
  auto st = d.launch(workspace.get(), bytes, bad);
  CHECK(st.code == kto::cuda::StatusCode::invalid_argument);
  CHECK(std::string(st.message).find("'options.beta' must be finite and > 0; got -1") !=
        std::string::npos);

  size_t small = bytes - 1;
  st = d.launch(workspace.get(), small, o);
  CHECK(st.code == kto::cuda::StatusCode::workspace_too_small);
  CHECK(std::string(st.message).find("'workspace_bytes'") != std::string::npos);

  size_t enough = bytes;
  st = d.launch(workspace.get() + 8, enough, o);
  CHECK(st.code == kto::cuda::StatusCode::invalid_argument);
  CHECK(std::string(st.message).find("256-byte aligned") != std::string::npos);

  d.out.metrics = nullptr;
  st = d.launch(workspace.get(), enough, o);
  CHECK(st.code == kto::cuda::StatusCode::invalid_argument);
  CHECK(std::string(st.message).find("'out.metrics'") != std::string::npos);
}

TEMPLATE_TEST_CASE("gpu step_forward + step_backward are kto_step, split; the cotangent scales",
                   "[gpu][small]", KTO_GPU_DTYPES) {
  using T = TestType;
  std::mt19937_64 rng(test::fresh_seed());
  kto::Options o;
  test::ShapeSpec spec;
  Case<T> c(rng, Layout::padded, spec, o);
  const Outcome<T> whole = run_step(c, o, false, true);
  REQUIRE(whole.status.ok());

  DeviceStep<T> d(c, false, true);
  DeviceArray<float> row_lse(static_cast<size_t>(d.in.policy_logits.rows.rows));
  d.out.row_lse = row_lse.get();
  size_t bytes = 0;
  REQUIRE(kto::cuda::step_forward<T>(nullptr, bytes, d.in, o, d.out, d.stream).ok());
  DeviceArray<char> workspace(bytes);
  REQUIRE(kto::cuda::step_forward<T>(workspace.get(), bytes, d.in, o, d.out, d.stream).ok());
  REQUIRE(kto::cuda::read_status(workspace.get(), d.stream, d.in.sequences).ok());
  CHECK(std::memcmp(&d.metrics.download()[0], &whole.metrics, sizeof(kto::Metrics)) == 0);
  REQUIRE(kto::cuda::step_backward<T>(d.in, d.out, o, d.grad_view, d.stream).ok());
  const auto split = d.grad.download();
  CHECK(std::memcmp(split.data(), whole.grad.data(), split.size() * sizeof(T)) == 0);

  // A cotangent of 2 doubles every gradient element exactly (a power of two).
  DeviceArray<float> two(std::vector<float>{2.0f});
  REQUIRE(kto::cuda::step_backward<T>(d.in, d.out, o, d.grad_view, d.stream, two.get()).ok());
  const auto doubled = d.grad.download();
  for (size_t i = 0; i < doubled.size(); ++i) {
    if (std::isnan(Type<T>::up(split[i]))) continue;  // padding keeps its poison
    // Doubling commutes with rounding to T only among T's normal numbers (half's start at 2^-14).
    if (std::is_same<T, __half>::value && std::abs(Type<T>::up(split[i])) < 0x1p-14) continue;
    if (Type<T>::up(doubled[i]) != 2.0 * Type<T>::up(split[i])) {
      FAIL_CHECK("element " << i << ": " << Type<T>::up(doubled[i]) << " != 2 x "
                            << Type<T>::up(split[i]));
      break;
    }
  }
  // The residuals are required.
  kto::cuda::StepOutputs missing = d.out;
  missing.row_lse = nullptr;
  const auto st = kto::cuda::step_forward<T>(workspace.get(), bytes, d.in, o, missing, d.stream);
  CHECK(st.code == kto::cuda::StatusCode::invalid_argument);
  CHECK(std::string(st.message).find("out.row_lse") != std::string::npos);
}

TEST_CASE("gpu errors: a kl_batch step without a KL example reports empty_kl_batch",
          "[gpu][small][errors]") {
  std::mt19937_64 rng(test::fresh_seed());
  kto::Options o;
  test::ShapeSpec spec;
  Case<float> c(rng, Layout::padded, spec, o);
  DeviceStep<float> d(c, false, false);
  d.in.kl.policy_logp = kto::policy_logp<float>(nullptr, 0);
  d.in.kl.reference_logp = kto::reference_logp<float>(nullptr, 0);
  for (const auto point : {kto::ReferencePoint::kl_batch, kto::ReferencePoint::zero}) {
    o.reference_point = point;
    size_t bytes = 0;
    REQUIRE(d.launch(nullptr, bytes, o).ok());
    DeviceArray<char> workspace(bytes);
    REQUIRE(d.launch(workspace.get(), bytes, o).ok());
    const auto st = kto::cuda::read_status(workspace.get(), d.stream, d.in.sequences);
    INFO(st.message);
    if (point == kto::ReferencePoint::kl_batch) {
      CHECK(st.code == kto::cuda::StatusCode::empty_kl_batch);
      CHECK(std::string(st.message).find("kl.count") != std::string::npos);
    } else {
      CHECK(st.ok());  // z0 = 0 chosen explicitly
    }
  }
}

TEST_CASE("gpu errors: the device reports bad targets, non-finite logits, offsets and labels",
          "[gpu][small][errors]") {
  std::mt19937_64 rng(test::fresh_seed());
  kto::Options o;
  test::ShapeSpec spec;
  spec.ignore_fraction = 0.0;
  spec.vocab = GENERATE(37, 6000);  // warp per row and block per row
  const int what = GENERATE(0, 1, 2, 3, 4);
  INFO("V " << spec.vocab << " case " << what);
  Case<float> c(rng, Layout::padded, spec, o);
  const index_t T = spec.max_len;
  const index_t row = 2 * T + 1;    // sequence 2, position 1 (make_plan ignores sequence 2:
  c.plan.problem.targets[row] = 0;  // give it a target again)
  c.targets[row] = 0;
  kto::cuda::StatusCode want = kto::cuda::StatusCode::success;
  std::string fragment;
  if (what == 0) {
    c.targets[row] = spec.vocab;  // out of range
    want = kto::cuda::StatusCode::target_out_of_range;
    fragment = "targets[" + std::to_string(row) + "]";
  } else if (what == 1) {
    c.logits[static_cast<size_t>(row * spec.vocab + spec.vocab / 2)] = NAN;
    want = kto::cuda::StatusCode::non_finite_logits;
    fragment = "sequence 2, row " + std::to_string(row);
  } else if (what == 2) {
    c.plan.problem.offsets[2] = c.plan.problem.offsets[1] - 1;  // decreasing
    want = kto::cuda::StatusCode::invalid_offsets;
    fragment = "offsets[2]";
  } else if (what == 3) {
    c.desirable[1] = 7;
    want = kto::cuda::StatusCode::invalid_label;
    fragment = "desirable[1]";
  } else {
    c.ref_logp[3] = INFINITY;
    want = kto::cuda::StatusCode::non_finite_input;
    fragment = "log-prob 3";
  }
  DeviceStep<float> d(c, false, true);
  size_t bytes = 0;
  REQUIRE(d.launch(nullptr, bytes, o).ok());
  DeviceArray<char> workspace(bytes);
  REQUIRE(d.launch(workspace.get(), bytes, o).ok());
  const auto st = kto::cuda::read_status(workspace.get(), d.stream, d.in.sequences);
  INFO(st.message);
  CHECK(st.code == want);
  CHECK(std::string(st.message).find(fragment) != std::string::npos);
  // Every gradient element is still written: poison gone, nothing out of bounds.
  const auto g = d.grad.download();
  for (const float x : g) {
    if (std::isnan(x) && what != 1 && what != 4) {
      FAIL_CHECK("a NaN gradient element");
      break;
    }
  }
}

TEMPLATE_TEST_CASE("gpu sanitizer case: small steps on both row paths", "[gpu][sanitize]",
                   KTO_GPU_DTYPES) {
  using T = TestType;
  std::mt19937_64 rng(test::fresh_seed());
  const Layout layout = GENERATE(Layout::strided, Layout::shifted);
  const kto::index_t vocab = GENERATE(123, 5001);  // warp per row, block per row
  const bool in_place = GENERATE(false, true);
  kto::Options o;
  test::ShapeSpec spec;
  spec.vocab = vocab;
  spec.sequences = 3;
  spec.max_len = 3;
  const Case<T> c(rng, layout, spec, o);
  check_against_reference(c, o, run_step(c, o, in_place, true), in_place, true);
}
