// kto_jax_cpu.cpp — XLA FFI handlers (CPU) that run the kto Eigen path for JAX.
//
// Targets, registered by kto_jax/_library.py (the CUDA twins in kto_jax_cuda.cu
// take the same operands, attributes and results):
//   kto_sequence_logprobs      logits [N, V], targets [N], offsets [B+1] → logp [B], n [B]
//   kto_kl_partial             KL log-probs and counts → (S, C) [2]
//   kto_step_forward           kto::cpu::step_forward: metrics [9], per-example [5, B]
//                              (logp, ρ, βρ, loss, g_s), n [B], row_lse [N] (0 where unscored),
//                              token statistics [2, B] (entropy and mean-logit sums; [2, 0]
//                              unless requested); global_kl [2] (an all-reduced (S, C))
//                              replaces the KL batch
//   kto_step_backward          kto::cpu::step_backward: residuals, cotangent → dlogits
//   kto_fused_linear_logprobs  hidden [N, D], weight [V, D], bias [V] or [0] → logp, n
//   kto_fused_linear_row_partials  per-row (lse over this vocab slice, target logit)
//                              [N, 2] (vocab parallel)
//   kto_fused_linear_step      kto::cpu::fused_linear_kto_step: the forward's outputs and
//                              dH [N, D], dW [V, D], db [V] (fp32); the KL batch as
//                              global_kl (as above) or none; gathered [R, N, 2] (R vocab
//                              slices' row partials): the step's gathered partials when
//                              the head is a slice; strategies keep_chunk and recompute
// Dtype dispatch (f32 / bf16 / f16) is the binding core's (kto/bind/dtype.hpp). JAX's int32 ids
// and offsets are widened to the library's int64 (O(rows)). kto::Error becomes
// an FFI InvalidArgument error carrying the library's message.
#include <kto/cpu/isa.hpp>
#include <kto/kto.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kto_jax_common.hpp"

namespace {

using namespace kto_jax;

std::vector<index_t> widen(const ffi::Buffer<ffi::S32>& b) {
  const auto* p = b.typed_data();
  return std::vector<index_t>(p, p + b.element_count());
}

template <class T>
kto::Span<const T> span_of(const ffi::Buffer<ffi::F32>& b) {
  return kto::make_span(b.typed_data(), static_cast<index_t>(b.element_count()));
}

template <class Fn>
ffi::Error dispatch(ffi::DataType dtype, const char* fn_name, const char* arg, Fn&& fn) {
  return dispatch_float<Eigen::bfloat16, Eigen::half>(dtype, fn_name, arg, fn);
}

void write_per_example(const std::vector<float>& logp, const kto::ExampleOutputs<float>& ex,
                       index_t B, float* out) {
  const std::vector<float>* rows[5] = {&logp, &ex.ratio, &ex.reward, &ex.loss, &ex.grad_logp};
  for (int k = 0; k < 5; ++k) std::memcpy(out + k * B, rows[k]->data(), B * sizeof(float));
}

/// Each sequence's entropy and mean-logit sums as rows of [2, B] (an empty result when the
/// options did not ask for them).
void write_token_statistics(const kto::SequenceTokenStatistics& st, index_t B,
                            ffi::ResultBuffer<ffi::F32>& out) {
  if (out->element_count() == 0) return;
  float* p = out->typed_data();
  for (index_t b = 0; b < B; ++b) {
    p[b] = static_cast<float>(st.entropy_sum[b]);
    p[B + b] = static_cast<float>(st.mean_logit_sum[b]);
  }
}

/// An all-reduce hook that hands the step the caller's global (S, C), or none.
ffi::Error global_kl_hook(const ffi::Buffer<ffi::F32>& g, const char* fn, kto::KlAllReduce& hook) {
  if (g.element_count() == 0) return ffi::Error::Success();
  if (g.element_count() != 2)
    return ffi::Error::InvalidArgument(std::string(fn) +
                                       ": argument 'global_kl' must hold (S, C): 2 elements; got " +
                                       std::to_string(g.element_count()));
  const double S = g.typed_data()[0], C = g.typed_data()[1];
  hook = [S, C](kto::KlPartial& p) {
    p.sum = S;
    p.count = C;
  };
  return ffi::Error::Success();
}

constexpr const char* kLogprobs = "kto_jax.sequence_logprobs";
constexpr const char* kStep = "kto_jax.kto_loss";
constexpr const char* kFused = "kto_jax.fused_linear_kto_loss";
constexpr const char* kFusedLogprobs = "kto_jax.fused_linear_logprobs";
constexpr const char* kPartials = "kto_jax.fused_linear_row_partials";

ffi::Error SequenceLogprobsImpl(ffi::AnyBuffer logits, ffi::Buffer<ffi::S32> targets,
                                ffi::Buffer<ffi::S32> offsets, ffi::Span<const double> options,
                                ffi::ResultBuffer<ffi::F32> logp,
                                ffi::ResultBuffer<ffi::S32> num_tokens) {
  if (auto e = require_rank(logits, 2, kLogprobs, "logits", "2-D [rows, vocab]"); !e.success())
    return e;
  const auto t = widen(targets);
  const auto off = widen(offsets);
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kLogprobs, o));
  return dispatch(logits.element_type(), kLogprobs, "logits", [&](auto tag) {
    using T = decltype(tag);
    const auto f = kto::cpu::sequence_logprobs<T>(
        logits_of<T>(logits), kto::targets_vector(t.data(), static_cast<index_t>(t.size())),
        kto::sequences(off.data(), static_cast<index_t>(off.size()) - 1), o);
    std::memcpy(logp->typed_data(), f.logp.data(), f.logp.size() * sizeof(float));
    for (size_t s = 0; s < f.num_tokens.size(); ++s)
      num_tokens->typed_data()[s] = static_cast<int32_t>(f.num_tokens[s]);
    return ffi::Error::Success();
  });
}

