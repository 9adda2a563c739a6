// The CUDA fused-linear step against the float64 reference (label: gpu).
//
// Fresh inputs each run, poisoned outputs, every output element checked under
// fused_problem.hpp's rule (dZ is rounded to the input type before the two
// gradient GEMMs, so that type's unit roundoff adds to the dH/dW/db bound);
// repeat runs bit-identical, a graph-captured run equal to the eager one; a frozen
// head (no dW, no db) bit for bit the full run but for them, its workspace smaller.
#include <catch2/catch.hpp>

#include <kto/cuda.hpp>
#include <kto/cuda/fused_linear.hpp>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "../fused_problem.hpp"
#include "device_support.cuh"

namespace {

using kto::index_t;
using kto::cuda::FusedStrategy;

struct Cublas {
  cublasHandle_t handle = nullptr;
  Cublas() { REQUIRE(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS); }
  ~Cublas() { cublasDestroy(handle); }
};

template <class T>
std::vector<T> stored(const std::vector<double>& v) {
  std::vector<T> out;
  for (double x : v) out.push_back(Type<T>::from(x));
  return out;
}
template <class T>
double round_to(double x) {
  return Type<T>::up(Type<T>::from(x));
}

/// A FusedProblem on the device, with poisoned outputs.
template <class T>
struct DeviceProblem {
  const test::FusedProblem& fp;
  index_t B, K;
  DeviceArray<T> hidden, weight, bias, kl_hidden;
  DeviceArray<index_t> targets, offsets, kl_targets, kl_offsets;
  DeviceArray<float> ref, kl_ref;
  DeviceArray<std::uint8_t> desirable;
  DeviceArray<kto::Metrics> metrics;
  DeviceArray<float> logp, ratio, reward, loss, grad_logp, d_hidden, d_weight, d_bias;
  /// outputs() asks for dW in T (strategy vocab_blocks) instead of fp32 when set.
  bool dw_in_input_type = false;
  /// outputs() asks for dW, db: unset, the view stays empty (a frozen head).
  bool weight_grad = true, bias_grad = true;
  DeviceArray<T> d_weight_in_input_type;
  DeviceArray<index_t> num_tokens;
  DeviceArray<double> entropy_sum, mean_logit_sum;

  explicit DeviceProblem(const test::FusedProblem& p)
      : fp(p),
        B(static_cast<index_t>(p.offsets.size()) - 1),
        K(static_cast<index_t>(p.kl_offsets.size()) - 1),
        hidden(stored<T>(p.hidden)),
        weight(stored<T>(p.weight)),
        bias(stored<T>(p.bias)),
        kl_hidden(stored<T>(p.kl_hidden)),
        targets(p.targets),
        offsets(p.offsets),
        kl_targets(p.kl_targets),
        kl_offsets(p.kl_offsets),
        ref(std::vector<float>(p.reference_logp.begin(), p.reference_logp.end())),
        kl_ref(std::vector<float>(p.kl_reference_logp.begin(), p.kl_reference_logp.end())),
        desirable(p.desirable),
        metrics(1),
        logp(B),
        ratio(B),
        reward(B),
        loss(B),
        grad_logp(B),
        d_hidden(p.rows * p.dim),
        d_weight(p.vocab * p.dim),
        d_bias(p.vocab),
        d_weight_in_input_type(p.vocab * p.dim),
        num_tokens(B),
        entropy_sum(B),
        mean_logit_sum(B) {}

