// cpu_ops.hpp — the CPU kernels of kto_torch's ops: dtype dispatch, then one call
// of the library's Eigen CPU path (kto::cpu) on the checked operands
// (operands.hpp), its results as new tensors in the accumulation type (fp32; fp64
// for float64 inputs). The per-ISA copies of the extension (runtime ISA dispatch,
// kto_torch/_isa.py) compile this header once each, for their x86-64 level.
#pragma once

#include <torch/extension.h>

#include <kto/kto.hpp>

#include <cstring>
#include <type_traits>
#include <vector>

#include "operands.hpp"

namespace kto_torch {
namespace {

template <class Fn>
void dispatch(const torch::Tensor& z, Fn&& fn) {
  switch (z.scalar_type()) {
    case torch::kFloat:
      fn(float{});
      break;
    case torch::kDouble:
      fn(double{});
      break;
    case torch::kBFloat16:
      fn(Eigen::bfloat16{});
      break;
    case torch::kHalf:
      fn(Eigen::half{});
      break;
    default:  // unreachable: check_logit_dtype ran first
      TORCH_CHECK_VALUE(false, "kto_torch: unsupported dtype ", z.scalar_type());
  }
}

kto::cpu::ExecutionPolicy exec() {
  kto::cpu::ExecutionPolicy e;
  e.num_threads = at::get_num_threads();
  return e;
}

template <class A>
torch::Tensor acc_tensor(at::IntArrayRef shape) {
  return torch::empty(
      shape, torch::dtype(std::is_same<A, double>::value ? torch::kDouble : torch::kFloat));
}

template <class A>
torch::Tensor tensor_of(const std::vector<A>& v) {
  auto t = acc_tensor<A>({static_cast<int64_t>(v.size())});
  if (!v.empty()) std::memcpy(t.data_ptr(), v.data(), v.size() * sizeof(A));
  return t;
}

torch::Tensor tensor_of(const std::vector<index_t>& v) {
  auto t = torch::empty({static_cast<int64_t>(v.size())}, torch::dtype(torch::kLong));
  if (!v.empty()) std::memcpy(t.data_ptr(), v.data(), v.size() * sizeof(index_t));
  return t;
}

torch::Tensor metrics_tensor(const kto::Metrics& m) {
  auto out = torch::empty({kto::kMetricCount}, torch::dtype(torch::kDouble));
  kto::metrics_to_array(m, out.data_ptr<double>());
  return out;
}

/// per_example [kExampleOutputCount, B] in the library's row order.
template <class A>
torch::Tensor per_example_tensor(const std::vector<A>& logp, const kto::ExampleOutputs<A>& ex,
                                 int64_t B) {
  auto out = acc_tensor<A>({kto::kExampleOutputCount, B});
  const std::vector<A>* rows[kto::kExampleOutputCount] = {};
  rows[kto::kExampleLogp] = &logp;
  rows[kto::kExampleRatio] = &ex.ratio;
  rows[kto::kExampleReward] = &ex.reward;
  rows[kto::kExampleLoss] = &ex.loss;
  rows[kto::kExampleGradLogp] = &ex.grad_logp;
  for (int k = 0; k < kto::kExampleOutputCount; ++k)
    if (B > 0) std::memcpy(out[k].data_ptr(), rows[k]->data(), B * sizeof(A));
  return out;
}

/// token_statistics [2, B] float64: each sequence's sums of its scored tokens'
/// entropy (row 0) and mean logit (row 1); [2, 0] when not requested.
torch::Tensor token_statistics_tensor(const kto::SequenceTokenStatistics& t) {
  const auto B = static_cast<int64_t>(t.entropy_sum.size());
  auto out = torch::empty({2, B}, torch::dtype(torch::kDouble));
  if (B > 0) {
    std::memcpy(out[0].data_ptr(), t.entropy_sum.data(), B * sizeof(double));
    std::memcpy(out[1].data_ptr(), t.mean_logit_sum.data(), B * sizeof(double));
  }
  return out;
}

/// The CPU backend of every op (kto_torch.cpp's Ops<Cpu>).
struct Cpu {
  /// The accumulation type of the kernels' per-sequence inputs and outputs.
  static torch::ScalarType acc(const torch::Tensor& z) { return acc_of(z); }

