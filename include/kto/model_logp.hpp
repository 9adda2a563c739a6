// model_logp.hpp — per-example log-probs tagged with the model that produced them.
//
// The policy's and the reference model's log-probs have the same element type,
// so as plain spans a swapped pair compiles and silently negates every ratio
// ρ = logp_policy − logp_reference (and z0 with them). PolicyLogp and
// ReferenceLogp are distinct types that are built only by name:
//
//     kto::cpu::KlInputs<float> kl{kto::policy_logp(p), kto::reference_logp(r), tokens};
//
// Neither converts into the other, and a bare Span converts into neither, so a
// swap (or a forgotten name) is a compile error. Both are Spans, so the code
// that reads them is unchanged; on CUDA they hold device pointers.
#pragma once

#include <vector>

#include "layout.hpp"

namespace kto {

/// Per-example log-probs of the policy model.
template <class Acc>
struct PolicyLogp : Span<const Acc> {
  PolicyLogp() = default;
  KTO_HOST_DEVICE explicit PolicyLogp(Span<const Acc> values) : Span<const Acc>(values) {}
};

/// Per-example log-probs of the reference model.
template <class Acc>
struct ReferenceLogp : Span<const Acc> {
  ReferenceLogp() = default;
  KTO_HOST_DEVICE explicit ReferenceLogp(Span<const Acc> values) : Span<const Acc>(values) {}
};

template <class Acc>
PolicyLogp<Acc> policy_logp(const Acc* data, index_t size) {
  return PolicyLogp<Acc>(Span<const Acc>(data, size));
}
template <class Acc>
PolicyLogp<Acc> policy_logp(Span<const Acc> values) {
  return PolicyLogp<Acc>(values);
}
template <class Acc, class A>
PolicyLogp<Acc> policy_logp(const std::vector<Acc, A>& values) {
  return PolicyLogp<Acc>(make_span(values));
}

template <class Acc>
ReferenceLogp<Acc> reference_logp(const Acc* data, index_t size) {
  return ReferenceLogp<Acc>(Span<const Acc>(data, size));
}
template <class Acc>
ReferenceLogp<Acc> reference_logp(Span<const Acc> values) {
  return ReferenceLogp<Acc>(values);
}
template <class Acc, class A>
ReferenceLogp<Acc> reference_logp(const std::vector<Acc, A>& values) {
  return ReferenceLogp<Acc>(make_span(values));
}

}  // namespace kto
