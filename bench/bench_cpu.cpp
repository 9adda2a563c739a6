// bench_cpu — throughput of the Eigen CPU path against a plain scalar loop.
//
// Forward: one read of the logits (lse + target logit per row).
// Forward+backward: the whole kto_step — read (forward), read + write (backward).
// Counters: elements/s (logit elements per second, per pass) and bytes/s
// (bytes of logits and gradient moved: 1× forward, 3× forward+backward).
#include <benchmark/benchmark.h>

#include <kto/kto.hpp>

#include <cmath>
#include <random>
#include <vector>

namespace {

using kto::index_t;

template <class T>
struct Workload {
  index_t rows, vocab;
  std::vector<T> logits, grad;
  std::vector<index_t> targets, offsets;
  std::vector<float> ref_logp, kl_policy, kl_reference;
  std::vector<uint8_t> desirable;
  Workload(index_t vocab_, index_t total_elements) : vocab(vocab_) {
    rows = total_elements / vocab;
    const index_t seqs = 8, T_len = rows / seqs;
    rows = seqs * T_len;
    std::mt19937_64 rng(1);
    std::normal_distribution<float> n(0.f, 2.f);
    std::uniform_int_distribution<index_t> tok(0, vocab - 1);
    logits.resize(rows * vocab);
    for (auto& x : logits) x = T(n(rng));
    grad.resize(logits.size());
    for (index_t r = 0; r < rows; ++r) targets.push_back(tok(rng));
    offsets = kto::padded_offsets(seqs, T_len);
    for (index_t s = 0; s < seqs; ++s) {
      ref_logp.push_back(-float(T_len) * 11.f);
      desirable.push_back(uint8_t(s % 2));
      kl_policy.push_back(-float(T_len) * 11.f);
      kl_reference.push_back(-float(T_len) * 11.f - 1.f);
    }
  }
  kto::cpu::StepInputs<T> inputs() const {
    return {kto::logits_matrix<const T>(logits.data(), rows, vocab),
            kto::targets_vector(targets.data(), rows),
            kto::sequences(offsets.data(), static_cast<index_t>(offsets.size()) - 1),
            kto::reference_logp(ref_logp),
            kto::make_span(desirable),
            {kto::policy_logp(kl_policy), kto::reference_logp(kl_reference), {}}};
  }
};

constexpr index_t kElements = index_t{1} << 24;  // 16.8 M logits per call

template <class T>
void set_counters(benchmark::State& state, const Workload<T>& w, int passes_bytes) {
  const auto elements = static_cast<double>(w.rows * w.vocab);
  state.counters["elem/s"] =
      benchmark::Counter(elements * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["GB/s"] = benchmark::Counter(
      elements * sizeof(T) * passes_bytes * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}

// ---- baseline: the straightforward scalar loops a first implementation writes ----
template <class T>
float scalar_row_lse(const T* z, index_t V) {
  float m = -INFINITY;
  for (index_t v = 0; v < V; ++v) m = std::max(m, static_cast<float>(z[v]));
  float s = 0.f;
  for (index_t v = 0; v < V; ++v) s += std::exp(static_cast<float>(z[v]) - m);
  return m + std::log(s);
}

template <class T>
void BM_scalar_forward(benchmark::State& state) {
  Workload<T> w(state.range(0), kElements);
  for (auto _ : state) {
    float total = 0;
    for (index_t r = 0; r < w.rows; ++r) {
      const T* z = &w.logits[r * w.vocab];
      total += static_cast<float>(z[w.targets[r]]) - scalar_row_lse(z, w.vocab);
    }
    benchmark::DoNotOptimize(total);
  }
  set_counters(state, w, 1);
}

template <class T>
void BM_scalar_forward_backward(benchmark::State& state) {
  Workload<T> w(state.range(0), kElements);
  std::vector<float> lse(w.rows);
  for (auto _ : state) {
    for (index_t r = 0; r < w.rows; ++r) lse[r] = scalar_row_lse(&w.logits[r * w.vocab], w.vocab);
    const float g = 0.01f;
    for (index_t r = 0; r < w.rows; ++r) {
      const T* z = &w.logits[r * w.vocab];
      T* out = &w.grad[r * w.vocab];
      for (index_t v = 0; v < w.vocab; ++v) {
        const float p = std::exp(static_cast<float>(z[v]) - lse[r]);
        out[v] = T(g * ((v == w.targets[r] ? 1.f : 0.f) - p));
      }
    }
    benchmark::DoNotOptimize(w.grad.data());
  }
  set_counters(state, w, 3);
}

// ---- the library ----
template <class T>
void BM_kto_forward(benchmark::State& state) {
  Workload<T> w(state.range(0), kElements);
  kto::cpu::ExecutionPolicy exec;
  exec.num_threads = static_cast<int>(state.range(1));
  const auto in = w.inputs();
  for (auto _ : state) {
    auto f = kto::cpu::sequence_logprobs<T>(in.policy_logits, in.targets, in.sequences, {}, exec);
    benchmark::DoNotOptimize(f.logp.data());
  }
  set_counters(state, w, 1);
}

template <class T>
void BM_kto_forward_backward(benchmark::State& state) {
  Workload<T> w(state.range(0), kElements);
  kto::cpu::ExecutionPolicy exec;
  exec.num_threads = static_cast<int>(state.range(1));
  const auto in = w.inputs();
  const auto grad = kto::logits_matrix<T>(w.grad.data(), w.rows, w.vocab);
  for (auto _ : state) {
    auto r = kto::cpu::kto_step<T>(in, {}, grad, exec);
    benchmark::DoNotOptimize(r.metrics.loss);
  }
  set_counters(state, w, 3);
}

// ---- fused linear: hidden states and the lm_head instead of logits ----
// N = 8 × 64 rows, D = 256, V = 32000; counters: GFLOP/s of the useful GEMM work
// (6·N·V·D: logits, dH, dW) and the extra memory besides inputs and gradients.
struct FusedWorkload {
  static constexpr index_t kSeqs = 8, kLen = 64, kDim = 256, kVocab = 32000;
  index_t rows = kSeqs * kLen;
  std::vector<float> hidden, weight, d_hidden, d_weight, ref_logp;
  std::vector<index_t> targets, offsets;
  std::vector<uint8_t> desirable;
  FusedWorkload() {
    std::mt19937_64 rng(2);
    std::normal_distribution<float> n(0.f, 1.f);
    std::uniform_int_distribution<index_t> tok(0, kVocab - 1);
    hidden.resize(rows * kDim);
    weight.resize(kVocab * kDim);
    for (auto& x : hidden) x = n(rng);
    for (auto& x : weight) x = n(rng) * 0.2f;
    d_hidden.resize(hidden.size());
    d_weight.resize(weight.size());
    for (index_t r = 0; r < rows; ++r) targets.push_back(tok(rng));
    offsets = kto::padded_offsets(kSeqs, kLen);
    for (index_t s = 0; s < kSeqs; ++s) {
      ref_logp.push_back(-kLen * 11.f);
      desirable.push_back(uint8_t(s % 2));
    }
  }
  kto::LinearHead<float> head() const {
    kto::LinearHead<float> h;
    h.weight = kto::matrix_view<const float>(weight.data(), kVocab, kDim);
    return h;
  }
  kto::cpu::FusedLinearInputs<float> inputs() const {
    kto::cpu::FusedLinearInputs<float> in;
    in.hidden = kto::matrix_view<const float>(hidden.data(), rows, kDim);
    in.targets = kto::targets_vector(targets.data(), rows);
    in.sequences = kto::sequences(offsets.data(), kSeqs);
    in.reference_logp = kto::reference_logp(ref_logp);
    in.desirable = kto::make_span(desirable);
    in.kl.hidden = kto::matrix_view<const float>(nullptr, 0, kDim);
    return in;
  }
  void counters(benchmark::State& state, double extra_bytes) const {
    state.counters["GFLOP/s"] = benchmark::Counter(
        6.0 * rows * kVocab * kDim * state.iterations() / 1e9, benchmark::Counter::kIsRate);
    state.counters["extra_MB"] = extra_bytes / (1 << 20);
  }
};

/// state.range(0): 0 keep_chunk, 1 recompute; range(1): chunk rows; range(2): threads.
void BM_fused_linear_step(benchmark::State& state) {
  FusedWorkload w;
  kto::Options o;
  o.reference_point = kto::ReferencePoint::zero;
  kto::cpu::FusedLinearConfig cfg;
  cfg.strategy = static_cast<kto::cpu::FusedStrategy>(state.range(0));
  cfg.chunk_bytes = static_cast<size_t>(state.range(1)) * sizeof(float) *
                    (FusedWorkload::kVocab + FusedWorkload::kDim);
  kto::cpu::ExecutionPolicy exec;
  exec.num_threads = static_cast<int>(state.range(2));
  kto::cpu::LinearGradients<float> g;
  g.d_hidden = kto::matrix_view(w.d_hidden.data(), w.rows, FusedWorkload::kDim);
  g.d_weight = kto::matrix_view(w.d_weight.data(), FusedWorkload::kVocab, FusedWorkload::kDim);
  const auto in = w.inputs();
  const auto head = w.head();
  for (auto _ : state) {
    auto r = kto::cpu::fused_linear_kto_step<float>(in, head, o, g, cfg, exec);
    benchmark::DoNotOptimize(r.metrics.loss);
  }
  w.counters(state, double(kto::cpu::fused_linear_workspace_bytes(head, cfg)));
}

/// The same step with materialised logits: Z = H Wᵀ (Eigen), kto_step, dH = dZ W, dW = dZᵀ H.
void BM_materialised_linear_step(benchmark::State& state) {
  FusedWorkload w;
  using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const index_t N = w.rows, D = FusedWorkload::kDim, V = FusedWorkload::kVocab;
  Eigen::Map<const M> h(w.hidden.data(), N, D), wt(w.weight.data(), V, D);
  M z(N, V);
  Eigen::Map<M> dh(w.d_hidden.data(), N, D), dw(w.d_weight.data(), V, D);
  kto::Options o;
  o.reference_point = kto::ReferencePoint::zero;
  kto::cpu::ExecutionPolicy exec;
  exec.num_threads = static_cast<int>(state.range(0));
  for (auto _ : state) {
    z.noalias() = h * wt.transpose();
    kto::cpu::StepInputs<float> in{kto::logits_matrix<const float>(z.data(), N, V),
                                   kto::targets_vector(w.targets.data(), N),
                                   kto::sequences(w.offsets.data(), FusedWorkload::kSeqs),
                                   kto::reference_logp(w.ref_logp),
                                   kto::make_span(w.desirable),
                                   {}};
    auto r = kto::cpu::kto_step<float>(in, o, kto::logits_matrix<float>(z.data(), N, V), exec);
    dh.noalias() = z * wt;
    dw.noalias() = z.transpose() * h;
    benchmark::DoNotOptimize(r.metrics.loss);
  }
  w.counters(state, double(sizeof(float)) * N * V);
}

/// One rank of a vocabulary split in two (W rows [0, V/2) of V); the all-gather copies
/// this rank's partials into rank 0's place of an array that holds rank 1's already.
/// state.range(0): how the partials reach the step —
///   0  gathered ahead (fused_linear_row_partials, the gather, then the step) and handed
///      over through hooks.gather_partials, so the step computes them again and discards
///      them: kto_jax before 2026-12-06;
///   1  gathered ahead, handed over as hooks.gathered_partials: kto_jax now;
///   2  gathered inside the step by hooks.gather_partials (the MPI example's way).
/// range(1): threads.
void BM_vocab_slice_step(benchmark::State& state) {
  FusedWorkload w;
  kto::Options o;
  o.reference_point = kto::ReferencePoint::zero;
  kto::cpu::FusedLinearConfig cfg;
  cfg.strategy = kto::FusedStrategy::recompute;  // what a slice runs
  kto::cpu::ExecutionPolicy exec;
  exec.num_threads = static_cast<int>(state.range(1));
  const index_t V = FusedWorkload::kVocab, half = V / 2, D = FusedWorkload::kDim;
  auto slice = [&](index_t begin) {
    kto::LinearHead<float> h;
    h.weight = kto::matrix_view<const float>(w.weight.data() + begin * D, half, D);
    h.vocab_begin = begin;
    h.vocab_total = V;
    return h;
  };
  const auto head = slice(0);
  const auto in = w.inputs();
  std::vector<kto::RowPartial<float>> gathered =
      kto::cpu::fused_linear_row_partials<float>(in, head, o, cfg, exec);
  const auto other = kto::cpu::fused_linear_row_partials<float>(in, slice(half), o, cfg, exec);
  gathered.insert(gathered.end(), other.begin(), other.end());
  const int64_t mode = state.range(0);
  kto::cpu::FusedLinearHooks<float> hooks;
  if (mode == 0)
    hooks.gather_partials = [&](const auto&, auto& all) { all = gathered; };
  else if (mode == 1)
    hooks.gathered_partials = {kto::make_span(gathered), 2};
  else
    hooks.gather_partials = [&](const auto& local, auto& all) {
      std::copy(local.begin(), local.end(), gathered.begin());
      all = gathered;
    };
  kto::cpu::LinearGradients<float> g;
  g.d_hidden = kto::matrix_view(w.d_hidden.data(), w.rows, D);
  g.d_weight = kto::matrix_view(w.d_weight.data(), half, D);
  for (auto _ : state) {
    if (mode != 2) {
      const auto local = kto::cpu::fused_linear_row_partials<float>(in, head, o, cfg, exec);
      std::copy(local.begin(), local.end(), gathered.begin());
    }
    auto r = kto::cpu::fused_linear_kto_step<float>(in, head, o, g, cfg, exec, hooks);
    benchmark::DoNotOptimize(r.metrics.loss);
  }
  w.counters(state, double(kto::cpu::fused_linear_workspace_bytes(head, cfg)));
  state.counters["GFLOP/s"] = benchmark::Counter(  // a slice's useful work: half the head's
      3.0 * w.rows * V * D * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}

void vocab_args(benchmark::internal::Benchmark* b) {
  for (int64_t v : {32000, 128256}) b->Args({v});
}
void vocab_thread_args(benchmark::internal::Benchmark* b) {
  for (int64_t v : {32000, 128256})
    for (int64_t t : {1, 2}) b->Args({v, t});
}

#define KTO_BENCH(fn, T, args) \
  BENCHMARK_TEMPLATE(fn, T)->Apply(args)->Unit(benchmark::kMillisecond)->UseRealTime()

KTO_BENCH(BM_scalar_forward, float, vocab_args);
KTO_BENCH(BM_scalar_forward, Eigen::bfloat16, vocab_args);
KTO_BENCH(BM_scalar_forward_backward, float, vocab_args);
KTO_BENCH(BM_scalar_forward_backward, Eigen::bfloat16, vocab_args);
KTO_BENCH(BM_kto_forward, float, vocab_thread_args);
KTO_BENCH(BM_kto_forward, Eigen::bfloat16, vocab_thread_args);
KTO_BENCH(BM_kto_forward_backward, float, vocab_thread_args);
KTO_BENCH(BM_kto_forward_backward, Eigen::bfloat16, vocab_thread_args);
BENCHMARK(BM_fused_linear_step)
    ->ArgsProduct({{0, 1}, {64, 512}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_vocab_slice_step)
    ->ArgsProduct({{0, 1, 2}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_materialised_linear_step)
    ->Arg(1)
    ->Arg(2)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