  void poison() {
    metrics.poison();
    logp.poison();
    ratio.poison();
    reward.poison();
    loss.poison();
    grad_logp.poison();
    d_hidden.poison();
    d_weight.poison();
    d_bias.poison();
    d_weight_in_input_type.poison();
    num_tokens.poison();
    entropy_sum.poison();
    mean_logit_sum.poison();
  }
  kto::LinearHead<T> head() const {
    kto::LinearHead<T> h;
    h.weight = kto::matrix_view<const T>(weight.get(), fp.vocab, fp.dim);
    if (fp.with_bias) h.bias = kto::make_span(bias.get(), fp.vocab);
    return h;
  }
  /// `compact`: host copies of both batches' targets and offsets too (compact scoring).
  kto::cuda::FusedLinearInputs<T> inputs(bool host_offsets, bool compact = false) const {
    kto::cuda::FusedLinearInputs<T> in;
    in.hidden = kto::matrix_view<const T>(hidden.get(), fp.rows, fp.dim);
    in.targets = kto::targets_vector(targets.get(), fp.rows);
    in.sequences = kto::sequences(offsets.get(), B);
    in.host_offsets = host_offsets ? fp.offsets.data() : nullptr;
    in.reference_logp = kto::reference_logp(ref.get(), B);
    in.desirable = desirable.get();
    in.kl.hidden = kto::matrix_view<const T>(kl_hidden.get(), fp.kl_rows, fp.dim);
    in.kl.targets = kto::targets_vector(kl_targets.get(), fp.kl_rows);
    in.kl.sequences = kto::sequences(kl_offsets.get(), K);
    in.kl.reference_logp = kto::reference_logp(kl_ref.get(), K);
    if (compact) {
      in.host_offsets = fp.offsets.data();
      in.host_targets = fp.targets.data();
      in.kl.host_offsets = fp.kl_offsets.data();
      in.kl.host_targets = fp.kl_targets.data();
    }
    return in;
  }
  kto::cuda::FusedLinearOutputs outputs() {
    kto::cuda::FusedLinearOutputs out;
    out.metrics = metrics.get();
    out.logp = logp.get();
    out.num_tokens = num_tokens.get();
    out.examples = {ratio.get(), reward.get(), loss.get(), grad_logp.get()};
    out.d_hidden = kto::matrix_view(d_hidden.get(), fp.rows, fp.dim);
    if (!weight_grad) {  // both dW views empty
    } else if (dw_in_input_type) {
      out.d_weight_in_input_type =
          kto::MatrixView<void>{d_weight_in_input_type.get(), fp.vocab, fp.dim, fp.dim};
    } else {
      out.d_weight = kto::matrix_view(d_weight.get(), fp.vocab, fp.dim);
    }
    if (bias_grad) out.d_bias = kto::make_span(d_bias.get(), fp.vocab);
    out.token_statistics = {entropy_sum.get(), mean_logit_sum.get()};  // with the option only
    return out;
  }
};

struct Outcome {
  kto::cuda::Status status;
  size_t workspace = 0;  ///< the step's workspace query
  kto::Metrics metrics;
  std::vector<float> logp, ratio, reward, loss, grad_logp, d_hidden, d_weight, d_bias;
  std::vector<index_t> num_tokens;
  std::vector<double> entropy_sum, mean_logit_sum;
};

/// Still the poison's bytes: nothing wrote it.
template <class U>
bool untouched(const DeviceArray<U>& a) {
  const std::vector<U> host = a.download();
  const auto* bytes = reinterpret_cast<const unsigned char*>(host.data());
  return std::all_of(bytes, bytes + host.size() * sizeof(U),
                     [](unsigned char b) { return b == 0xFF; });
}

/// Every output of a finished step into `res` (its status aside). dW and db the step
/// was not asked for stay empty, their buffers checked untouched.
template <class T>
void download_into(DeviceProblem<T>& d, Outcome& res) {
  res.metrics = d.metrics.download()[0];
  res.logp = d.logp.download();
  res.ratio = d.ratio.download();
  res.reward = d.reward.download();
  res.loss = d.loss.download();
  res.grad_logp = d.grad_logp.download();
  res.num_tokens = d.num_tokens.download();
  res.d_hidden = d.d_hidden.download();
  if (!d.weight_grad) {
    CHECK(untouched(d.d_weight));
    CHECK(untouched(d.d_weight_in_input_type));
  } else if (d.dw_in_input_type) {  // T → float is exact
    for (const T x : d.d_weight_in_input_type.download())
      res.d_weight.push_back(static_cast<float>(Type<T>::up(x)));
  } else {
    res.d_weight = d.d_weight.download();
  }
  if (d.bias_grad)
    res.d_bias = d.d_bias.download();
  else
    CHECK(untouched(d.d_bias));
  res.entropy_sum = d.entropy_sum.download();
  res.mean_logit_sum = d.mean_logit_sum.download();
}

template <class T>
Outcome run_step(DeviceProblem<T>& d, const kto::Options& o,
                 const kto::cuda::FusedLinearConfig& cfg, bool host_offsets,
                 cudaStream_t stream = nullptr, bool capture = false, bool compact = false,
                 const kto::index_t* host_targets = nullptr) {
  Cublas blas;
  auto in = d.inputs(host_offsets, compact);
  if (host_targets) in.host_targets = host_targets;
  const auto head = d.head();
  size_t bytes = 0;
  Outcome res;
  res.status = kto::cuda::fused_linear_kto_step<T>(blas.handle, nullptr, bytes, in, head, o,
                                                   d.outputs(), stream, cfg);
  if (!res.status.ok() && bytes == 0) return res;
  res.workspace = bytes;
  DeviceArray<char> workspace(bytes);
  d.poison();
  // The uploads and the poison ran on the legacy stream; a non-blocking `stream` does not wait.
  CUDA_REQUIRE(cudaDeviceSynchronize());
  if (capture) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA_REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    res.status = kto::cuda::fused_linear_kto_step<T>(blas.handle, workspace.get(), bytes, in, head,
                                                     o, d.outputs(), stream, cfg);
    CUDA_REQUIRE(cudaStreamEndCapture(stream, &graph));
    REQUIRE(res.status.ok());
    CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_REQUIRE(cudaGraphLaunch(exec, stream));
    CUDA_REQUIRE(cudaStreamSynchronize(stream));
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  } else {
    res.status = kto::cuda::fused_linear_kto_step<T>(blas.handle, workspace.get(), bytes, in, head,
                                                     o, d.outputs(), stream, cfg);
    if (!res.status.ok()) return res;
  }
  res.status = kto::cuda::read_status(workspace.get(), stream, in.sequences);
  download_into(d, res);
  return res;
}

/// `u_extra`: a further rounding of dW, dH and db relative to themselves (dW stored in T).
/// A run's outputs as compare_fused reads them.
test::FusedObserved observed(const Outcome& got) {
  test::FusedObserved obs;
  obs.examples.metrics = got.metrics;
  obs.examples.num_tokens = got.num_tokens;
  obs.examples.logp.assign(got.logp.begin(), got.logp.end());
  obs.examples.ratio.assign(got.ratio.begin(), got.ratio.end());
  obs.examples.reward.assign(got.reward.begin(), got.reward.end());
  obs.examples.loss.assign(got.loss.begin(), got.loss.end());
  obs.examples.grad_logp.assign(got.grad_logp.begin(), got.grad_logp.end());
  obs.d_hidden.assign(got.d_hidden.begin(), got.d_hidden.end());
  obs.d_weight.assign(got.d_weight.begin(), got.d_weight.end());
  obs.d_bias.assign(got.d_bias.begin(), got.d_bias.end());
  return obs;
}

template <class T>
void check(const test::FusedProblem& fp, const kto::Options& o, const Outcome& got,
           double u_extra = 0.0) {
  INFO("status: " << got.status.message);
  REQUIRE(got.status.ok());
  const test::FusedReference R = test::fused_reference(fp, o);
  const test::FusedObserved obs = observed(got);
  const double u = std::is_same<T, float>::value ? 0.0 : Type<T>::unit_roundoff;
  test::compare_fused(fp, R, obs, o, 1e-5, 0, -1, u + u_extra);
}

template <class T>
kto::cuda::FusedLinearConfig config_rows(const test::FusedProblem& fp, index_t rows,
                                         FusedStrategy strategy) {
  kto::cuda::FusedLinearConfig cfg;
  const kto::cuda::detail::ChunkShape<T> one(fp.vocab, 1, 1);
  cfg.chunk_bytes =
      static_cast<size_t>(rows) * (sizeof(float) * one.ld_logits +
                                   (std::is_same<T, float>::value ? 0 : sizeof(T) * one.ld_grad));
  cfg.strategy = strategy;
  cfg.cublas_workspace_bytes = size_t{4} << 20;
  return cfg;
}

template <class V>
bool same(const V& x, const V& y) {
  return x.size() == y.size() &&
         (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(x[0])) == 0);
}

