// kto_torch.cpp — the extension module of kto's PyTorch bindings (the edge where
// dtype and device dispatch live). The ops themselves (schemas, fake kernels,
// autograd) are registered in Python with torch.library (kto_torch/_ops.py); the
// functions here are their kernels, one set per backend: `<op>_cpu` for CPU
// tensors and `<op>_cuda` for CUDA ones, chosen by torch's dispatcher.
//
// Every entry point (Ops below) first checks every tensor argument — device, dtype,
// shape and stride (operands.hpp) — naming the public Python function, the
// argument, the expectation and what came; then it makes one library call on its
// backend (cpu_ops.hpp, cuda_ops.hpp). Errors the library raises come out in the
// Python API's words (errors.hpp). Gradients are always fresh contiguous tensors.
//
// kto_torch_x86_64_v3.cpp and _v4.cpp include this file to build the CPU-only
// copies of the module per x86-64 level (runtime ISA dispatch, kto_torch/_isa.py);
// the CUDA backend is compiled into `_C` alone (KTO_TORCH_WITH_CUDA).
#include <torch/extension.h>

#include <kto/cpu/isa.hpp>
#include <kto/kto.hpp>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "cpu_ops.hpp"
#include "errors.hpp"
#include "operands.hpp"

#ifdef KTO_TORCH_WITH_CUDA
#include "cuda_ops.hpp"
#endif

namespace kto_torch {
namespace {

/// The schemas' Optional[Tensor]: an absent operand reads as an empty 1-D tensor on `like`'s
/// device (what the checks treat as "not given").
using OptionalTensor = std::optional<torch::Tensor>;
torch::Tensor or_empty(const OptionalTensor& t, const torch::Tensor& like,
                       torch::ScalarType dtype) {
  return t ? *t : torch::empty({0}, like.options().dtype(dtype));
}

void check_chunk_bytes(const char* fn, int64_t chunk_bytes) {
  require(chunk_bytes > 0, fn, "chunk_bytes", "be > 0", text(chunk_bytes));
}

/// The kernels of the ops on one backend (Cpu, cpu_ops.hpp; Cuda, cuda_ops.hpp): checks,
/// then one library call, under the Python names of the op's public function.
template <class Backend>
struct Ops {
  static std::vector<torch::Tensor> sequence_logprobs(const torch::Tensor& logits,
                                                      const torch::Tensor& targets,
                                                      const torch::Tensor& offsets,
                                                      const std::vector<double>& options) {
    const char* fn = kSequenceLogprobs;
    return names_of(fn, "logits", logits, targets).run([&] {
      const StepOperands s = step_operands(fn, logits, targets, offsets);
      const kto::Options o = options_of(fn, options);
      Backend::check_device(fn, "logits", logits);
      return Backend::sequence_logprobs(s, o);
    });
  }

  static std::vector<torch::Tensor> step_forward(
      const torch::Tensor& logits, const torch::Tensor& targets, const torch::Tensor& offsets,
      const torch::Tensor& reference_logp, const torch::Tensor& desirable,
      const OptionalTensor& kl_policy_logp, const OptionalTensor& kl_reference_logp,
      const OptionalTensor& kl_num_tokens, const OptionalTensor& global_kl,
      const std::vector<double>& options) {
    const char* fn = kKtoLoss;
    return names_of(fn, "logits", logits, targets, global_kl.has_value()).run([&] {
      const StepOperands s = step_operands(fn, logits, targets, offsets, 1);
      const StepVectors v =
          step_vectors(fn, logits, "logits", s.offsets.count(), reference_logp, desirable,
                       or_empty(kl_policy_logp, logits, torch::kFloat),
                       or_empty(kl_reference_logp, logits, torch::kFloat),
                       or_empty(kl_num_tokens, logits, torch::kLong),
                       or_empty(global_kl, logits, torch::kDouble), Backend::acc(s.logits));
      const kto::Options o = options_of(fn, options);
      require_kl_batch(fn, v, o);
      Backend::check_device(fn, "logits", logits);
      return Backend::step_forward(s, v, o);
    });
  }

  static torch::Tensor step_backward(const torch::Tensor& logits, const torch::Tensor& targets,
                                     const torch::Tensor& offsets, const torch::Tensor& row_lse,
                                     const torch::Tensor& grad_logp,
                                     const torch::Tensor& num_tokens,
                                     const std::vector<double>& options) {
    const char* fn = kKtoLossBackward;
    return names_of(fn, "logits", logits, targets).run([&] {
      const StepOperands s = step_operands(fn, logits, targets, offsets);
      const BackwardVectors b =
          backward_vectors(fn, s, row_lse, grad_logp, num_tokens, Backend::acc(s.logits));
      const kto::Options o = options_of(fn, options);
      Backend::check_device(fn, "logits", logits);
      return Backend::step_backward(s, b, o);
    });
  }