ffi::Error KlPartialImpl(ffi::Buffer<ffi::F32> policy, ffi::Buffer<ffi::F32> reference,
                         ffi::Buffer<ffi::S32> num_tokens, int32_t kl_estimator,
                         ffi::ResultBuffer<ffi::F32> partial) {
  return guarded([&] {
    kto::Options o;
    o.kl_estimator = static_cast<kto::KlEstimator>(kl_estimator);
    const auto n = widen(num_tokens);
    const kto::KlPartial p = kto::kl_partial<float>(kto::policy_logp(span_of<float>(policy)),
                                                    kto::reference_logp(span_of<float>(reference)),
                                                    kto::make_span(n.data(), n.size()), o);
    partial->typed_data()[0] = static_cast<float>(p.sum);
    partial->typed_data()[1] = static_cast<float>(p.count);
    return ffi::Error::Success();
  });
}

ffi::Error StepForwardImpl(ffi::AnyBuffer logits, ffi::Buffer<ffi::S32> targets,
                           ffi::Buffer<ffi::S32> offsets, ffi::Buffer<ffi::F32> reference_logp,
                           ffi::Buffer<ffi::U8> desirable, ffi::Buffer<ffi::F32> kl_policy_logp,
                           ffi::Buffer<ffi::F32> kl_reference_logp,
                           ffi::Buffer<ffi::S32> kl_num_tokens, ffi::Buffer<ffi::F32> global_kl,
                           ffi::Span<const double> options, ffi::ResultBuffer<ffi::F32> metrics,
                           ffi::ResultBuffer<ffi::F32> per_example,
                           ffi::ResultBuffer<ffi::S32> num_tokens,
                           ffi::ResultBuffer<ffi::F32> row_lse,
                           ffi::ResultBuffer<ffi::F32> statistics) {
  if (auto e = require_rank(logits, 2, kStep, "logits", "2-D [rows, vocab]"); !e.success())
    return e;
  kto::KlAllReduce hook;
  if (auto e = global_kl_hook(global_kl, kStep, hook); !e.success()) return e;
  const auto t = widen(targets);
  const auto off = widen(offsets);
  const auto kl_n = widen(kl_num_tokens);
  const auto B = static_cast<index_t>(off.size()) - 1;
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kStep, o));
  if (auto e = check_statistics_result(kStep, statistics->element_count(), o.token_statistics, B);
      !e.success())
    return e;
  return dispatch(logits.element_type(), kStep, "logits", [&](auto tag) {
    using T = decltype(tag);
    kto::cpu::StepInputs<T> in{
        logits_of<T>(logits),
        kto::targets_vector(t.data(), static_cast<index_t>(t.size())),
        kto::sequences(off.data(), B),
        kto::reference_logp(span_of<float>(reference_logp)),
        kto::make_span(desirable.typed_data(), static_cast<index_t>(desirable.element_count())),
        {}};
    if (!hook)
      in.kl = {kto::policy_logp(span_of<float>(kl_policy_logp)),
               kto::reference_logp(span_of<float>(kl_reference_logp)),
               kto::make_span(kl_n.data(), static_cast<index_t>(kl_n.size()))};
    const auto r = kto::cpu::step_forward<T>(in, o, {}, hook);
    metrics_values(r.metrics, metrics->typed_data());
    write_per_example(r.logp, r.examples, B, per_example->typed_data());
    for (index_t s = 0; s < B; ++s)
      num_tokens->typed_data()[s] = static_cast<int32_t>(r.num_tokens[s]);
    std::copy(r.row_lse.begin(), r.row_lse.end(), row_lse->typed_data());
    write_token_statistics(r.token_statistics, B, statistics);
    return ffi::Error::Success();
  });
}