/// Every output but dW and db, bit for bit.
void same_outputs(const Outcome& a, const Outcome& b) {
  CHECK(std::memcmp(&a.metrics, &b.metrics, sizeof(kto::Metrics)) == 0);
  CHECK(same(a.logp, b.logp));
  CHECK(same(a.num_tokens, b.num_tokens));
  CHECK(same(a.ratio, b.ratio));
  CHECK(same(a.reward, b.reward));
  CHECK(same(a.loss, b.loss));
  CHECK(same(a.grad_logp, b.grad_logp));
  CHECK(same(a.d_hidden, b.d_hidden));
  CHECK(same(a.entropy_sum, b.entropy_sum));
  CHECK(same(a.mean_logit_sum, b.mean_logit_sum));
}

template <class T>
void same_bits(const Outcome& a, const Outcome& b) {
  same_outputs(a, b);
  CHECK(same(a.d_weight, b.d_weight));
  CHECK(same(a.d_bias, b.d_bias));
}

/// The workspace of the db GEMV's ones (T, one a row the GEMV sums: the chunk's rows, with
/// vocab_blocks every hidden row), 256-byte aligned: what a step that asks for no db saves.
/// `vocab`: the head's rows (a slice's own). dW takes no workspace (it is the caller's).
template <class T>
size_t db_ones_bytes(index_t vocab, index_t rows, index_t kl_rows,
                     const kto::cuda::FusedLinearConfig& cfg) {
  const kto::cuda::detail::ChunkShape<T> chunk(vocab, cfg.chunk_bytes, std::max(rows, kl_rows));
  const index_t ones =
      cfg.strategy == FusedStrategy::vocab_blocks ? std::max(chunk.rows, rows) : chunk.rows;
  return (sizeof(T) * static_cast<size_t>(ones) + 255) / 256 * 256;
}

/// A frozen head on the problem `full` ran (no dW; with and without db, a trainable bias on
/// a frozen weight): dH, the loss, the metrics, the per-example outputs and the token
/// statistics `full`'s bit for bit (the dH product never reads dW's), so under the
/// reference's rule too; the dW (and db) buffers untouched; the workspace smaller by the
/// db GEMV's ones without db, by nothing more.
template <class T>
void check_frozen(const test::FusedProblem& fp, const kto::Options& o,
                  const kto::cuda::FusedLinearConfig& cfg, bool host_offsets, bool compact,
                  const Outcome& full) {
  for (const int grads : {0, 1, 2}) {  // neither; db only; dW only
    INFO("frozen head: dW " << (grads == 2) << " db " << (grads == 1));
    DeviceProblem<T> d(fp);
    d.weight_grad = grads == 2;
    d.bias_grad = grads == 1;
    const Outcome got = run_step(d, o, cfg, host_offsets, nullptr, false, compact);
    INFO(got.status.message);
    REQUIRE(got.status.ok());
    same_outputs(got, full);
    CHECK(same(got.d_weight, d.weight_grad ? full.d_weight : std::vector<float>{}));
    CHECK(same(got.d_bias, d.bias_grad ? full.d_bias : std::vector<float>{}));
    const size_t saved = d.bias_grad ? 0 : db_ones_bytes<T>(fp.vocab, fp.rows, fp.kl_rows, cfg);
    CHECK(full.workspace - got.workspace == saved);
  }
}

}  // namespace

#define KTO_CUDA_DTYPES float, __half, __nv_bfloat16

TEMPLATE_TEST_CASE("CUDA fused-linear step matches the float64 reference", "[fused]",
                   KTO_CUDA_DTYPES) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const auto strategy =
      GENERATE(FusedStrategy::keep_chunk, FusedStrategy::recompute, FusedStrategy::vocab_blocks);
  const bool host_offsets = GENERATE(true, false);
  const index_t chunk_rows = GENERATE(3, 1000);
  const bool with_bias = GENERATE(true, false);
  const index_t vocab = GENERATE(37, 123);
  INFO("seed " << seed << " dtype " << Type<T>::name() << " strategy " << int(strategy)
               << " host offsets " << host_offsets << " chunk rows " << chunk_rows << " bias "
               << with_bias << " V " << vocab);
  test::FusedSpec spec;
  spec.vocab = vocab;
  spec.dim = 24;
  auto fp = test::make_fused_problem(rng, spec, round_to<T>);
  fp.with_bias = with_bias;
  kto::Options o;
  o.undesirable_weight = 1.33;
  DeviceProblem<T> d(fp);
  const auto cfg = config_rows<T>(fp, chunk_rows, strategy);
  const Outcome got = run_step(d, o, cfg, host_offsets);
  check<T>(fp, o, got);
  check_frozen<T>(fp, o, cfg, host_offsets, false, got);
}

TEMPLATE_TEST_CASE("CUDA fused-linear step with a logit transform and token statistics",
                   "[fused][logit_transform]", KTO_CUDA_DTYPES) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const auto strategy =
      GENERATE(FusedStrategy::keep_chunk, FusedStrategy::recompute, FusedStrategy::vocab_blocks);
  const index_t vocab = GENERATE(123, 5001);
  const int transform = GENERATE(0, 1, 2);  // statistics only; scale and temperature; soft-cap
  INFO("seed " << seed << " dtype " << Type<T>::name() << " strategy " << int(strategy) << " V "
               << vocab << " transform " << transform);
  test::FusedSpec spec;
  spec.vocab = vocab;
  spec.dim = 24;
  auto fp = test::make_fused_problem(rng, spec, round_to<T>);
  kto::Options o;
  o.token_statistics = true;
  test::set_test_transform(o, transform);
  DeviceProblem<T> d(fp);
  const Outcome got = run_step(d, o, config_rows<T>(fp, 3, strategy), true);
  check<T>(fp, o, got);
  // Token statistics of Z' = f(H Wᵀ + b), in float64.
  test::compare_token_statistics(ref::transformed(fp.target_problem(), o), o.ignore_index,
                                 got.entropy_sum, got.mean_logit_sum);
}

TEMPLATE_TEST_CASE("CUDA fused-linear step with compact scoring matches the float64 reference",
                   "[fused][compact]", KTO_CUDA_DTYPES) {
  // Host copies of the targets and offsets: the GEMMs multiply the scored rows only, and the
  // result is the reference's under the same rule.
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const auto strategy =
      GENERATE(FusedStrategy::keep_chunk, FusedStrategy::recompute, FusedStrategy::vocab_blocks);
  const index_t chunk_rows = GENERATE(1, 3, 1000);
  const bool with_bias = GENERATE(true, false);
  INFO("seed " << seed << " dtype " << Type<T>::name() << " strategy " << int(strategy)
               << " chunk rows " << chunk_rows << " bias " << with_bias);
  test::FusedSpec spec;
  spec.vocab = 123;
  spec.dim = 24;
  spec.ignore_fraction = 0.5;  // half the rows are prompt or padding
  auto fp = test::make_fused_problem(rng, spec, round_to<T>);
  fp.with_bias = with_bias;
  kto::Options o;
  o.token_statistics = true;
  DeviceProblem<T> d(fp);
  const auto cfg = config_rows<T>(fp, chunk_rows, strategy);
  const Outcome got = run_step(d, o, cfg, true, nullptr, false, true);
  check<T>(fp, o, got);
  test::compare_token_statistics(fp.target_problem(), o.ignore_index, got.entropy_sum,
                                 got.mean_logit_sum);
  check_frozen<T>(fp, o, cfg, true, true, got);
}