  /// The dispatcher sends an op here when no argument is on a CUDA device.
  static void check_device(const char* fn, const char* name, const torch::Tensor& z) {
    require(z.device().is_cpu(), fn, name, "be on the CPU (another argument is)", text(z.device()));
  }

  /// keep_chunk and recompute (vocab_blocks is a CUDA strategy).
  static void check_strategy(const char* fn, int64_t strategy) {
    require(strategy == 0 || strategy == 1, fn, "strategy",
            "be keep_chunk (0) or recompute (1) on the CPU (vocab_blocks (2) is CUDA only)",
            text(strategy));
  }

  /// (logp [B], num_tokens [B] int64, row_lse [rows]) in the accumulation type.
  static std::vector<torch::Tensor> sequence_logprobs(const StepOperands& s,
                                                      const kto::Options& o) {
    std::vector<torch::Tensor> out;
    dispatch(s.logits, [&](auto tag) {
      using T = decltype(tag);
      const auto f = kto::cpu::sequence_logprobs<T>(
          logits_view<const T>(s.logits), targets_view(s.targets), s.offsets.view, o, exec());
      out = {tensor_of(f.logp), tensor_of(f.num_tokens), tensor_of(f.row_lse)};
    });
    return out;
  }

  /// metrics [9] float64, per_example [5, B] (logp, ρ, βρ, loss, g_s), num_tokens [B], row_lse
  /// [rows]: kto::cpu::step_forward, with `global_kl` (an all-reduced (S, C)) handed to it through
  /// its all-reduce hook in place of the local KL batch.
  static std::vector<torch::Tensor> step_forward(const StepOperands& s, const StepVectors& v,
                                                 const kto::Options& o) {
    std::vector<torch::Tensor> out;
    dispatch(s.logits, [&](auto tag) {
      using T = decltype(tag);
      using A = kto::accumulator_t<T>;
      kto::cpu::StepInputs<T> in{
          logits_view<const T>(s.logits),
          targets_view(s.targets),
          s.offsets.view,
          kto::reference_logp(span_of<A>(v.reference_logp)),
          kto::make_span(v.desirable.data_ptr<uint8_t>(), v.desirable.numel()),
          {}};
      kto::KlAllReduce all_reduce;
      if (v.global_kl) {
        const auto [S, C] = *v.global_kl;
        all_reduce = [S = S, C = C](kto::KlPartial& p) {
          p.sum = S;
          p.count = C;
        };
      } else {
        in.kl = {kto::policy_logp(span_of<A>(v.kl_policy_logp)),
                 kto::reference_logp(span_of<A>(v.kl_reference_logp)), index_span(v.kl_num_tokens)};
      }
      const auto r = kto::cpu::step_forward<T>(in, o, exec(), all_reduce);
      const int64_t B = s.offsets.count();
      out = {metrics_tensor(r.metrics), per_example_tensor(r.logp, r.examples, B),
             tensor_of(r.num_tokens), tensor_of(r.row_lse),
             token_statistics_tensor(r.token_statistics)};
    });
    return out;
  }

  /// dL/dlogits for dL/dlogp_s = grad_logp[s], as a new contiguous tensor of the logits' shape.
  static torch::Tensor step_backward(const StepOperands& s, const BackwardVectors& b,
                                     const kto::Options& o) {
    auto grad = torch::empty(s.logits.sizes(),
                             s.logits.options().memory_format(torch::MemoryFormat::Contiguous));
    dispatch(s.logits, [&](auto tag) {
      using T = decltype(tag);
      using A = kto::accumulator_t<T>;
      kto::cpu::backward<T>(logits_view<const T>(s.logits), targets_view(s.targets), s.offsets.view,
                            span_of<A>(b.row_lse), span_of<A>(b.grad_logp),
                            index_span(b.num_tokens), o, logits_view<T>(grad), exec());
    });
    return grad;
  }

