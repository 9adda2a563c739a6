// cuda_ops.hpp — the CUDA kernels of kto_torch's ops (built with nvcc only:
// KTO_TORCH_WITH_CUDA): the checked operands (operands.hpp) handed to kto's CUDA
// host API through kto_torch_cuda.h, which keeps torch's headers away from nvcc and
// CUDA's from this translation unit. Outputs are float32 (the kernels' accumulation
// type) on the logits' device. Errors the kernels record on the device are read
// back after the forward (one stream synchronisation); they and the host API's come
// back as messages, raised here as the CPU path raises them (throw_library_error)
// and put in the Python API's words as theirs are (errors.hpp).
#pragma once

#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <kto/kto.hpp>

#include <cstddef>
#include <cstdlib>
#include <string>
#include <vector>

#include "kto_torch_cuda.h"
#include "operands.hpp"

namespace kto_torch {
namespace {
namespace cuda_detail {

/// Throws a library message (the CUDA wrapper's strings) as the CPU path would have: a
/// kto::Error with the argument found in "argument '<name>'", a non-finite logit as
/// NonFiniteLogitsError with the sequence and row the message gives (-1 where it gives
/// none); a failure of the CUDA runtime itself as the RuntimeError it is.
[[noreturn]] void throw_library_error(const std::string& message) {
  std::string argument;
  const auto at = message.find("argument '");
  if (at != std::string::npos) {
    const auto begin = at + 10, end = message.find('\'', begin);
    if (end != std::string::npos) argument = message.substr(begin, end - begin);
  }
  TORCH_CHECK(!argument.empty() || message.find("CUDA error") == std::string::npos, message);
  const auto number_after = [&](const std::string& key) -> int64_t {
    const auto k = message.find(key);
    if (k == std::string::npos) return -1;
    return std::strtoll(message.c_str() + k + key.size(), nullptr, 10);
  };
  const std::string function = message.substr(0, message.find(": "));
  if (argument == "logits" && message.find("finite") != std::string::npos)
    throw kto::NonFiniteLogitsError(function, argument, number_after("sequence "),
                                    number_after("row "), message);
  throw kto::Error(function, argument, message);
}

/// The CUDA wrapper's message (empty: success) as the kto::Error the CPU path would throw.
void check(const std::string& message) {
  if (!message.empty()) throw_library_error(message);
}

void* stream() {
  return at::cuda::getCurrentCUDAStream().stream();
}

kto_torch_cuda::DType dtype_of(const torch::Tensor& x) {
  switch (x.scalar_type()) {
    case torch::kHalf:
      return kto_torch_cuda::DType::f16;
    case torch::kBFloat16:
      return kto_torch_cuda::DType::bf16;
    default:  // float32: check_logit_dtype ran first
      return kto_torch_cuda::DType::f32;
  }
}

kto_torch_cuda::Logits logits_of(const torch::Tensor& z) {
  const auto v = logits_view<const char>(z);
  return kto_torch_cuda::Logits{dtype_of(z), z.data_ptr(), v.vocab, v.rows};
}

/// token_statistics [2, B] float64 on the device (the library writes it), or [2, 0] when
/// not requested, as the CPU ops return.
torch::Tensor token_statistics_on(const torch::Device& d, const kto::Options& o, index_t B) {
  return torch::empty({2, o.token_statistics ? B : 0}, torch::dtype(torch::kDouble).device(d));
}

torch::Tensor workspace(std::size_t bytes, const torch::Device& d) {
  return torch::empty({static_cast<int64_t>(bytes)}, torch::dtype(torch::kUInt8).device(d));
}

/// (logp [B], num_tokens [B], row_lse [rows]) in float32.
std::vector<torch::Tensor> sequence_logprobs(const StepOperands& s, const kto::Options& o) {
  const auto d = s.logits.device();
  const c10::cuda::CUDAGuard guard(d);
  const index_t rows = rows_of(s.logits), B = s.offsets.count();
  auto logp = torch::empty({B}, torch::dtype(torch::kFloat).device(d));
  auto n = torch::empty({B}, torch::dtype(torch::kLong).device(d));
  auto lse = torch::empty({rows}, torch::dtype(torch::kFloat).device(d));
  const std::size_t bytes = kto_torch_cuda::forward_workspace_bytes(rows);
  auto ws = workspace(bytes, d);
  check(kto_torch_cuda::forward(logits_of(s.logits), targets_view(s.targets), s.offsets.view, o,
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
  torch::Tensor global_kl;
  if (v.global_kl)
    global_kl =
        torch::tensor({v.global_kl->first, v.global_kl->second}, torch::dtype(torch::kDouble))
            .to(d);
  const bool kl = !v.global_kl && kto::uses_kl_batch(o) && v.kl_policy_logp.numel() > 0;
  const auto& kn = v.kl_num_tokens;
  auto call = [&](void* ws, std::size_t* bytes) {
    return kto_torch_cuda::step_forward(
        logits_of(s.logits), targets_view(s.targets), s.offsets.view,
        v.reference_logp.data_ptr<float>(), v.desirable.data_ptr<uint8_t>(),
        kl ? v.kl_policy_logp.data_ptr<float>() : nullptr,
        kl ? v.kl_reference_logp.data_ptr<float>() : nullptr,
        kl && kn.numel() ? kn.data_ptr<int64_t>() : nullptr, kl ? v.kl_policy_logp.numel() : 0,
        global_kl.defined() ? global_kl.data_ptr<double>() : nullptr, o, metrics.data_ptr<double>(),
        per_example.data_ptr<float>(), n.data_ptr<int64_t>(), lse.data_ptr<float>(),
        o.token_statistics ? statistics.data_ptr<double>() : nullptr, ws, bytes, stream());
  };
  std::size_t bytes = 0;
  check(call(nullptr, &bytes));
  auto ws = workspace(bytes, d);
  check(call(ws.data_ptr(), &bytes));
  check(kto_torch_cuda::read_status(ws.data_ptr(), s.offsets.view, stream()));
  return {metrics, per_example, n, lse, statistics};
}

torch::Tensor step_backward(const StepOperands& s, const BackwardVectors& b,
                            const kto::Options& o) {
  const c10::cuda::CUDAGuard guard(s.logits.device());
  auto grad = torch::empty(s.logits.sizes(),
                           s.logits.options().memory_format(torch::MemoryFormat::Contiguous));
  check(kto_torch_cuda::backward(logits_of(s.logits), targets_view(s.targets), s.offsets.view,
                                 b.row_lse.data_ptr<float>(), b.grad_logp.data_ptr<float>(),
                                 b.num_tokens.data_ptr<int64_t>(), o, grad.data_ptr(),
                                 logits_view<const char>(grad).rows, stream()));
  return grad;
}

kto_torch_cuda::Matrix matrix_cuda(const torch::Tensor& x) {
  const auto m = matrix_of<char>(x);
  return kto_torch_cuda::Matrix{dtype_of(x), x.data_ptr(), m.rows, m.cols, m.stride};
}

kto_torch_cuda::Bias bias_cuda(const Head& h) {
  if (!h.bias.defined()) return kto_torch_cuda::Bias{nullptr, 0};
  return kto_torch_cuda::Bias{h.bias.data_ptr(), h.bias.numel()};
}

/// A batch's targets and offsets for compact scoring: the targets contiguous on the
/// device and a host copy of each (one layout on both sides). Empty when absent.
struct CompactBatch {
  torch::Tensor targets, host_targets, host_offsets;
  CompactBatch() = default;
  CompactBatch(const torch::Tensor& t, const Offsets& offsets)
      : targets(t.contiguous()),
        host_targets(targets.to(torch::kCPU)),
        host_offsets(offsets.tensor.to(torch::kCPU).contiguous()) {}
  const int64_t* host_targets_data() const {
    return host_targets.defined() ? host_targets.data_ptr<int64_t>() : nullptr;
  }
  const int64_t* host_offsets_data() const {
    return host_offsets.defined() ? host_offsets.data_ptr<int64_t>() : nullptr;
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
  // Host copies of targets and offsets: whole sequences share a chunk, and the GEMMs multiply
  // the scored rows only (compact scoring).
  const CompactBatch target(f.targets, f.offsets);
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
  // No KL batch of its own (B_kl = 0; the CUDA step wants its offsets non-null).
  const auto no_kl_targets = torch::empty({0}, torch::dtype(torch::kLong).device(d));
  const auto no_kl_offsets = torch::zeros({1}, torch::dtype(torch::kLong).device(d));
  const kto_torch_cuda::Matrix no_kl_hidden{dtype_of(f.head.hidden), nullptr, 0, D, D};
  auto call = [&](void* ws, std::size_t* bytes) {
    check(kto_torch_cuda::fused_linear_step(
        matrix_cuda(f.head.hidden), matrix_cuda(f.head.weight), bias_cuda(f.head),
        targets_view(target.targets), f.offsets.view, target.host_offsets_data(),
        target.host_targets_data(), f.v.reference_logp.data_ptr<float>(),
        f.v.desirable.data_ptr<uint8_t>(), no_kl_hidden, targets_view(no_kl_targets),
        kto::sequences(no_kl_offsets.data_ptr<int64_t>(), 0), nullptr, nullptr, nullptr, o,
        static_cast<std::size_t>(chunk_bytes), static_cast<int>(strategy),
        metrics.data_ptr<double>(), per_example.data_ptr<float>(), n.data_ptr<int64_t>(),
        o.token_statistics ? statistics.data_ptr<double>() : nullptr, dh.data_ptr<float>(),
        weight_grad ? dw.data_ptr() : nullptr, dw_in_input_type,
        want_db ? db.data_ptr<float>() : nullptr, ws, bytes, stream()));
  };
  std::size_t bytes = 0;
  call(nullptr, &bytes);
  auto ws = workspace(bytes, d);
  call(ws.data_ptr(), &bytes);
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
  const CompactBatch target(f.targets, f.offsets);  // compact scoring, as in the step
  auto call = [&](void* ws, std::size_t* bytes) {
    check(kto_torch_cuda::fused_linear_logprobs(
        matrix_cuda(f.head.hidden), matrix_cuda(f.head.weight), bias_cuda(f.head),
        targets_view(target.targets), f.offsets.view, target.host_offsets_data(),
        target.host_targets_data(), o, static_cast<std::size_t>(chunk_bytes),
        logp.data_ptr<float>(), n.data_ptr<int64_t>(), ws, bytes, stream()));
  };
  std::size_t bytes = 0;
  call(nullptr, &bytes);
  auto ws = workspace(bytes, d);
  call(ws.data_ptr(), &bytes);
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