TEST_CASE("CUDA fused-linear step: host targets that differ from the targets are reported",
          "[fused][compact][errors]") {
  std::mt19937_64 rng(test::fresh_seed());
  auto fp = test::make_fused_problem(rng, test::FusedSpec{}, round_to<float>);
  // Rows inside the sequences: the first ignored, the second and the last scored.
  const index_t first = fp.offsets.front(), last = fp.offsets.back() - 1;
  REQUIRE(last - first >= 2);
  fp.targets[first] = -100;
  fp.targets[first + 1] = 1;
  fp.targets[last] = 1;
  DeviceProblem<float> d(fp);
  kto::Options o;
  const auto strategy =
      GENERATE(FusedStrategy::keep_chunk, FusedStrategy::recompute, FusedStrategy::vocab_blocks);
  const int change = GENERATE(0, 1, 2);  // the host scores more rows, fewer, or other ones
  INFO("strategy " << int(strategy) << " change " << change);
  std::vector<index_t> host = fp.targets;
  if (change == 0) host[first] = 0;
  if (change == 1) host[first + 1] = -100;
  if (change == 2) host[first] = 1, host[last] = -100;  // the same count, rows moved
  auto sequence_of = [&](index_t r) {
    index_t s = 0;
    while (fp.offsets[s + 1] <= r) ++s;
    return s;
  };
  // Chunks of 2 rows: the first and the last row fall in different keep_chunk groups
  // unless their sequences share one.
  const Outcome got =
      run_step(d, o, config_rows<float>(fp, 2, strategy), true, nullptr, false, true, host.data());
  // keep_chunk checks each group's rows: moved within one group, the rows go unnoticed.
  bool same_group = true;
  if (strategy == FusedStrategy::keep_chunk) {
    const auto plan = kto::cuda::detail::compact_plan(
        host.data(), kto::targets_vector(host.data(), fp.rows).rows, fp.offsets.data(),
        static_cast<index_t>(fp.offsets.size()) - 1, -100);
    for (const auto& g : kto::plan_chunks(plan.sequences(), 2))
      if (g.first_seq <= sequence_of(first) && sequence_of(first) < g.last_seq)
        same_group = sequence_of(last) < g.last_seq;
  }
  const bool same_map = change == 2 && same_group;
  if (same_map) {  // one group over both rows, the same count: nothing to tell apart
    CHECK(got.status.ok());
    return;
  }
  INFO(got.status.message);
  CHECK(got.status.code == kto::cuda::StatusCode::invalid_argument);
  CHECK(std::string(got.status.message).find("'host_targets'") != std::string::npos);
}

TEMPLATE_TEST_CASE("CUDA fused-linear step, vocab_blocks, dW in the input type",
                   "[fused][vocab_blocks]", KTO_CUDA_DTYPES) {
  // Each dW entry is one GEMM's fp32 sum over every row, rounded once to T: the fp32
  // rule of check() plus T's unit roundoff of |dW| (<= its scale there). Budgets of 1
  // and 3 rows give 64-column blocks (V = 200: four, the last of 8 columns); 1000 rows,
  // one block. The sequence rows, compact or not, all enter each block's GEMM.
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const index_t chunk_rows = GENERATE(1, 3, 1000);
  const index_t vocab = GENERATE(37, 200);
  const bool with_bias = GENERATE(true, false);
  const bool compact = GENERATE(false, true);
  INFO("seed " << seed << " dtype " << Type<T>::name() << " chunk rows " << chunk_rows << " V "
               << vocab << " bias " << with_bias << " compact " << compact);
  test::FusedSpec spec;
  spec.vocab = vocab;
  spec.dim = 24;
  spec.ignore_fraction = 0.3;
  auto fp = test::make_fused_problem(rng, spec, round_to<T>);
  fp.with_bias = with_bias;
  kto::Options o;
  o.logit_softcap = 20.0;  // the transform's derivative in every block
  DeviceProblem<T> d(fp);
  d.dw_in_input_type = true;
  const auto cfg = config_rows<T>(fp, chunk_rows, FusedStrategy::vocab_blocks);
  const Outcome got = run_step(d, o, cfg, true, nullptr, false, compact);
  check<T>(fp, o, got, std::is_same<T, float>::value ? 0.0 : Type<T>::unit_roundoff);
  // The same step with fp32 dW: dH, db and the loss bit for bit (the same GEMMs and
  // kernels; only the dW GEMM's output type differs).
  DeviceProblem<T> f(fp);
  const Outcome wide = run_step(f, o, cfg, true, nullptr, false, compact);
  check<T>(fp, o, wide);
  CHECK(got.d_hidden == wide.d_hidden);
  CHECK(got.d_bias == wide.d_bias);
  CHECK(got.metrics.loss == wide.metrics.loss);
}

