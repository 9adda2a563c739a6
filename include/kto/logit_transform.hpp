// logit_transform.hpp — what some models do to their logits before the softmax.
//
//   scale        z ← a·z              (logit_scale: Granite, Cohere, Falcon-H1)
//   soft-cap     z ← c·tanh(z / c)    (final_logit_softcapping: Gemma 2/3; c = 0: off)
//   temperature  z ← z / τ
//
// in this order (TRL 1.16's fused head): z' = c·tanh(a·z / c) / τ, or a·z / τ uncapped.
// The gradient to the raw logit is the chain rule through them:
//
//   ∂z'/∂z = (a / τ)·(1 − tanh²(a·z / c))      (a / τ uncapped)
//
// so a model's lm_head output can go to the loss untransformed, as the fused step
// does with hidden·Wᵀ + b. The options live in Options (logit_scale,
// logit_softcap, temperature); the identity costs nothing.
#pragma once

#include <cmath>

#include "config.hpp"

namespace kto {

struct LogitTransform {
  double scale = 1.0;
  double softcap = 0.0;  ///< 0: no soft-cap
  double temperature = 1.0;
  KTO_HOST_DEVICE bool identity() const {
    return scale == 1.0 && softcap == 0.0 && temperature == 1.0;
  }
  KTO_HOST_DEVICE bool capped() const { return softcap != 0.0; }
  /// The largest |∂z'/∂z|: |a| / τ.
  KTO_HOST_DEVICE double max_derivative() const { return fabs(scale) / temperature; }
};

/// z' of a raw logit.
template <class Acc>
KTO_HOST_DEVICE inline Acc transform_logit(Acc z, const LogitTransform& t) {
  if (!t.capped()) return z * static_cast<Acc>(t.scale / t.temperature);
  return static_cast<Acc>(t.softcap / t.temperature) *
         tanh(z * static_cast<Acc>(t.scale / t.softcap));
}

/// ∂z'/∂z at a raw logit.
template <class Acc>
KTO_HOST_DEVICE inline Acc transform_derivative(Acc z, const LogitTransform& t) {
  const Acc k = static_cast<Acc>(t.scale / t.temperature);
  if (!t.capped()) return k;
  const Acc th = tanh(z * static_cast<Acc>(t.scale / t.softcap));
  return k * (Acc(1) - th * th);
}

}  // namespace kto