  static std::vector<torch::Tensor> fused_linear_forward(
      const torch::Tensor& hidden, const torch::Tensor& weight, const OptionalTensor& bias,
      const torch::Tensor& targets, const torch::Tensor& offsets,
      const torch::Tensor& reference_logp, const torch::Tensor& desirable,
      const OptionalTensor& kl_policy_logp, const OptionalTensor& kl_reference_logp,
      const OptionalTensor& kl_num_tokens, const OptionalTensor& global_kl,
      const std::vector<double>& options, int64_t chunk_bytes, int64_t strategy, bool weight_grad,
      bool bias_grad) {
    const char* fn = kFusedLoss;
    return names_of(fn, "hidden", hidden, targets, global_kl.has_value()).run([&] {
      const FusedOperands f = fused_operands(
          fn, hidden, weight, or_empty(bias, hidden, hidden.scalar_type()), targets, offsets,
          reference_logp, desirable, or_empty(kl_policy_logp, hidden, torch::kFloat),
          or_empty(kl_reference_logp, hidden, torch::kFloat),
          or_empty(kl_num_tokens, hidden, torch::kLong),
          or_empty(global_kl, hidden, torch::kDouble), Backend::acc(hidden));
      const kto::Options o = with_kl_reference_point(fn, f.v, options_of(fn, options));
      check_chunk_bytes(fn, chunk_bytes);
      Backend::check_strategy(fn, strategy);
      Backend::check_device(fn, "hidden", hidden);
      auto out = Backend::fused_linear_forward(f, o, chunk_bytes, strategy, weight_grad, bias_grad);
      out[3] = out[3].view(hidden.sizes());  // dL/dhidden in the shape of hidden
      return out;
    });
  }