/// Vocab parallel in one process: `ranks` threads, each a rank with its own stream and
/// cuBLAS handle over a vocabulary slice; the gather hook copies each rank's partials into
/// one device array, waits for every rank, then hands each the whole array. A rank that
/// fails before its gather abandons it, and the waiting ranks return an error instead of
/// waiting for ever.
class SliceGather {
 public:
  SliceGather(index_t ranks, index_t rows) : ranks_(ranks), rows_(rows), all_(ranks * rows) {}
  kto::cuda::RowPartialsAllGather hook(index_t rank) {
    kto::cuda::RowPartialsAllGather g;
    g.ranks = ranks_;
    g.gather = [this, rank](const kto::RowPartial<float>* local, kto::RowPartial<float>* gathered,
                            index_t rows, cudaStream_t stream) {
      if (rows != rows_) {
        abandon();
        return kto::cuda::Status::make(kto::cuda::StatusCode::invalid_argument,
                                       "rank %lld gathers %lld rows, not %lld",
                                       static_cast<long long>(rank), static_cast<long long>(rows),
                                       static_cast<long long>(rows_));
      }
      const size_t bytes = sizeof(kto::RowPartial<float>) * static_cast<size_t>(rows);
      cudaMemcpyAsync(all_.get() + rank * rows, local, bytes, cudaMemcpyDeviceToDevice, stream);
      cudaStreamSynchronize(stream);
      if (!arrive()) return abandoned_status();
      cudaMemcpyAsync(gathered, all_.get(), bytes * static_cast<size_t>(ranks_),
                      cudaMemcpyDeviceToDevice, stream);
      cudaStreamSynchronize(stream);
      if (!arrive()) return abandoned_status();  // all_ is read by every rank before reuse
      const cudaError_t e = cudaGetLastError();
      return e == cudaSuccess ? kto::cuda::Status::success()
                              : kto::cuda::Status::make(kto::cuda::StatusCode::cuda_error, "%s",
                                                        cudaGetErrorString(e));
    };
    return g;
  }
  /// A rank that will not gather (it failed first) releases the others.
  void abandon() {
    std::lock_guard<std::mutex> lock(mutex_);
    abandoned_ = true;
    ready_.notify_all();
  }

 private:
  bool arrive() {  // a reusable barrier over the ranks; false once abandoned
    std::unique_lock<std::mutex> lock(mutex_);
    const index_t generation = generation_;
    if (++arrived_ == ranks_) {
      arrived_ = 0;
      ++generation_;
      ready_.notify_all();
    } else {
      ready_.wait(lock, [&] { return generation_ != generation || abandoned_; });
    }
    return !abandoned_ || generation_ != generation;
  }
  static kto::cuda::Status abandoned_status() {
    return kto::cuda::Status::make(kto::cuda::StatusCode::invalid_argument,
                                   "another rank failed before the gather");
  }
  index_t ranks_, rows_;
  DeviceArray<kto::RowPartial<float>> all_;
  std::mutex mutex_;
  std::condition_variable ready_;
  index_t arrived_ = 0, generation_ = 0;
  bool abandoned_ = false;
};

/// Vocab parallel in one process: one thread per rank, rank k over W rows
/// [begin[k], begin[k + 1]) with the gather hook; each rank's outputs (dW and db its
/// slice's rows), or with `frozen` no dW and no db asked for. `ahead`: the partials
/// gathered before the steps instead (each slice's fused_linear_row_partials, KL rows
/// first, into one rank-major array: gather_partials.gathered), as kto_jax does.
template <class T>
std::vector<Outcome> run_slices(const test::FusedProblem& fp, const kto::Options& o,
                                const std::vector<index_t>& begin,
                                const kto::cuda::FusedLinearConfig& cfg, bool compact, bool kl,
                                bool frozen, bool ahead = false) {
  const index_t ranks = static_cast<index_t>(begin.size()) - 1, vocab = fp.vocab;
  std::vector<std::unique_ptr<DeviceProblem<T>>> d;
  for (index_t k = 0; k < ranks; ++k) {
    d.push_back(std::make_unique<DeviceProblem<T>>(fp));
    d.back()->weight_grad = d.back()->bias_grad = !frozen;
  }
  const index_t slice_rows = (kl ? fp.kl_rows : 0) + fp.rows;
  SliceGather gather(ranks, slice_rows);
  DeviceArray<kto::RowPartial<float>> gathered_ahead(ranks * slice_rows);
  // Set up every rank here; the threads only run the steps (no Catch2 assertion in them).
  struct Rank {
    kto::LinearHead<T> head;
    kto::cuda::FusedLinearInputs<T> in;
    kto::cuda::FusedLinearOutputs out;
    kto::cuda::RowPartialsAllGather hook;
    std::unique_ptr<Cublas> blas;
    cudaStream_t stream = nullptr;
    std::unique_ptr<DeviceArray<char>> workspace;
    size_t bytes = 0;
    kto::cuda::Status status;
  };
  std::vector<Rank> rank(static_cast<size_t>(ranks));
  for (index_t k = 0; k < ranks; ++k) {
    DeviceProblem<T>& p = *d[k];
    Rank& r = rank[static_cast<size_t>(k)];
    const index_t v0 = begin[k], n = begin[k + 1] - v0, D = fp.dim;
    r.head.weight = kto::matrix_view<const T>(p.weight.get() + v0 * D, n, D);
    r.head.bias = kto::make_span(static_cast<const T*>(p.bias.get() + v0), n);
    r.head.vocab_begin = v0;
    r.head.vocab_total = vocab;
    r.in = p.inputs(true, compact);
    r.out = p.outputs();
    if (!frozen) {
      r.out.d_weight = kto::matrix_view(p.d_weight.get() + v0 * D, n, D);
      r.out.d_bias = kto::make_span(p.d_bias.get() + v0, n);
    }
    r.hook = gather.hook(k);
    r.blas = std::make_unique<Cublas>();
    CUDA_REQUIRE(cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking));
    if (ahead) {  // this slice's partials of both batches, at rank k's place
      // The uploads ran on the legacy stream; this rank's stream does not wait for them.
      CUDA_REQUIRE(cudaDeviceSynchronize());
      kto::RowPartial<float>* at = gathered_ahead.get() + k * slice_rows;
      auto partials_of = [&](const kto::MatrixView<const T>& hidden,
                             const kto::TargetsView& targets, const kto::SequencesView& sequences,
                             const index_t* host_offsets, const index_t* host_targets,
                             kto::RowPartial<float>* into) {
        size_t bytes = 0;
        REQUIRE(kto::cuda::fused_linear_row_partials<T>(r.blas->handle, nullptr, bytes, hidden,
                                                        targets, sequences, r.head, o, into,
                                                        r.stream, cfg, host_offsets, host_targets)
                    .ok());
        DeviceArray<char> w(bytes);
        const auto s = kto::cuda::fused_linear_row_partials<T>(
            r.blas->handle, w.get(), bytes, hidden, targets, sequences, r.head, o, into, r.stream,
            cfg, host_offsets, host_targets);
        INFO(s.message);
        REQUIRE(s.ok());
        const auto errors = kto::cuda::read_status(w.get(), r.stream, sequences);
        INFO(errors.message);
        REQUIRE(errors.ok());
      };
      if (kl)
        partials_of(r.in.kl.hidden, r.in.kl.targets, r.in.kl.sequences, r.in.kl.host_offsets,
                    r.in.kl.host_targets, at);
      partials_of(r.in.hidden, r.in.targets, r.in.sequences, r.in.host_offsets, r.in.host_targets,
                  at + (kl ? fp.kl_rows : 0));
      r.hook = kto::cuda::RowPartialsAllGather{};
      r.hook.ranks = ranks;
      r.hook.gathered =
          kto::make_span<const kto::RowPartial<float>>(gathered_ahead.get(), ranks * slice_rows);
    }
    const auto query = kto::cuda::fused_linear_kto_step<T>(
        r.blas->handle, nullptr, r.bytes, r.in, r.head, o, r.out, r.stream, cfg, {}, r.hook);
    INFO(query.message);
    REQUIRE(r.bytes > 0);
    r.workspace = std::make_unique<DeviceArray<char>>(r.bytes);
    p.poison();
  }
  // The uploads and the poison ran on the legacy stream; the ranks' streams do not wait.
  CUDA_REQUIRE(cudaDeviceSynchronize());
  std::vector<std::thread> threads;
  for (Rank& r : rank)
    threads.emplace_back([&, rp = &r] {
      rp->status = kto::cuda::fused_linear_kto_step<T>(rp->blas->handle, rp->workspace->get(),
                                                       rp->bytes, rp->in, rp->head, o, rp->out,
                                                       rp->stream, cfg, {}, rp->hook);
      if (!rp->status.ok()) gather.abandon();  // harmless after the gather
      if (rp->status.ok())
        rp->status = kto::cuda::read_status(rp->workspace->get(), rp->stream, rp->in.sequences);
    });
  for (auto& t : threads) t.join();
  std::vector<Outcome> got(static_cast<size_t>(ranks));
  for (index_t k = 0; k < ranks; ++k) {
    DeviceProblem<T>& p = *d[k];
    Outcome& res = got[static_cast<size_t>(k)];
    Rank& r = rank[static_cast<size_t>(k)];
    CUDA_REQUIRE(cudaStreamSynchronize(r.stream));
    cudaStreamDestroy(r.stream);
    res.status = r.status;
    res.workspace = r.bytes;
    download_into(p, res);
    if (frozen) continue;  // no dW or db (download_into checked their buffers untouched)
    const index_t v0 = begin[k], n = begin[k + 1] - v0, D = fp.dim;  // the slice's rows
    res.d_weight.erase(res.d_weight.begin() + (v0 + n) * D, res.d_weight.end());
    res.d_weight.erase(res.d_weight.begin(), res.d_weight.begin() + v0 * D);
    res.d_bias.erase(res.d_bias.begin() + v0 + n, res.d_bias.end());
    res.d_bias.erase(res.d_bias.begin(), res.d_bias.begin() + v0);
  }
  return got;
}

