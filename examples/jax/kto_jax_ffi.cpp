// kto_jax_ffi.cpp — XLA FFI handlers (CPU) that run the kto Eigen path for JAX.
//
// Three targets, registered from kto_jax.py:
//   kto_sequence_logprobs  logits [N, V], targets [N], offsets [B+1] → logp [B], n [B]
//   kto_step_forward       the target batch + reference/KL log-probs → metrics [9],
//                          per-example [5, B] (logp, ρ, βρ, loss, g_s), n [B], lse [N]
//   kto_step_backward      residuals + the loss cotangent → dlogits [N, V] (logit dtype)
// Dtype dispatch (f32 / bf16 / f16) happens here, at the edge; the library
// below is templated on the logit type. JAX's int32 ids and offsets are
// widened to the library's int64 (O(rows)). kto::Error becomes an FFI
// InvalidArgument error carrying the library's message.
#include <kto/kto.hpp>

#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using kto::index_t;

std::vector<index_t> widen(const ffi::Buffer<ffi::S32>& b) {
  const auto* p = b.typed_data();
  return std::vector<index_t>(p, p + b.element_count());
}

/// Calls fn(T*) with the logits' element type, or reports an unsupported one.
template <class Fn>
ffi::Error dispatch(ffi::DataType dtype, Fn&& fn) {
  try {
    switch (dtype) {
      case ffi::DataType::F32:
        fn(float{});
        break;
      case ffi::DataType::BF16:
        fn(Eigen::bfloat16{});
        break;
      case ffi::DataType::F16:
        fn(Eigen::half{});
        break;
      default:
        return ffi::Error::InvalidArgument(
            "kto: argument 'logits' must be float32, bfloat16 or float16");
    }
  } catch (const kto::Error& e) {
    return ffi::Error::InvalidArgument(e.what());
  }
  return ffi::Error::Success();
}

struct Rows {
  index_t rows, vocab;
};

ffi::Error logits_shape(const ffi::AnyBuffer& logits, Rows& out) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2)
    return ffi::Error::InvalidArgument("kto: argument 'logits' must be 2-D [rows, vocab]");
  out = Rows{dims[0], dims[1]};
  return ffi::Error::Success();
}

ffi::Error SequenceLogprobsImpl(ffi::AnyBuffer logits, ffi::Buffer<ffi::S32> targets,
                                ffi::Buffer<ffi::S32> offsets, int64_t ignore_index, bool average,
                                ffi::ResultBuffer<ffi::F32> logp,
                                ffi::ResultBuffer<ffi::S32> num_tokens) {
  Rows shape{};
  if (auto err = logits_shape(logits, shape); !err.success()) return err;
  const auto t = widen(targets);
  const auto off = widen(offsets);
  kto::Options o;
  o.ignore_index = ignore_index;
  o.average_logprob = average;
  return dispatch(logits.element_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto f = kto::cpu::sequence_logprobs<T>(
        kto::logits_matrix<const T>(static_cast<const T*>(logits.untyped_data()), shape.rows,
                                    shape.vocab),
        kto::targets_vector(t.data(), static_cast<index_t>(t.size())),
        kto::sequences(off.data(), static_cast<index_t>(off.size()) - 1), o);
    std::memcpy(logp->typed_data(), f.logp.data(), f.logp.size() * sizeof(float));
    for (size_t s = 0; s < f.num_tokens.size(); ++s)
      num_tokens->typed_data()[s] = static_cast<int32_t>(f.num_tokens[s]);
  });
}