ffi::Error StepBackwardImpl(ffi::AnyBuffer logits, ffi::Buffer<ffi::S32> targets,
                            ffi::Buffer<ffi::S32> offsets, ffi::Buffer<ffi::F32> row_lse,
                            ffi::Buffer<ffi::F32> grad_logp, ffi::Buffer<ffi::S32> num_tokens,
                            ffi::Buffer<ffi::F32> loss_cotangent, ffi::Span<const double> options,
                            ffi::Result<ffi::AnyBuffer> dlogits) {
  if (auto e = require_rank(logits, 2, kStep, "logits", "2-D [rows, vocab]"); !e.success())
    return e;
  if (dlogits->element_type() != logits.element_type())
    return ffi::Error::InvalidArgument("kto_jax.kto_loss: dlogits must have the logits' dtype");
  const auto t = widen(targets);
  const auto off = widen(offsets);
  const auto B = static_cast<index_t>(off.size()) - 1;
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kStep, o));
  return dispatch(logits.element_type(), kStep, "logits", [&](auto tag) {
    using T = decltype(tag);
    const kto::cpu::StepInputs<T> in{logits_of<T>(logits),
                                     kto::targets_vector(t.data(), static_cast<index_t>(t.size())),
                                     kto::sequences(off.data(), B),
                                     {},
                                     {},
                                     {}};
    // The residuals of step_forward, as step_backward takes them.
    kto::cpu::StepResult<float> fwd;
    fwd.row_lse.assign(row_lse.typed_data(), row_lse.typed_data() + row_lse.element_count());
    fwd.examples.grad_logp.assign(grad_logp.typed_data(),
                                  grad_logp.typed_data() + grad_logp.element_count());
    fwd.num_tokens = widen(num_tokens);
    const auto d = logits.dimensions();
    kto::cpu::step_backward<T>(
        in, fwd, o, kto::logits_matrix<T>(static_cast<T*>(dlogits->untyped_data()), d[0], d[1]), {},
        static_cast<double>(loss_cotangent.typed_data()[0]));
    return ffi::Error::Success();
  });
}

/// The lm_head (or its vocabulary slice starting at vocab_begin of vocab_total).
template <class T>
kto::LinearHead<T> head_of(const ffi::AnyBuffer& weight, const ffi::AnyBuffer& bias,
                           index_t vocab_begin = 0, index_t vocab_total = 0) {
  kto::LinearHead<T> head;
  head.weight = matrix_of<T>(weight);
  head.bias = kto::make_span(static_cast<const T*>(bias.untyped_data()),
                             static_cast<index_t>(bias.element_count()));
  head.vocab_begin = vocab_begin;
  head.vocab_total = vocab_total;
  return head;
}

ffi::Error check_fused_operands(const char* fn, const ffi::AnyBuffer& hidden,
                                const ffi::AnyBuffer& weight, const ffi::AnyBuffer& bias) {
  if (auto e = require_rank(hidden, 2, fn, "hidden", "2-D [rows, D]"); !e.success()) return e;
  if (auto e = require_rank(weight, 2, fn, "weight", "2-D [V, D]"); !e.success()) return e;
  if (weight.element_type() != hidden.element_type() ||
      bias.element_type() != hidden.element_type())
    return ffi::Error::InvalidArgument(std::string(fn) +
                                       ": hidden, weight and bias must share one dtype");
  return ffi::Error::Success();
}

