// cuda_ops.hpp — the CUDA kernels of kto_torch's ops (built with nvcc only:
// KTO_TORCH_WITH_CUDA): the checked operands (operands.hpp) as the binding core's call
// structs (kto/bind/arguments.hpp), handed through kto_torch_cuda.h to the core's CUDA
// half (kto/cuda/bind.hpp, the one kto_jax calls too); that header keeps torch's headers
// away from nvcc and CUDA's from this translation unit. Outputs are float32 (the
// kernels' accumulation type) on the logits' device. Errors the kernels record on the
// device are read back after the forward (one stream synchronisation); they and the
// host API's come back as messages, raised here as the CPU path raises them
// (bind::raise_library_error) and put in the Python API's words as theirs are
// (errors.hpp).
#pragma once

#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <kto/bind/compact.hpp>
#include <kto/bind/message.hpp>
#include <kto/kto.hpp>

#include <cstddef>
#include <string>
#include <vector>

#include "kto_torch_cuda.h"
#include "operands.hpp"

namespace kto_torch {
namespace {
namespace cuda_detail {

namespace bind = kto::bind;

/// The CUDA wrapper's message (empty: success) raised as the CPU path would raise it
/// (the binding core's conversion, kto/bind/message.hpp).
void check(const std::string& message) {
  if (!message.empty()) bind::raise_library_error(message);
}

void* stream() {
  return at::cuda::getCurrentCUDAStream().stream();
}

bind::DType dtype_of(const torch::Tensor& x) {
  switch (x.scalar_type()) {
    case torch::kHalf:
      return bind::DType::f16;
    case torch::kBFloat16:
      return bind::DType::bf16;
    default:  // float32: check_logit_dtype ran first
      return bind::DType::f32;
  }
}

bind::Logits logits_of(const torch::Tensor& z) {
  const auto v = logits_view<const char>(z);
  return bind::Logits{dtype_of(z), z.data_ptr(), v.vocab, v.rows};
}

bind::Batch batch_of(const torch::Tensor& targets, const Offsets& offsets) {
  return bind::Batch{targets_view(targets), offsets.view};
}

template <class T>
kto::Span<const T> span_of_vector(const torch::Tensor& x) {
  return kto::make_span(x.data_ptr<T>(), x.numel());
}

/// token_statistics [2, B] float64 on the device (the library writes it), or [2, 0] when
/// not requested, as the CPU ops return.
torch::Tensor token_statistics_on(const torch::Device& d, const kto::Options& o, index_t B) {
  return torch::empty({2, o.token_statistics ? B : 0}, torch::dtype(torch::kDouble).device(d));
}

double* statistics_data(torch::Tensor& statistics, const kto::Options& o) {
  return o.token_statistics ? statistics.data_ptr<double>() : nullptr;
}

torch::Tensor workspace(std::size_t bytes, const torch::Device& d) {
  return torch::empty({static_cast<int64_t>(bytes)}, torch::dtype(torch::kUInt8).device(d));
}

/// Runs a call of the core's workspace protocol: the size query, then the call.
template <class Call>
torch::Tensor run_with_workspace(const torch::Device& d, Call&& call) {
  std::size_t bytes = 0;
  check(call(nullptr, &bytes));
  auto ws = workspace(bytes, d);
  check(call(ws.data_ptr(), &bytes));
  return ws;
}

/// (logp [B], num_tokens [B], row_lse [rows]) in float32.
std::vector<torch::Tensor> sequence_logprobs(const StepOperands& s, const kto::Options& o) {
  const auto d = s.logits.device();
  const c10::cuda::CUDAGuard guard(d);
  const index_t rows = rows_of(s.logits), B = s.offsets.count();
  auto logp = torch::empty({B}, torch::dtype(torch::kFloat).device(d));
  auto n = torch::empty({B}, torch::dtype(torch::kLong).device(d));
  auto lse = torch::empty({rows}, torch::dtype(torch::kFloat).device(d));
  const std::size_t bytes = kto_torch_cuda::sequence_logprobs_workspace_bytes(rows);
  auto ws = workspace(bytes, d);
  check(kto_torch_cuda::sequence_logprobs(logits_of(s.logits), batch_of(s.targets, s.offsets), o,
                                          logp.data_ptr<float>(), n.data_ptr<int64_t>(),
                                          lse.data_ptr<float>(), ws.data_ptr(), bytes, stream()));
  check(kto_torch_cuda::read_status(ws.data_ptr(), s.offsets.view, stream()));
  return {logp, n, lse};
}

std::vector<torch::Tensor> step_forward(const StepOperands& s, const StepVectors& v,
                                        const kto::Options& o) {
  const auto d = s.logits.device();
  const c10::cuda::CUDAGuard guard(d);
  const index_t rows = rows_of(s.logits), B = s.offsets.count();
  const auto f32 = torch::dtype(torch::kFloat).device(d);
  auto metrics = torch::empty({kto::kMetricCount}, torch::dtype(torch::kDouble).device(d));
  auto per_example = torch::empty({kto::kExampleOutputCount, B}, f32);
  auto n = torch::empty({B}, torch::dtype(torch::kLong).device(d));
  auto lse = torch::empty({rows}, f32);
  auto statistics = token_statistics_on(d, o, B);
  bind::StepForwardCall c;
  c.logits = logits_of(s.logits);
  c.batch = batch_of(s.targets, s.offsets);
  c.reference_logp = span_of_vector<float>(v.reference_logp);
  c.desirable = v.desirable.data_ptr<uint8_t>();
  torch::Tensor global_kl;
  if (v.global_kl) {
    global_kl =
        torch::tensor({v.global_kl->first, v.global_kl->second}, torch::dtype(torch::kDouble))
            .to(d);
    c.global_kl = {bind::DType::f64, global_kl.data_ptr<double>()};
  } else if (kto::uses_kl_batch(o) && v.kl_policy_logp.numel() > 0) {
    c.kl.policy_logp = span_of_vector<float>(v.kl_policy_logp);
    c.kl.reference_logp = span_of_vector<float>(v.kl_reference_logp);
    if (v.kl_num_tokens.numel()) c.kl.num_tokens = v.kl_num_tokens.data_ptr<int64_t>();
  }
  c.options = o;
  c.outputs = {metrics.data_ptr<double>(), bind::DType::f64,      per_example.data_ptr<float>(),
               n.data_ptr<int64_t>(),      lse.data_ptr<float>(), statistics_data(statistics, o)};
  const auto ws = run_with_workspace(d, [&](void* w, std::size_t* bytes) {
    return kto_torch_cuda::step_forward(c, w, bytes, stream());
  });
  check(kto_torch_cuda::read_status(ws.data_ptr(), s.offsets.view, stream()));
  return {metrics, per_example, n, lse, statistics};
}

torch::Tensor step_backward(const StepOperands& s, const BackwardVectors& b,
                            const kto::Options& o) {
  const c10::cuda::CUDAGuard guard(s.logits.device());
  auto grad = torch::empty(s.logits.sizes(),
                           s.logits.options().memory_format(torch::MemoryFormat::Contiguous));
  bind::BackwardCall c;
  c.logits = logits_of(s.logits);
  c.batch = batch_of(s.targets, s.offsets);
  c.row_lse = b.row_lse.data_ptr<float>();
  c.grad_logp = b.grad_logp.data_ptr<float>();
  c.num_tokens = b.num_tokens.data_ptr<int64_t>();
  c.options = o;
  c.grad = grad.data_ptr();
  c.grad_rows = logits_view<const char>(grad).rows;
  check(kto_torch_cuda::backward(c, stream()));
  return grad;
}

bind::Matrix matrix_of_tensor(const torch::Tensor& x) {
  const auto m = matrix_of<char>(x);
  return bind::Matrix{dtype_of(x), x.data_ptr(), m.rows, m.cols, m.stride};
}

bind::LinearHead head_of(const Head& h) {
  bind::LinearHead head;
  head.weight = matrix_of_tensor(h.weight);
  if (h.bias.defined()) {
    head.bias = h.bias.data_ptr();
    head.bias_size = h.bias.numel();
  }
  return head;
}

/// A batch for compact scoring: the targets contiguous on the device, and host copies of
/// them and of the offsets in the binding core's plan (one layout on both sides).
struct CompactTargets {
  torch::Tensor targets;
  bind::CompactBatch host;
  CompactTargets(const torch::Tensor& t, const Offsets& offsets) : targets(t.contiguous()) {
    const auto host_targets = targets.to(torch::kCPU);
    const auto host_offsets = offsets.tensor.to(torch::kCPU).contiguous();
    host = bind::CompactBatch::of(host_targets.data_ptr<int64_t>(), host_targets.numel(),
                                  host_offsets.data_ptr<int64_t>(), offsets.count());
  }
  bind::Batch batch(const Offsets& offsets) const {
    return host.applied_to(bind::Batch{targets_view(targets), offsets.view});
  }
};

/// As Cpu::fused_linear_forward: dW and db only where asked for (a frozen head: no dW GEMM,
/// no V × D buffer; empty [0, D] / [0] tensors in their place). The KL batch is in `o` (a
/// fixed z0).
std::vector<torch::Tensor> fused_linear_forward(const FusedOperands& f, const kto::Options& o,
                                                int64_t chunk_bytes, int64_t strategy,
                                                bool weight_grad, bool bias_grad) {
  const auto d = f.head.hidden.device();
  const c10::cuda::CUDAGuard guard(d);
  // Compact scoring: whole sequences share a chunk, and the GEMMs multiply the scored
  // rows only.
  const CompactTargets target(f.targets, f.offsets);
  const index_t N = f.head.N, D = f.head.D, V = f.head.V, B = f.offsets.count();
  const auto f32 = torch::dtype(torch::kFloat).device(d);
  auto metrics = torch::empty({kto::kMetricCount}, torch::dtype(torch::kDouble).device(d));
  auto per_example = torch::empty({kto::kExampleOutputCount, B}, f32);
  auto n = torch::empty({B}, torch::dtype(torch::kLong).device(d));
  // vocab_blocks writes dW once per block: in the weight's own dtype (half of fp32's
  // bytes) unless the parameter is fp32 (mixed precision keeps the fp32 sums).
  const bool dw_in_input_type =
      strategy == static_cast<int64_t>(kto::FusedStrategy::vocab_blocks) && !f.head.mixed;
  auto dh = torch::empty({N, D}, f32);
  auto dw =
      torch::empty({weight_grad ? V : 0, D}, dw_in_input_type ? f.head.weight.options() : f32);
  const bool want_db = bias_grad && f.head.bias.defined();
  auto db = torch::empty({want_db ? V : 0}, f32);
  auto statistics = token_statistics_on(d, o, B);
  bind::FusedLinearCall c;
  c.hidden = matrix_of_tensor(f.head.hidden);
  c.batch = target.batch(f.offsets);
  c.reference_logp = span_of_vector<float>(f.v.reference_logp);
  c.desirable = f.v.desirable.data_ptr<uint8_t>();
  c.head = head_of(f.head);
  c.options = o;
  c.outputs = {metrics.data_ptr<double>(), bind::DType::f64, per_example.data_ptr<float>(),
               n.data_ptr<int64_t>(),      nullptr,          statistics_data(statistics, o)};
  c.gradients = {dh.data_ptr<float>(), weight_grad ? dw.data_ptr() : nullptr, dtype_of(dw),
                 want_db ? db.data_ptr<float>() : nullptr};
  c.chunk_bytes = static_cast<std::size_t>(chunk_bytes);
  c.strategy = static_cast<kto::FusedStrategy>(strategy);
  const auto ws = run_with_workspace(d, [&](void* w, std::size_t* bytes) {
    return kto_torch_cuda::fused_linear_kto_step(c, w, bytes, stream());
  });
  check(kto_torch_cuda::read_status(ws.data_ptr(), f.offsets.view, stream()));
  return {metrics, per_example, n, dh, dw, db, statistics};
}

std::vector<torch::Tensor> fused_linear_logprobs(const FusedLogprobOperands& f,
                                                 const kto::Options& o, int64_t chunk_bytes) {
  const auto d = f.head.hidden.device();
  const c10::cuda::CUDAGuard guard(d);
  const index_t B = f.offsets.count();
  auto logp = torch::empty({B}, torch::dtype(torch::kFloat).device(d));
  auto n = torch::empty({B}, torch::dtype(torch::kLong).device(d));
  const CompactTargets target(f.targets, f.offsets);  // compact scoring, as in the step
  bind::FusedLogprobsCall c;
  c.hidden = matrix_of_tensor(f.head.hidden);
  c.batch = target.batch(f.offsets);
  c.head = head_of(f.head);
  c.options = o;
  c.chunk_bytes = static_cast<std::size_t>(chunk_bytes);
  c.logp = logp.data_ptr<float>();
  c.num_tokens = n.data_ptr<int64_t>();
  const auto ws = run_with_workspace(d, [&](void* w, std::size_t* bytes) {
    return kto_torch_cuda::fused_linear_logprobs(c, w, bytes, stream());
  });
  check(kto_torch_cuda::read_status(ws.data_ptr(), f.offsets.view, stream()));
  return {logp, n};
}

}  // namespace cuda_detail

/// The CUDA backend of every op (kto_torch.cpp's Ops<Cuda>).
struct Cuda {
  /// The kernels accumulate in fp32 for every logit type they take.
  static torch::ScalarType acc(const torch::Tensor&) { return torch::kFloat; }