  /// metrics [9], per_example [5, B], num_tokens [B], d_hidden [N, D], d_weight [V, D], d_bias [V]
  /// (empty without bias): gradients of the loss, in the accumulation type. A frozen head
  /// (!weight_grad, !bias_grad): d_weight [0, D] and d_bias [0], and the library computes
  /// neither (no dW GEMM, no [V, D] buffer). The KL batch is in `o` already (its z0 as a
  /// fixed reference point: operands.hpp's with_kl_reference_point).
  static std::vector<torch::Tensor> fused_linear_forward(const FusedOperands& f,
                                                         const kto::Options& o, int64_t chunk_bytes,
                                                         int64_t strategy, bool weight_grad,
                                                         bool bias_grad) {
    std::vector<torch::Tensor> out;
    dispatch(f.head.hidden, [&](auto tag) {
      using T = decltype(tag);
      using A = kto::accumulator_t<T>;
      const kto::LinearHead<T> head = linear_head<T>(f.head);
      kto::cpu::FusedLinearInputs<T> in;
      in.hidden = matrix_of<T>(f.head.hidden);
      in.targets = targets_view(f.targets);
      in.sequences = f.offsets.view;
      in.reference_logp = kto::reference_logp(span_of<A>(f.v.reference_logp));
      in.desirable = kto::make_span(f.v.desirable.data_ptr<uint8_t>(), f.v.desirable.numel());
      const int64_t N = f.head.N, D = f.head.D, V = f.head.V;
      const bool db_wanted = bias_grad && head.bias.size > 0;
      auto dh = acc_tensor<A>({N, D}), dw = acc_tensor<A>({weight_grad ? V : 0, D});
      auto db = acc_tensor<A>({db_wanted ? V : 0});
      kto::cpu::LinearGradients<A> g;  // d_weight, d_bias: empty views unless asked for
      g.d_hidden = kto::matrix_view(dh.template data_ptr<A>(), N, D);
      if (weight_grad) g.d_weight = kto::matrix_view(dw.template data_ptr<A>(), V, D);
      if (db_wanted) g.d_bias = kto::make_span(db.template data_ptr<A>(), V);
      kto::cpu::FusedLinearConfig cfg;
      cfg.chunk_bytes = static_cast<size_t>(chunk_bytes);
      cfg.strategy = static_cast<kto::cpu::FusedStrategy>(strategy);
      const auto r = kto::cpu::fused_linear_kto_step<T>(in, head, o, g, cfg, exec());
      out = {metrics_tensor(r.metrics),
             per_example_tensor(r.logp, r.examples, f.offsets.count()),
             tensor_of(r.num_tokens),
             dh,
             dw,
             db,
             token_statistics_tensor(r.token_statistics)};
    });
    return out;
  }

  /// Forward only: (logp [B], num_tokens [B]) from hidden states.
  static std::vector<torch::Tensor> fused_linear_logprobs(const FusedLogprobOperands& f,
                                                          const kto::Options& o,
                                                          int64_t chunk_bytes) {
    std::vector<torch::Tensor> out;
    dispatch(f.head.hidden, [&](auto tag) {
      using T = decltype(tag);
      kto::cpu::FusedLinearConfig cfg;
      cfg.chunk_bytes = static_cast<size_t>(chunk_bytes);
      const auto r = kto::cpu::fused_linear_logprobs<T>(matrix_of<T>(f.head.hidden),
                                                        targets_view(f.targets), f.offsets.view,
                                                        linear_head<T>(f.head), o, cfg, exec());
      out = {tensor_of(r.logp), tensor_of(r.num_tokens)};
    });
    return out;
  }
};

}  // namespace
}  // namespace kto_torch