ffi::Error FusedLogprobsImpl(ffi::AnyBuffer hidden, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                             ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::S32> offsets,
                             ffi::Span<const double> options, int64_t chunk_bytes,
                             ffi::ResultBuffer<ffi::F32> logp,
                             ffi::ResultBuffer<ffi::S32> num_tokens) {
  if (auto e = check_fused_operands(kFusedLogprobs, hidden, weight, bias); !e.success()) return e;
  const auto t = widen(targets);
  const auto off = widen(offsets);
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kFusedLogprobs, o));
  return dispatch(hidden.element_type(), kFusedLogprobs, "hidden", [&](auto tag) {
    using T = decltype(tag);
    kto::cpu::FusedLinearConfig cfg;
    cfg.chunk_bytes = static_cast<size_t>(chunk_bytes);
    const auto f = kto::cpu::fused_linear_logprobs<T>(
        matrix_of<T>(hidden), kto::targets_vector(t.data(), static_cast<index_t>(t.size())),
        kto::sequences(off.data(), static_cast<index_t>(off.size()) - 1), head_of<T>(weight, bias),
        o, cfg);
    std::memcpy(logp->typed_data(), f.logp.data(), f.logp.size() * sizeof(float));
    for (size_t s = 0; s < f.num_tokens.size(); ++s)
      num_tokens->typed_data()[s] = static_cast<int32_t>(f.num_tokens[s]);
    return ffi::Error::Success();
  });
}

/// One batch of hidden states: its views over widened ids and offsets.
struct Batch {
  std::vector<index_t> targets, offsets;
  bool present() const { return !offsets.empty(); }
  kto::TargetsView targets_view() const {
    return present() ? kto::targets_vector(targets.data(), static_cast<index_t>(targets.size()))
                     : kto::TargetsView{};
  }
  kto::SequencesView sequences() const {
    return present() ? kto::sequences(offsets.data(), static_cast<index_t>(offsets.size()) - 1)
                     : kto::SequencesView{};
  }
};

ffi::Error RowPartialsImpl(ffi::AnyBuffer hidden, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                           ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::S32> offsets,
                           ffi::Buffer<ffi::S32> vocab_begin, ffi::Span<const double> options,
                           int64_t vocab_total, int64_t chunk_bytes,
                           ffi::ResultBuffer<ffi::F32> partials) {
  if (auto e = check_fused_operands(kPartials, hidden, weight, bias); !e.success()) return e;
  const Batch target{widen(targets), widen(offsets)};
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kPartials, o));
  return dispatch(hidden.element_type(), kPartials, "hidden", [&](auto tag) {
    using T = decltype(tag);
    const auto head = head_of<T>(weight, bias, vocab_begin.typed_data()[0], vocab_total);
    kto::cpu::FusedLinearInputs<T> in;
    in.hidden = matrix_of<T>(hidden);
    in.targets = target.targets_view();
    in.sequences = target.sequences();
    kto::cpu::FusedLinearConfig cfg;
    cfg.chunk_bytes = static_cast<size_t>(chunk_bytes);
    const auto rows = kto::cpu::fused_linear_row_partials<T>(in, head, o, cfg);
    float* out = partials->typed_data();
    for (size_t r = 0; r < rows.size(); ++r) {
      out[2 * r] = rows[r].lse;  // unscored rows: 0, never read
      out[2 * r + 1] = rows[r].target_logit;
    }
    return ffi::Error::Success();
  });
}

/// vocab_blocks is the CUDA step's (kto::cuda); the CPU step has no such strategy.
ffi::Error check_cpu_strategy(int32_t strategy) {
  if (strategy == static_cast<int32_t>(kto::FusedStrategy::keep_chunk) ||
      strategy == static_cast<int32_t>(kto::FusedStrategy::recompute))
    return ffi::Error::Success();
  return ffi::Error::InvalidArgument(
      std::string(kFused) + ": argument 'strategy' must be 'keep_chunk' or 'recompute' on cpu" +
      (strategy == static_cast<int32_t>(kto::FusedStrategy::vocab_blocks)
           ? " ('vocab_blocks' runs on CUDA only); got 'vocab_blocks'"
           : "; got code " + std::to_string(strategy)));
}