TEMPLATE_TEST_CASE("CUDA fused-linear step, vocab parallel: slices in one process",
                   "[fused][vocab_parallel]", KTO_CUDA_DTYPES) {
  // Rank k holds W rows [v_k, v_k+1) (uneven slices) and runs the step with the gather
  // hook. Every rank gets the same loss, metrics and log-probs (the merged partials, in
  // rank order); its dW and db are the reference's rows of its slice; dH summed over the
  // ranks (the caller's all-reduce, in float64 here) is the reference's, under check()'s
  // rule. With a logit transform (per element, so slices compose) and compact scoring.
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const index_t ranks = GENERATE(2, 3);
  const index_t vocab = GENERATE(123, 5001);
  const bool compact = GENERATE(false, true);
  const bool kl = GENERATE(true, false);  // z0 from the KL batch, or 0 (its rows not gathered)
  INFO("seed " << seed << " dtype " << Type<T>::name() << " ranks " << ranks << " V " << vocab
               << " compact " << compact << " kl " << kl);
  test::FusedSpec spec;
  spec.vocab = vocab;
  spec.dim = 24;
  spec.ignore_fraction = 0.3;
  auto fp = test::make_fused_problem(rng, spec, round_to<T>);
  fp.with_bias = true;
  kto::Options o;
  o.logit_softcap = 15.0;
  if (!kl) o.reference_point = kto::ReferencePoint::zero;
  std::vector<index_t> begin(static_cast<size_t>(ranks + 1), 0);
  for (index_t k = 1; k < ranks; ++k) begin[k] = vocab * k / ranks + (k % 2 ? 3 : -2);
  begin[ranks] = vocab;
  const auto cfg = config_rows<T>(fp, 3, FusedStrategy::keep_chunk);  // runs as recompute
  const test::FusedReference R = test::fused_reference(fp, o);
  const double u = std::is_same<T, float>::value ? 0.0 : Type<T>::unit_roundoff;
  auto compare_slices = [&](const std::vector<Outcome>& runs, const char* how) {
    for (index_t k = 0; k < ranks; ++k) {
      INFO(how << ", rank " << k << ": " << runs[k].status.message);
      REQUIRE(runs[k].status.ok());
    }
    std::vector<double> d_hidden(runs[0].d_hidden.size(), 0.0);
    for (const Outcome& g : runs)
      for (size_t i = 0; i < d_hidden.size(); ++i) d_hidden[i] += g.d_hidden[i];
    for (index_t k = 0; k < ranks; ++k) {
      INFO(how << ", rank " << k);
      const Outcome& g = runs[static_cast<size_t>(k)];
      CHECK(std::memcmp(&g.metrics, &runs[0].metrics, sizeof(kto::Metrics)) == 0);
      CHECK(g.logp == runs[0].logp);
      CHECK(g.grad_logp == runs[0].grad_logp);
      test::FusedObserved obs = observed(g);
      obs.d_hidden = d_hidden;
      test::compare_fused(fp, R, obs, o, 1e-5, begin[k], begin[k + 1] - begin[k], u);
    }
  };
  const std::vector<Outcome> got = run_slices<T>(fp, o, begin, cfg, compact, kl, false);
  compare_slices(got, "gather hook");
  // The partials gathered ahead of the steps (kto_jax's way): the same outputs under the
  // same rule (the partials' GEMMs may tile the rows differently: not the same bits).
  compare_slices(run_slices<T>(fp, o, begin, cfg, compact, kl, false, true), "gathered ahead");
  // A frozen head on every rank (no dW, no db): the same bits but for them, each rank's
  // workspace smaller by its db ones (fused_linear.hpp's workspace_bytes).
  const std::vector<Outcome> frozen = run_slices<T>(fp, o, begin, cfg, compact, kl, true);
  for (index_t k = 0; k < ranks; ++k) {
    INFO("frozen rank " << k << ": " << frozen[k].status.message);
    REQUIRE(frozen[k].status.ok());
    same_outputs(frozen[k], got[k]);
    CHECK(got[k].workspace - frozen[k].workspace ==
          db_ones_bytes<T>(begin[k + 1] - begin[k], fp.rows, fp.kl_rows, cfg));
  }
}