  /// The dispatcher sends an op here when any argument is on a CUDA device: the anchor must be.
  static void check_device(const char* fn, const char* name, const torch::Tensor& z) {
    require(z.is_cuda(), fn, name, "be on a CUDA device (another argument is)", text(z.device()));
  }

  static void check_strategy(const char* fn, int64_t strategy) {
    require(strategy >= 0 && strategy <= 2, fn, "strategy",
            "be keep_chunk (0), recompute (1) or vocab_blocks (2)", text(strategy));
  }

  static std::vector<torch::Tensor> sequence_logprobs(const StepOperands& s,
                                                      const kto::Options& o) {
    return cuda_detail::sequence_logprobs(s, o);
  }

  static std::vector<torch::Tensor> step_forward(const StepOperands& s, const StepVectors& v,
                                                 const kto::Options& o) {
    return cuda_detail::step_forward(s, v, o);
  }

  static torch::Tensor step_backward(const StepOperands& s, const BackwardVectors& b,
                                     const kto::Options& o) {
    return cuda_detail::step_backward(s, b, o);
  }

  static std::vector<torch::Tensor> fused_linear_forward(const FusedOperands& f,
                                                         const kto::Options& o, int64_t chunk_bytes,
                                                         int64_t strategy, bool weight_grad,
                                                         bool bias_grad) {
    return cuda_detail::fused_linear_forward(f, o, chunk_bytes, strategy, weight_grad, bias_grad);
  }

  static std::vector<torch::Tensor> fused_linear_logprobs(const FusedLogprobOperands& f,
                                                          const kto::Options& o,
                                                          int64_t chunk_bytes) {
    return cuda_detail::fused_linear_logprobs(f, o, chunk_bytes);
  }
};

}  // namespace
}  // namespace kto_torch