ffi::Error FusedStepImpl(ffi::AnyBuffer hidden, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                         ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::S32> offsets,
                         ffi::Buffer<ffi::F32> reference_logp, ffi::Buffer<ffi::U8> desirable,
                         ffi::Buffer<ffi::F32> global_kl, ffi::Buffer<ffi::F32> gathered,
                         ffi::Buffer<ffi::S32> vocab_begin, ffi::Span<const double> options,
                         int64_t vocab_total, int64_t chunk_bytes, int32_t strategy,
                         ffi::ResultBuffer<ffi::F32> metrics,
                         ffi::ResultBuffer<ffi::F32> per_example,
                         ffi::ResultBuffer<ffi::S32> num_tokens,
                         ffi::ResultBuffer<ffi::F32> row_lse,
                         ffi::ResultBuffer<ffi::F32> statistics,
                         ffi::ResultBuffer<ffi::F32> d_hidden, ffi::Result<ffi::AnyBuffer> d_weight,
                         ffi::ResultBuffer<ffi::F32> d_bias) {
  if (auto e = check_fused_operands(kFused, hidden, weight, bias); !e.success()) return e;
  KTO_JAX_TRY(check_cpu_strategy(strategy));
  kto::bind::DType dw_dtype;
  const bool known = dtype_code(d_weight->element_type(), dw_dtype);
  if (!known || dw_dtype != kto::bind::DType::f32)
    return ffi::Error::InvalidArgument(
        std::string(kFused) +
        ": argument 'd_weight' (the dW result) must be float32 on cpu (dW in the input dtype "
        "comes with 'vocab_blocks', CUDA only); got " +
        (known ? kto::bind::dtype_name(dw_dtype) : "another dtype"));
  kto::KlAllReduce hook;
  if (auto e = global_kl_hook(global_kl, kFused, hook); !e.success()) return e;
  const Batch target{widen(targets), widen(offsets)};
  kto::Options o;
  KTO_JAX_TRY(decode_options(options, kFused, o));
  if (auto e = check_statistics_result(kFused, statistics->element_count(), o.token_statistics,
                                       target.sequences().count);
      !e.success())
    return e;
  return dispatch(hidden.element_type(), kFused, "hidden", [&](auto tag) {
    using T = decltype(tag);
    const auto head = head_of<T>(weight, bias, vocab_begin.typed_data()[0], vocab_total);
    const index_t N = hidden.dimensions()[0], D = hidden.dimensions()[1];
    const index_t V = weight.dimensions()[0], B = target.sequences().count;
    // The KL batch enters as its all-reduced (S, C) (the hook) or not at all.
    kto::cpu::FusedLinearInputs<T> in;
    in.hidden = matrix_of<T>(hidden);
    in.targets = target.targets_view();
    in.sequences = target.sequences();
    in.reference_logp = kto::reference_logp(span_of<float>(reference_logp));
    in.desirable =
        kto::make_span(desirable.typed_data(), static_cast<index_t>(desirable.element_count()));
    const kto::cpu::LinearGradients<float> grads{
        kto::matrix_view(d_hidden->typed_data(), N, D),
        kto::matrix_view(static_cast<float*>(d_weight->untyped_data()), V, D),
        kto::make_span(d_bias->typed_data(), static_cast<index_t>(d_bias->element_count()))};
    kto::cpu::FusedLinearConfig cfg;
    cfg.chunk_bytes = static_cast<size_t>(chunk_bytes);
    cfg.strategy = static_cast<kto::FusedStrategy>(strategy);
    kto::cpu::FusedLinearHooks<float> hooks;
    hooks.kl_all_reduce = hook;
    if (head.sharded()) {
      // The caller all-gathered every slice's row partials (rank-major, [slices, N, 2]):
      // the step takes them as they are and computes none of its own. On a vocab axis of
      // one device the head is whole and its one slice's partials are not needed.
      const auto floats = static_cast<index_t>(gathered.element_count());
      const index_t ranks = N > 0 ? floats / (2 * N) : 0;
      if (N > 0 && (ranks < 2 || ranks * 2 * N != floats))
        return ffi::Error::InvalidArgument(
            std::string(kFused) + ": argument 'gathered' must hold [slices >= 2, " +
            std::to_string(N) + ", 2] row partials; got " + std::to_string(floats) + " floats");
      static_assert(sizeof(kto::RowPartial<float>) == 2 * sizeof(float), "two floats a row");
      hooks.gathered_partials = {
          kto::make_span(reinterpret_cast<const kto::RowPartial<float>*>(gathered.typed_data()),
                         floats / 2),
          ranks};
    }
    const auto r = kto::cpu::fused_linear_kto_step<T>(in, head, o, grads, cfg, {}, hooks);
    metrics_values(r.metrics, metrics->typed_data());
    write_per_example(r.logp, r.examples, B, per_example->typed_data());
    for (index_t s = 0; s < B; ++s)
      num_tokens->typed_data()[s] = static_cast<int32_t>(r.num_tokens[s]);
    std::copy(r.row_lse.begin(), r.row_lse.end(), row_lse->typed_data());
    write_token_statistics(r.token_statistics, B, statistics);
    return ffi::Error::Success();
  });
}

}  // namespace