TEMPLATE_TEST_CASE("CUDA fused-linear step at large vocabularies (block-per-row kernels)",
                   "[fused]", KTO_CUDA_DTYPES) {
  using T = TestType;
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const index_t vocab = GENERATE(5001, 128256);
  INFO("seed " << seed << " dtype " << Type<T>::name() << " V " << vocab);
  test::FusedSpec spec;
  spec.vocab = vocab;
  spec.dim = 8;
  spec.sequences = 3;
  spec.kl_sequences = 2;
  spec.max_len = 5;
  const auto fp = test::make_fused_problem(rng, spec, round_to<T>);
  kto::Options o;
  DeviceProblem<T> d(fp);
  check<T>(fp, o, run_step(d, o, config_rows<T>(fp, 4, FusedStrategy::keep_chunk), true));
}

TEST_CASE("CUDA fused-linear step for every option combination", "[fused][options]") {
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  INFO("seed " << seed);
  KTO_GENERATE_COMBINATION(o);
  const auto fp = test::make_fused_problem(rng, test::FusedSpec{}, round_to<float>);
  DeviceProblem<float> d(fp);
  check<float>(fp, o, run_step(d, o, config_rows<float>(fp, 4, FusedStrategy::keep_chunk), true));
}

TEST_CASE("CUDA fused-linear step under the sanitizers: both strategies, split sequences",
          "[fused][sanitize][frozen]") {
  std::mt19937_64 rng(test::fresh_seed());
  test::FusedSpec spec;
  spec.vocab = 4099;  // block-per-row kernels and a ragged float4 tail
  spec.dim = 16;
  const auto fp = test::make_fused_problem(rng, spec, round_to<__nv_bfloat16>);
  kto::Options o;
  DeviceProblem<__nv_bfloat16> d(fp), frozen(fp);
  frozen.weight_grad = frozen.bias_grad = false;  // a frozen head: no dW GEMM, no db GEMV
  for (auto strategy :
       {FusedStrategy::keep_chunk, FusedStrategy::recompute, FusedStrategy::vocab_blocks}) {
    const auto cfg = config_rows<__nv_bfloat16>(fp, 3, strategy);
    check<__nv_bfloat16>(fp, o, run_step(d, o, cfg, true));
    check<__nv_bfloat16>(fp, o, run_step(frozen, o, cfg, true));
  }
}

TEST_CASE("CUDA fused-linear step: a NaN hidden state on an ignored row reaches no gradient",
          "[fused][sanitize]") {
  std::mt19937_64 rng(test::fresh_seed());
  auto fp = test::make_fused_problem(rng, test::FusedSpec{}, round_to<__nv_bfloat16>);
  index_t r = 0;
  while (fp.targets[static_cast<size_t>(r)] != -100) ++r;  // an ignored row
  kto::Options o;
  for (auto strategy :
       {FusedStrategy::keep_chunk, FusedStrategy::recompute, FusedStrategy::vocab_blocks}) {
    const auto cfg = config_rows<__nv_bfloat16>(fp, 4, strategy);
    auto clean = fp;
    DeviceProblem<__nv_bfloat16> a(clean);
    const Outcome want = run_step(a, o, cfg, true);
    auto poisoned = fp;
    for (index_t k = 0; k < fp.dim; ++k) poisoned.hidden[static_cast<size_t>(r * fp.dim + k)] = NAN;
    DeviceProblem<__nv_bfloat16> b(poisoned);
    const Outcome got = run_step(b, o, cfg, true);
    CHECK(got.d_weight == want.d_weight);  // the ignored row is multiplied as zeros
    CHECK(got.d_bias == want.d_bias);
    CHECK(got.d_hidden == want.d_hidden);
  }
}

TEST_CASE("CUDA fused-linear step: repeat runs and a graph replay give the same bits", "[fused]") {
  std::mt19937_64 rng(test::fresh_seed());
  test::FusedSpec spec;
  spec.vocab = 301;
  spec.sequences = 7;
  const auto fp = test::make_fused_problem(rng, spec, round_to<__nv_bfloat16>);
  kto::Options o;
  DeviceProblem<__nv_bfloat16> d(fp);
  const auto strategy = GENERATE(FusedStrategy::keep_chunk, FusedStrategy::vocab_blocks);
  d.dw_in_input_type = strategy == FusedStrategy::vocab_blocks;
  const auto cfg = config_rows<__nv_bfloat16>(fp, 5, strategy);
  const Outcome a = run_step(d, o, cfg, true);
  const Outcome b = run_step(d, o, cfg, true);
  REQUIRE(a.status.ok());
  same_bits<__nv_bfloat16>(a, b);
  cudaStream_t stream;
  CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const Outcome g = run_step(d, o, cfg, true, stream, true);
  cudaStreamDestroy(stream);
  INFO(g.status.message);
  REQUIRE(g.status.ok());
  same_bits<__nv_bfloat16>(a, g);
}

/// lse, ℓ, the row scale, and the token statistics' entropy and mean logit (reserved
/// whether or not they are requested: the workspace query takes no options): five floats.
size_t per_row_bytes() {
  return 5 * sizeof(float);
}

