// logit_transform.cuh — the logit transform (../logit_transform.hpp) in fp32 constants.
//
// The kernels apply z' = (c/τ)·tanh((a/c)·z), or (a/τ)·z uncapped, to every logit
// they read, and multiply each gradient by ∂z'/∂z. The three ratios are rounded to
// float once on the host, as the CPU path rounds them for a float row, so both
// sides evaluate the same expression. Kernels instantiated without a transform
// never read this struct: the default path costs nothing extra.
#pragma once

#include <math.h>

#include <kto/logit_transform.hpp>

namespace kto {
namespace device {

struct RowTransform {
  bool capped = false;
  float slope = 1.0f;  ///< a / τ: the uncapped factor, and ∂z'/∂z at 0
  float inner = 0.0f;  ///< a / c (capped)
  float outer = 0.0f;  ///< c / τ (capped)

  static RowTransform of(const LogitTransform& t) {
    RowTransform r;
    r.capped = t.capped();
    r.slope = static_cast<float>(t.scale / t.temperature);
    if (r.capped) {
      r.inner = static_cast<float>(t.scale / t.softcap);
      r.outer = static_cast<float>(t.softcap / t.temperature);
    }
    return r;
  }

  /// z' of a raw logit.
  KTO_HOST_DEVICE float apply(float z) const {
    return capped ? outer * tanhf(z * inner) : z * slope;
  }

  /// z' of a raw logit, and ∂z'/∂z there in `derivative`.
  KTO_HOST_DEVICE float apply(float z, float& derivative) const {
    if (!capped) {
      derivative = slope;
      return z * slope;
    }
    const float th = tanhf(z * inner);
    derivative = slope * (1.0f - th * th);
    return outer * th;
  }
};

}  // namespace device
}  // namespace kto