// The library's binding-contract constants, read by kto_jax at import through
// ctypes, so that their one home stays kto/metrics.hpp, kto/options.hpp and
// kto/fused_linear.hpp.
extern "C" int KtoOptionCount() {
  return kto::kOptionCount;
}
extern "C" const char* KtoOptionName(int i) {
  return kto::kOptionNames[i];
}
/// The number of named values of option i (0 for numbers and flags), and their names.
extern "C" int KtoOptionChoiceCount(int i) {
  return kto::option_choices(i).count;
}
extern "C" const char* KtoOptionChoiceName(int i, int code) {
  return kto::option_choices(i).names[code];
}
/// The fused step's strategy names at their codes (kto::FusedStrategy).
extern "C" int KtoStrategyCount() {
  return kto::kFusedStrategyCount;
}
extern "C" const char* KtoStrategyName(int code) {
  return kto::kFusedStrategyNames[code];
}
extern "C" int KtoMetricCount() {
  return kto::kMetricCount;
}
extern "C" const char* KtoMetricName(int i) {
  return kto::kMetricNames[i];
}
extern "C" int KtoExampleOutputCount() {
  return kto::kExampleOutputCount;
}
extern "C" const char* KtoExampleOutputName(int i) {
  return kto::kExampleOutputNames[i];
}
extern "C" int64_t KtoDefaultChunkBytes(int cuda) {
  return static_cast<int64_t>(cuda ? kto::kDefaultCudaChunkBytes : kto::kDefaultCpuChunkBytes);
}

// Runtime ISA dispatch (kto_jax/_library.py): the level this copy was compiled for, the
// level the CPU runs (compiled for the baseline), and what Eigen vectorises with.
extern "C" const char* KtoCompiledIsa() {
  return kto::cpu::compiled_isa();
}
extern "C" KTO_ISA_BASELINE const char* KtoCpuIsa() {
  return kto::cpu::cpu_isa();
}
extern "C" const char* KtoEigenSimd() {
  return Eigen::SimdInstructionSetsInUse();
}
extern "C" int KtoEigenVersion() {
  return EIGEN_WORLD_VERSION * 10000 + EIGEN_MAJOR_VERSION * 100 + EIGEN_MINOR_VERSION;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoSequenceLogprobs, SequenceLogprobsImpl,
                              KTO_JAX_BIND_SEQUENCE_LOGPROBS(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoKlPartial, KlPartialImpl,
                              KTO_JAX_BIND_KL_PARTIAL(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoStepForward, StepForwardImpl,
                              KTO_JAX_BIND_STEP_FORWARD(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoStepBackward, StepBackwardImpl,
                              KTO_JAX_BIND_STEP_BACKWARD(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoFusedLinearLogprobs, FusedLogprobsImpl,
                              KTO_JAX_BIND_FUSED_LINEAR_LOGPROBS(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoFusedLinearRowPartials, RowPartialsImpl,
                              KTO_JAX_BIND_FUSED_LINEAR_ROW_PARTIALS(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoFusedLinearStep, FusedStepImpl,
                              KTO_JAX_BIND_FUSED_LINEAR_STEP(ffi::Ffi::Bind()));