TEST_CASE("CUDA fused-linear workspace grows by O(rows) scalars, not rows x vocab",
          "[fused][memory]") {
  kto::LinearHead<__nv_bfloat16> head;
  head.weight = kto::matrix_view<const __nv_bfloat16>(nullptr, 128256, 1024);
  kto::cuda::FusedLinearInputs<__nv_bfloat16> small, large;
  small.hidden.rows = 512;
  large.hidden.rows = 512 * 64;
  small.sequences.count = 1;
  large.sequences.count = 64;
  kto::cuda::FusedLinearConfig cfg;
  cfg.chunk_bytes = size_t{64} << 20;  // fewer rows than either batch: both chunks are equal
  const size_t a = kto::cuda::fused_linear_workspace_bytes(small, head, cfg);
  const size_t b = kto::cuda::fused_linear_workspace_bytes(large, head, cfg);
  CHECK(a <= cfg.chunk_bytes + cfg.cublas_workspace_bytes + sizeof(float) * 128256 +
                 small.hidden.rows * per_row_bytes() + 64 * 256);
  const size_t per_row = per_row_bytes(), per_seq = 6 * 8;
  CHECK(b - a <= (large.hidden.rows - small.hidden.rows) * per_row +
                     (large.sequences.count - small.sequences.count) * per_seq + 20 * 256);
  const size_t logits = sizeof(float) * 128256 * static_cast<size_t>(large.hidden.rows);
  CHECK(b < logits / 4);
}

TEST_CASE("CUDA fused-linear logprobs equal the reference forward", "[fused]") {
  std::mt19937_64 rng(test::fresh_seed());
  const auto fp = test::make_fused_problem(rng, test::FusedSpec{}, round_to<__nv_bfloat16>);
  DeviceProblem<__nv_bfloat16> d(fp);
  kto::Options o;
  o.average_logprob = GENERATE(false, true);
  Cublas blas;
  size_t bytes = 0;
  const auto head = d.head();
  const auto hidden = kto::matrix_view<const __nv_bfloat16>(d.hidden.get(), fp.rows, fp.dim);
  const auto targets = kto::targets_vector(d.targets.get(), fp.rows);
  const auto seqs = kto::sequences(d.offsets.get(), d.B);
  kto::cuda::fused_linear_logprobs<__nv_bfloat16>(blas.handle, nullptr, bytes, hidden, targets,
                                                  seqs, head, o, d.logp.get(), d.num_tokens.get(),
                                                  nullptr);
  DeviceArray<char> ws(bytes);
  d.poison();
  auto st = kto::cuda::fused_linear_logprobs<__nv_bfloat16>(blas.handle, ws.get(), bytes, hidden,
                                                            targets, seqs, head, o, d.logp.get(),
                                                            d.num_tokens.get(), nullptr);
  REQUIRE(st.ok());
  st = kto::cuda::read_status(ws.get(), nullptr, seqs);
  REQUIRE(st.ok());
  const auto logp = d.logp.download();
  const auto tokens = d.num_tokens.download();
  const ref::Problem p = fp.target_problem();
  const ref::Forward want = ref::forward(p, o.ignore_index, o.average_logprob);
  for (index_t s = 0; s < d.B; ++s) {
    double scale = 1.0;
    for (index_t r = fp.offsets[s]; r < fp.offsets[s + 1]; ++r)
      if (fp.targets[r] != o.ignore_index)
        scale += std::fabs(want.lse[r]) + std::fabs(want.token_logp[r]);
    if (o.average_logprob && want.num_tokens[s] > 0) scale /= double(want.num_tokens[s]);
    CHECK(tokens[s] == want.num_tokens[s]);
    KTO_CHECK_CLOSE(logp[s], want.logp[s], scale, 1e-5);
  }
}

TEST_CASE("CUDA fused-linear errors: host arguments", "[fused][errors]") {
  std::mt19937_64 rng(11);
  const auto fp = test::make_fused_problem(rng, test::FusedSpec{}, round_to<float>);
  DeviceProblem<float> d(fp);
  kto::Options o;
  Cublas blas;
  auto expect = [&](auto in, auto head, kto::cuda::FusedLinearOutputs out, const char* argument) {
    size_t bytes = 0;
    const auto st = kto::cuda::fused_linear_kto_step<float>(blas.handle, nullptr, bytes, in, head,
                                                            o, out, nullptr);
    INFO(st.message);
    CHECK(st.code == kto::cuda::StatusCode::invalid_argument);
    CHECK(std::string(st.message).find(std::string("'") + argument + "'") != std::string::npos);
  };
  {
    auto in = d.inputs(true);
    in.hidden.cols = fp.dim - 1;
    expect(in, d.head(), d.outputs(), "hidden.cols");
  }
  {
    auto head = d.head();
    head.vocab_total = fp.vocab + 5;
    expect(d.inputs(true), head, d.outputs(), "head.vocab_total");
  }
  {
    auto out = d.outputs();
    out.d_weight.rows -= 1;
    expect(d.inputs(true), d.head(), out, "out.d_weight");
  }
  {
    auto in = d.inputs(true);
    std::vector<index_t> bad = fp.offsets;
    bad[1] = bad[2] + 1;
    in.host_offsets = bad.data();
    expect(in, d.head(), d.outputs(), "host_offsets.offsets[2]");
  }
  {
    auto in = d.inputs(true);
    in.kl.reference_logp = kto::reference_logp<float>(nullptr, in.kl.sequences.count);
    expect(in, d.head(), d.outputs(), "kl.reference_logp");
  }
}

TEST_CASE("CUDA fused-linear errors: device-side checks are reported with the row",
          "[fused][errors][sanitize]") {
  std::mt19937_64 rng(12);
  auto fp = test::make_fused_problem(rng, test::FusedSpec{}, round_to<float>);
  const index_t s = 3, r = fp.offsets[s];
  REQUIRE(fp.offsets[s + 1] > r);
  for (index_t q = r; q < fp.offsets[s + 1]; ++q) fp.targets[q] = 1;
  kto::Options o;
  SECTION("a target id outside the vocabulary") {
    fp.targets[r] = fp.vocab;
    DeviceProblem<float> d(fp);
    const Outcome got = run_step(d, o, config_rows<float>(fp, 4, FusedStrategy::keep_chunk), true);
    INFO(got.status.message);
    CHECK(got.status.code == kto::cuda::StatusCode::target_out_of_range);
    CHECK(std::string(got.status.message).find("row " + std::to_string(r)) != std::string::npos);
  }
  SECTION("a NaN hidden state") {
    fp.hidden[r * fp.dim + 1] = std::nan("");
    DeviceProblem<float> d(fp);
    const Outcome got = run_step(d, o, config_rows<float>(fp, 4, FusedStrategy::recompute), true);
    INFO(got.status.message);
    CHECK(got.status.code == kto::cuda::StatusCode::non_finite_logits);
    CHECK(std::string(got.status.message).find("sequence 3, row " + std::to_string(r)) !=
          std::string::npos);
  }
}