  static std::vector<torch::Tensor> fused_linear_logprobs(
      const torch::Tensor& hidden, const torch::Tensor& weight, const OptionalTensor& bias,
      const torch::Tensor& targets, const torch::Tensor& offsets,
      const std::vector<double>& options, int64_t chunk_bytes) {
    const char* fn = kFusedLogprobs;
    return names_of(fn, "hidden", hidden, targets).run([&] {
      const FusedLogprobOperands f = fused_logprob_operands(
          fn, hidden, weight, or_empty(bias, hidden, hidden.scalar_type()), targets, offsets);
      const kto::Options o = options_of(fn, options);
      check_chunk_bytes(fn, chunk_bytes);
      Backend::check_device(fn, "hidden", hidden);
      return Backend::fused_linear_logprobs(f, o, chunk_bytes);
    });
  }
};

/// The ops of one backend as `<op><suffix>`.
template <class Backend>
void define_ops(pybind11::module_& m, const std::string& suffix) {
  m.def(("sequence_logprobs" + suffix).c_str(), &Ops<Backend>::sequence_logprobs);
  m.def(("step_forward" + suffix).c_str(), &Ops<Backend>::step_forward);
  m.def(("step_backward" + suffix).c_str(), &Ops<Backend>::step_backward);
  m.def(("fused_linear_forward" + suffix).c_str(), &Ops<Backend>::fused_linear_forward);
  m.def(("fused_linear_logprobs" + suffix).c_str(), &Ops<Backend>::fused_linear_logprobs);
}

#ifndef KTO_TORCH_WITH_CUDA
/// A build without nvcc: each op's CUDA kernel raises NotImplementedError, naming the
/// function and its tensor on the CUDA device.
void define_without_cuda(pybind11::module_& m) {
  struct Op {
    const char *name, *fn, *anchor;
  };
  for (const Op op :
       {Op{"sequence_logprobs", kSequenceLogprobs, "logits"},
        Op{"step_forward", kKtoLoss, "logits"}, Op{"step_backward", kKtoLossBackward, "logits"},
        Op{"fused_linear_forward", kFusedLoss, "hidden"},
        Op{"fused_linear_logprobs", kFusedLogprobs, "hidden"}}) {
    m.def((std::string(op.name) + "_cuda").c_str(),
          [op](const torch::Tensor& anchor, const pybind11::args&) -> std::vector<torch::Tensor> {
            TORCH_CHECK_NOT_IMPLEMENTED(false, op.fn, ": argument '", op.anchor, "' is on ",
                                        anchor.device(),
                                        "; this build of kto_torch has the CPU kernels only "
                                        "(rebuild it where nvcc is present)");
          });
  }
}
#endif

bool has_cuda() {
#ifdef KTO_TORCH_WITH_CUDA
  return true;
#else
  return false;
#endif
}

/// Local (S, C) of a KL batch as a float64 [2] tensor, for an all-reduce.
torch::Tensor kl_partial(const torch::Tensor& policy_logp, const torch::Tensor& reference_logp,
                         const torch::Tensor& num_tokens, int64_t kl_estimator) {
  const char* fn = kKlPartial;
  const Names names(fn, {{"kl.policy_logp", "kl_policy_logp", {}},
                         {"kl.reference_logp", "kl_reference_logp", {}},
                         {"kl.num_tokens", "kl_num_tokens", {}}});
  return names.run([&] {
    require(kl_estimator == 0 || kl_estimator == 1, fn, "kl_estimator",
            "be mean (0) or nonempty_mean (1)", text(kl_estimator));
    kto::Options o;
    o.kl_estimator = static_cast<kto::KlEstimator>(kl_estimator);
    check_anchor(fn, "kl_policy_logp", policy_logp);
    const auto cpu = torch::Device(torch::kCPU);
    const auto p = float_vector(fn, "kl_policy_logp", policy_logp, policy_logp, "kl_policy_logp",
                                -1, torch::kDouble, cpu);
    const auto r = float_vector(fn, "kl_reference_logp", reference_logp, policy_logp,
                                "kl_policy_logp", p.size(0), torch::kDouble, cpu);
    const auto n = int_vector(fn, "kl_num_tokens", num_tokens, policy_logp, "kl_policy_logp",
                              p.size(0), cpu, true);
    const kto::KlPartial kl =
        kto::kl_partial<double>(kto::policy_logp(span_of<double>(p)),
                                kto::reference_logp(span_of<double>(r)), index_span(n), o);
    return torch::tensor({kl.sum, kl.count}, torch::dtype(torch::kDouble));
  });
}

/// z0 from an all-reduced (S, C) [2] float64: the KL-batch estimate, clamped or not.
double reference_point(const torch::Tensor& global_kl, bool clamp_kl) {
  const char* fn = kReferencePoint;
  check_anchor(fn, "global_kl", global_kl);
  require(global_kl.numel() == 2, fn, "global_kl", "hold the all-reduced (S, C): 2 elements",
          text(global_kl.numel(), " elements"));
  const auto g = global_kl_operand(fn, global_kl, global_kl, "global_kl");
  kto::Options o;
  o.clamp_kl = clamp_kl;
  return kto::reference_point(kto::KlPartial{g->first, g->second}, o);
}

/// Loss, metrics and per-example outputs from whole sequence log-probs and an all-reduced
/// (S, C): kto::finish, for kto_torch.distributed's context-parallel loss, whose ranks each
/// hold a slice of every sequence and all-reduce their log-prob sums first. Also the
/// backward's one refusal z0 does not decide (the gradient's scale in the logits' dtype, on
/// the whole token counts `num_tokens`), here, before the backward: it raises on every rank
/// of the group alike. (metrics [9], per_example [5, B]) float64 on the CPU: O(B) work.
std::vector<torch::Tensor> finish(const torch::Tensor& policy_logp,
                                  const torch::Tensor& reference_logp,
                                  const torch::Tensor& desirable, const torch::Tensor& global_kl,
                                  const torch::Tensor& num_tokens, const torch::Tensor& logits,
                                  const std::vector<double>& options) {
  const char* fn = kContextParallelLoss;
  // An empty KL batch (C = 0 on every rank) is the KL batch's fault.
  const Names names(fn, {{"policy_logp", "logits", {}},
                         {"kl.count", "kl_policy_logp", {}},
                         {"kl.sum", "kl_policy_logp", {}}});
  return names.run([&] {
    const auto cpu = torch::Device(torch::kCPU);
    const auto p = float_vector(fn, "policy_logp", policy_logp, policy_logp, "policy_logp", -1,
                                torch::kDouble, cpu);
    const auto r = float_vector(fn, "reference_logp", reference_logp, policy_logp, "policy_logp",
                                p.size(0), torch::kDouble, cpu);
    const auto d = labels_operand(fn, desirable, policy_logp, "policy_logp", p.size(0), cpu);
    const auto n =
        int_vector(fn, "num_tokens", num_tokens, policy_logp, "policy_logp", p.size(0), cpu);
    const auto g = global_kl_operand(fn, global_kl, policy_logp, "policy_logp");
    require(g.has_value(), fn, "global_kl", "hold the all-reduced (S, C)", "an empty tensor");
    const kto::Options o = options_of(fn, options);
    const auto labels = kto::make_span(d.data_ptr<uint8_t>(), d.numel());
    const auto out =
        kto::detail::finish_impl<double>(kto::KlPartial{g->first, g->second}, span_of<double>(p),
                                         span_of<double>(r), labels, o, fn, "reference_logp");
    dispatch(logits, [&](auto tag) {
      kto::cpu::detail::check_gradient_scale_bound<decltype(tag)>(labels, index_span(n), o, fn);
    });
    const std::vector<double> logp(p.data_ptr<double>(), p.data_ptr<double>() + p.numel());
    return std::vector<torch::Tensor>{metrics_tensor(out.metrics),
                                      per_example_tensor(logp, out.examples, p.size(0))};
  });
}

// ---- the library's contract, read by kto_torch at import ----

/// The library's metric names, in the order of the metrics array.
std::vector<std::string> metric_names() {
  return std::vector<std::string>(kto::kMetricNames, kto::kMetricNames + kto::kMetricCount);
}

/// The library's names of the per-example rows, in their order.
std::vector<std::string> example_output_names() {
  return std::vector<std::string>(kto::kExampleOutputNames,
                                  kto::kExampleOutputNames + kto::kExampleOutputCount);
}

/// The library's option names, in the order of the options array every op takes.
std::vector<std::string> option_names() {
  return std::vector<std::string>(kto::kOptionNames, kto::kOptionNames + kto::kOptionCount);
}

/// The value names of each named option (kto::option_choices), by option name, in code
/// order: the strings the Python API accepts for loss_type, link, ...
std::map<std::string, std::vector<std::string>> option_choices() {
  std::map<std::string, std::vector<std::string>> out;
  for (int k = 0; k < kto::kOptionCount; ++k) {
    const kto::OptionChoices c = kto::option_choices(k);
    if (c.count > 0)
      out[kto::kOptionNames[k]] = std::vector<std::string>(c.names, c.names + c.count);
  }
  return out;
}

/// The fused step's strategy names, at their codes (kto::FusedStrategy).
std::vector<std::string> strategy_names() {
  return std::vector<std::string>(kto::kFusedStrategyNames,
                                  kto::kFusedStrategyNames + kto::kFusedStrategyCount);
}

/// The library's default chunk budget of the fused-linear step on each device.
int64_t default_chunk_bytes(bool cuda) {
  return static_cast<int64_t>(cuda ? kto::kDefaultCudaChunkBytes : kto::kDefaultCpuChunkBytes);
}

/// What this copy of the extension was built with (kto_torch.build_info()).
pybind11::dict build_info() {
  pybind11::dict d;
  d["compiled_isa"] = kto::cpu::compiled_isa();
  d["eigen_version"] = std::to_string(EIGEN_WORLD_VERSION) + "." +
                       std::to_string(EIGEN_MAJOR_VERSION) + "." +
                       std::to_string(EIGEN_MINOR_VERSION);
  d["eigen_simd"] = Eigen::SimdInstructionSetsInUse();
  d["compiler"] = __VERSION__;
  d["cplusplus"] = static_cast<long>(__cplusplus);
#ifdef KTO_TORCH_WITH_CUDA
  d["cuda_runtime"] =
      std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#else
  d["cuda_runtime"] = pybind11::none();
#endif
  return d;
}

}  // namespace
}  // namespace kto_torch

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace kto_torch;
  m.doc() = "kto kernels (CPU, and CUDA where built) for the torch.library ops in kto_torch";
  pybind11::register_exception_translator(&translate_kto_errors);
  define_ops<Cpu>(m, "_cpu");
#ifdef KTO_TORCH_WITH_CUDA
  define_ops<Cuda>(m, "_cuda");
#else
  define_without_cuda(m);
#endif
  m.def("has_cuda", &has_cuda);
  m.def("kl_partial", &kl_partial);
  m.def("reference_point", &reference_point);
  m.def("finish", &finish);
  m.def("metric_names", &metric_names);
  m.def("option_names", &option_names);
  m.def("option_choices", &option_choices);
  m.def("strategy_names", &strategy_names);
  m.def("example_output_names", &example_output_names);
  m.def("default_chunk_bytes", &default_chunk_bytes);
  m.def("bf16_gemm_supported", &kto::cpu::bf16_gemm_supported);
  m.def("release_scratch", &kto::cpu::release_scratch);
  m.def("compiled_isa", &kto::cpu::compiled_isa);
  m.def("cpu_isa", &kto::cpu::cpu_isa);
  m.def("build_info", &build_info);
  m.def("version", [] {
    return std::to_string(KTO_VERSION_MAJOR) + "." + std::to_string(KTO_VERSION_MINOR) + "." +
           std::to_string(KTO_VERSION_PATCH);
  });
}