ffi::Error StepForwardImpl(ffi::AnyBuffer logits, ffi::Buffer<ffi::S32> targets,
                           ffi::Buffer<ffi::S32> offsets, ffi::Buffer<ffi::F32> reference_logp,
                           ffi::Buffer<ffi::U8> desirable, ffi::Buffer<ffi::F32> kl_policy_logp,
                           ffi::Buffer<ffi::F32> kl_reference_logp,
                           ffi::Buffer<ffi::S32> kl_num_tokens, double beta,
                           double desirable_weight, double undesirable_weight, int32_t loss_type,
                           int32_t link, int32_t reference_point, int32_t kl_estimator,
                           bool clamp_kl, double fixed_z0, bool average, int32_t reduction,
                           int64_t ignore_index, ffi::ResultBuffer<ffi::F32> metrics,
                           ffi::ResultBuffer<ffi::F32> per_example,
                           ffi::ResultBuffer<ffi::S32> num_tokens,
                           ffi::ResultBuffer<ffi::F32> row_lse) {
  Rows shape{};
  if (auto err = logits_shape(logits, shape); !err.success()) return err;
  const auto t = widen(targets);
  const auto off = widen(offsets);
  const auto kl_n = widen(kl_num_tokens);
  const auto B = static_cast<index_t>(off.size()) - 1;
  const auto K = static_cast<index_t>(kl_policy_logp.element_count());
  const kto::Options o = kto::options_from_codes(
      beta, desirable_weight, undesirable_weight, loss_type, link, reference_point, kl_estimator,
      clamp_kl, fixed_z0, average, reduction, /*mean_denominator=*/0, ignore_index);
  return dispatch(logits.element_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto fwd = kto::cpu::sequence_logprobs<T>(
        kto::logits_matrix<const T>(static_cast<const T*>(logits.untyped_data()), shape.rows,
                                    shape.vocab),
        kto::targets_vector(t.data(), static_cast<index_t>(t.size())),
        kto::sequences(off.data(), B), o);
    kto::KlPartial kl;
    if (kto::uses_kl_batch(o))
      kl = kto::kl_partial<float>(kto::make_span(kl_policy_logp.typed_data(), K),
                                  kto::make_span(kl_reference_logp.typed_data(), K),
                                  kto::make_span(kl_n.data(), K), o);
    const auto fin = kto::finish<float>(
        kl, kto::make_span(fwd.logp),
        kto::make_span(reference_logp.typed_data(),
                       static_cast<index_t>(reference_logp.element_count())),
        kto::make_span(desirable.typed_data(), static_cast<index_t>(desirable.element_count())), o);
    const kto::Metrics& m = fin.metrics;
    const double values[9] = {m.loss,
                              m.kl,
                              m.rewards_chosen,
                              m.rewards_rejected,
                              m.rewards_margins,
                              m.logps_chosen,
                              m.logps_rejected,
                              static_cast<double>(m.count_chosen),
                              static_cast<double>(m.count_rejected)};
    for (int i = 0; i < 9; ++i) metrics->typed_data()[i] = static_cast<float>(values[i]);
    float* ex = per_example->typed_data();
    const std::vector<float>* rows[5] = {&fwd.logp, &fin.examples.ratio, &fin.examples.reward,
                                         &fin.examples.loss, &fin.examples.grad_logp};
    for (int k = 0; k < 5; ++k) std::memcpy(ex + k * B, rows[k]->data(), B * sizeof(float));
    for (index_t s = 0; s < B; ++s)
      num_tokens->typed_data()[s] = static_cast<int32_t>(fwd.num_tokens[s]);
    std::memcpy(row_lse->typed_data(), fwd.row_lse.data(), fwd.row_lse.size() * sizeof(float));
  });
}

ffi::Error StepBackwardImpl(ffi::AnyBuffer logits, ffi::Buffer<ffi::S32> targets,
                            ffi::Buffer<ffi::S32> offsets, ffi::Buffer<ffi::F32> row_lse,
                            ffi::Buffer<ffi::F32> grad_logp, ffi::Buffer<ffi::S32> num_tokens,
                            ffi::Buffer<ffi::F32> loss_cotangent, bool average,
                            int64_t ignore_index, ffi::Result<ffi::AnyBuffer> dlogits) {
  Rows shape{};
  if (auto err = logits_shape(logits, shape); !err.success()) return err;
  if (dlogits->element_type() != logits.element_type())
    return ffi::Error::InvalidArgument("kto: dlogits must have the logits' dtype");
  const auto t = widen(targets);
  const auto off = widen(offsets);
  const auto n = widen(num_tokens);
  const auto B = static_cast<index_t>(off.size()) - 1;
  // Chain rule: dL_total/dlogp_s = cotangent · g_s.
  const float ct = loss_cotangent.typed_data()[0];
  std::vector<float> g(grad_logp.typed_data(), grad_logp.typed_data() + B);
  for (float& x : g) x *= ct;
  kto::Options o;
  o.ignore_index = ignore_index;
  o.average_logprob = average;
  return dispatch(logits.element_type(), [&](auto tag) {
    using T = decltype(tag);
    kto::cpu::backward<T>(
        kto::logits_matrix<const T>(static_cast<const T*>(logits.untyped_data()), shape.rows,
                                    shape.vocab),
        kto::targets_vector(t.data(), static_cast<index_t>(t.size())),
        kto::sequences(off.data(), B), kto::make_span(row_lse.typed_data(), shape.rows),
        kto::make_span(g), kto::make_span(n), o,
        kto::logits_matrix<T>(static_cast<T*>(dlogits->untyped_data()), shape.rows, shape.vocab));
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoSequenceLogprobs, SequenceLogprobsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("ignore_index")
                                  .Attr<bool>("average")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoStepForward, StepForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<double>("beta")
                                  .Attr<double>("desirable_weight")
                                  .Attr<double>("undesirable_weight")
                                  .Attr<int32_t>("loss_type")
                                  .Attr<int32_t>("link")
                                  .Attr<int32_t>("reference_point")
                                  .Attr<int32_t>("kl_estimator")
                                  .Attr<bool>("clamp_kl")
                                  .Attr<double>("fixed_z0")
                                  .Attr<bool>("average")
                                  .Attr<int32_t>("reduction")
                                  .Attr<int64_t>("ignore_index")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtoStepBackward, StepBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("average")
                                  .Attr<int64_t>("ignore_index")
                                  .Ret<ffi::AnyBuffer>());
