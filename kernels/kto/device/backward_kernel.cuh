// backward_kernel.cuh — ∂L/∂Z[r, v] = g_s · c_r · (1[v = t_r] − exp(Z[r, v] − lse_r)).
//
// One pass: read the row, write its gradient in the logit type with streaming
// (evict-first) stores; lse_r comes from the forward (4 bytes a row), g_s from
// the finish. The row's sequence is found by binary search over the offsets.
// Unscored rows (ignored, outside every sequence, bad target) are written as
// zeros, so every element of the output is written. The output may be the
// logits themselves (in place): each thread reads its elements before writing
// them, and the loads are plain (not the read-only path).
//
// With kExtended the row is transformed as it is read (z' = transform(z)) and
// each value is multiplied by ∂z'/∂z: out_v = g_s c_r (1[v = t] − e^(z'_v − lse_r)) ∂z'_v/∂z_v.
#pragma once

#include <kto/example_loss.hpp>
#include <kto/layout.hpp>

#include "forward_kernels.cuh"
#include "numeric.cuh"

namespace kto {
namespace device {

template <class T>
struct BackwardParams {
  LogitsView<const T> logits;
  TargetsView targets;
  SequencesView sequences;
  index_t ignore_index;
  bool average;
  const float* row_lse;
  const float* grad_logp;     ///< per sequence
  const index_t* num_tokens;  ///< per sequence
  LogitsView<T> grad;
  const float* cotangent = nullptr;  ///< device scalar scaling the loss; null: 1
  RowTransform transform{};          ///< read by the kExtended kernel only
};

using kto::sequence_of_row;

/// scale (1[v = t] − e^(x' − lse)) ∂x'/∂x at column v (x' = x without kExtended).
template <bool kExtended>
KTO_HOST_DEVICE inline float logit_gradient(float x, index_t v, index_t target, float lse,
                                            float scale, const RowTransform& transform) {
  const float onehot = v == target ? scale : 0.0f;
  if constexpr (kExtended) {
    float derivative;
    const float xt = transform.apply(x, derivative);
    return (onehot - scale * expf(xt - lse)) * derivative;
  } else {
    return onehot - scale * expf(x - lse);
  }
}

template <class T, int kThreads, bool kExtended = false>
KTO_HOST_DEVICE inline void write_row(const T* in, T* out, index_t vocab, index_t target, float lse,
                                      float scale, int lane, bool zero,
                                      const RowTransform& transform = {}) {
  constexpr int W = Vec<T>::kWidth;
  auto value = [&](float z, index_t v) {
    return zero ? 0.0f : logit_gradient<kExtended>(z, v, target, lse, scale, transform);
  };
  // Vectors only where input and output share their alignment.
  const bool vectorised =
      (reinterpret_cast<std::uintptr_t>(in) % 16) == (reinterpret_cast<std::uintptr_t>(out) % 16);
  const RowSpan span = vectorised ? row_span<T>(out, vocab) : RowSpan{vocab, 0, vocab};
  for (index_t i = lane; i < span.head; i += kThreads)
    out[i] = from_float<T>(value(zero ? 0.0f : to_float(in[i]), i));
  const Vec<T>* vin = reinterpret_cast<const Vec<T>*>(in + span.head);
  Vec<T>* vout = reinterpret_cast<Vec<T>*>(out + span.head);
  KTO_UNROLL(4)
  for (index_t i = lane; i < span.vectors; i += kThreads) {
    Vec<T> v;
    if (!zero) v = vin[i];
    const index_t base = span.head + i * W;
    KTO_UNROLL()
    for (int k = 0; k < W; ++k)
      v.v[k] = from_float<T>(value(zero ? 0.0f : to_float(v.v[k]), base + k));
    store_streaming(vout + i, v);
  }
  for (index_t i = span.tail + lane; i < vocab; i += kThreads)
    out[i] = from_float<T>(value(zero ? 0.0f : to_float(in[i]), i));
}

template <class T, int kThreads, int kRowsPerBlock, bool kExtended>
__global__ void __launch_bounds__(kThreads* kRowsPerBlock)
    row_backward_kernel(BackwardParams<T> p) {
  const int lane = static_cast<int>(threadIdx.x) % kThreads;
  const index_t r = static_cast<index_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreads;
  const index_t rows = p.logits.rows.rows;
  if (r >= rows) return;
  const index_t t = row_target(p.sequences, p.targets, rows, r, p.ignore_index);
  const bool scored = t != p.ignore_index && t >= 0 && t < p.logits.vocab;
  float scale = 0.0f, lse = 0.0f;
  if (scored) {
    const index_t s = sequence_of_row(p.sequences, r);
    // g_s · cotangent rounded to float first, as kto::cpu::step_backward does.
    const float g = p.cotangent ? static_cast<float>(static_cast<double>(p.grad_logp[s]) *
                                                     static_cast<double>(*p.cotangent))
                                : p.grad_logp[s];
    scale = static_cast<float>(token_scale(static_cast<double>(g), p.num_tokens[s], p.average));
    lse = p.row_lse[r];
  }
  write_row<T, kThreads, kExtended>(p.logits.row(r), p.grad.row(r), p.logits.vocab, t, lse, scale,
                                    lane, !scored, p.transform);
}

}  // namespace device
}  // namespace kto
