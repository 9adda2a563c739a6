// kto_torch.cpp — PyTorch bindings of the kto CPU path (the edge where dtype
// dispatch lives). The ops themselves (schemas, fake kernels, autograd) are
// registered in Python with torch.library (kto_torch/__init__.py); these
// functions are their CPU kernels.
//
// Logits may be a [rows, V] matrix with any row stride or a [B, T, V] tensor
// with any batch and row strides (so `logits[:, :-1]` needs no copy), V
// contiguous; targets likewise [rows] or [B, T] (`labels[:, 1:]`). CUDA tensors
// go to kto's CUDA kernels when the extension was built with them
// (KTO_TORCH_WITH_CUDA); device-detected errors are read back after the
// forward (one stream synchronisation) so they raise like the CPU ones.
#include <torch/extension.h>

#include <kto/kto.hpp>

#ifdef KTO_TORCH_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "kto_torch_cuda.h"
#endif

#include <cstring>
#include <vector>

namespace {

using kto::index_t;

/// The row layout of a [rows, V] or [B, T, V] logits tensor (V contiguous).
template <class T>
kto::LogitsView<T> logits_view(const torch::Tensor& z) {
  TORCH_CHECK(z.dim() == 2 || z.dim() == 3,
              "kto: argument 'logits' must be [rows, V] or [B, T, V]; got ", z.dim(), " dims");
  TORCH_CHECK(z.stride(-1) == 1 || z.size(-1) == 1,
              "kto: argument 'logits' must be contiguous along the vocabulary; got stride ",
              z.stride(-1));
  auto* data = reinterpret_cast<T*>(z.data_ptr());
  if (z.dim() == 2) return kto::logits_matrix<T>(data, z.size(0), z.size(1), z.stride(0));
  return kto::logits_batched<T>(data, z.size(0), z.size(1), z.size(2), z.stride(0), z.stride(1));
}

kto::TargetsView targets_view(const torch::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == torch::kLong, "kto: argument 'targets' must be int64; got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 || t.dim() == 2, "kto: argument 'targets' must be [rows] or [B, T]");
  if (t.dim() == 1) return kto::targets_vector(t.data_ptr<int64_t>(), t.size(0), t.stride(0));
  return kto::targets_batched(t.data_ptr<int64_t>(), t.size(0), t.size(1), t.stride(0),
                              t.stride(1));
}

struct Offsets {
  torch::Tensor tensor;  // keeps the data alive
  kto::SequencesView view;
};

Offsets offsets_view(const torch::Tensor& offsets, const torch::Device& device) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1,
              "kto: argument 'offsets' must be 1-D with B + 1 entries");
  Offsets o{offsets.to(device, torch::kLong).contiguous(), {}};
  o.view = kto::sequences(o.tensor.data_ptr<int64_t>(), o.tensor.size(0) - 1);
  return o;
}

template <class Fn>
void dispatch(const torch::Tensor& logits, Fn&& fn) {
  switch (logits.scalar_type()) {
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
    default:
      TORCH_CHECK(false,
                  "kto: argument 'logits' must be float32, float64, bfloat16 or float16; got ",
                  logits.scalar_type());
  }
}

kto::cpu::ExecutionPolicy exec() {
  kto::cpu::ExecutionPolicy e;
  e.num_threads = at::get_num_threads();
  return e;
}

torch::Tensor to_acc(const torch::Tensor& x, const torch::Tensor& logits) {
  const auto acc = logits.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  return x.to(torch::kCPU, acc).contiguous();
}

template <class A>
kto::Span<const A> span_of(const torch::Tensor& x) {
  return kto::make_span(x.data_ptr<A>(), x.numel());
}

template <class A>
torch::Tensor acc_tensor(at::IntArrayRef shape) {
  return torch::empty(
      shape, torch::dtype(std::is_same<A, double>::value ? torch::kDouble : torch::kFloat));
}

torch::Tensor metrics_tensor(const kto::Metrics& m, const torch::Device& d) {
  return torch::tensor({m.loss, m.kl, m.rewards_chosen, m.rewards_rejected, m.rewards_margins,
                        m.logps_chosen, m.logps_rejected, static_cast<double>(m.count_chosen),
                        static_cast<double>(m.count_rejected)},
                       torch::dtype(torch::kDouble))
      .to(d);
}

/// (logp [B], num_tokens [B] int64, row_lse [rows]) in the accumulation type.
std::vector<torch::Tensor> sequence_logprobs_cpu(const torch::Tensor& logits,
                                                 const torch::Tensor& targets,
                                                 const torch::Tensor& offsets, bool average,
                                                 int64_t ignore_index) {
  const Offsets off = offsets_view(offsets, logits.device());
  kto::Options o;
  o.average_logprob = average;
  o.ignore_index = ignore_index;
  std::vector<torch::Tensor> out;
  dispatch(logits, [&](auto tag) {
    using T = decltype(tag);
    using A = kto::accumulator_t<T>;
    const auto f = kto::cpu::sequence_logprobs<T>(logits_view<const T>(logits),
                                                  targets_view(targets), off.view, o, exec());
    const auto acc = std::is_same<A, double>::value ? torch::kDouble : torch::kFloat;
    auto logp = torch::empty({off.view.count}, torch::dtype(acc));
    auto n = torch::empty({off.view.count}, torch::dtype(torch::kLong));
    auto lse = torch::empty({static_cast<int64_t>(f.row_lse.size())}, torch::dtype(acc));
    std::memcpy(logp.data_ptr(), f.logp.data(), f.logp.size() * sizeof(A));
    std::memcpy(n.data_ptr(), f.num_tokens.data(), f.num_tokens.size() * sizeof(index_t));
    std::memcpy(lse.data_ptr(), f.row_lse.data(), f.row_lse.size() * sizeof(A));
    lse.nan_to_num_(0.0);
    out = {logp, n, lse};
  });
  return out;
}

/// Local (S, C) of a KL batch as a float64 [2] tensor, for an all-reduce.
torch::Tensor kl_partial(const torch::Tensor& policy_logp, const torch::Tensor& reference_logp,
                         const torch::Tensor& num_tokens, int64_t kl_estimator) {
  kto::Options o;
  o.kl_estimator = static_cast<kto::KlEstimator>(kl_estimator);
  const auto p = policy_logp.to(torch::kCPU, torch::kDouble).contiguous();
  const auto r = reference_logp.to(torch::kCPU, torch::kDouble).contiguous();
  const auto n = num_tokens.to(torch::kCPU, torch::kLong).contiguous();
  const kto::KlPartial kl = kto::kl_partial<double>(
      span_of<double>(p), span_of<double>(r), kto::make_span(n.data_ptr<int64_t>(), n.numel()), o);
  return torch::tensor({kl.sum, kl.count}, torch::dtype(torch::kDouble));
}

/// z0 from an all-reduced (S, C) [2] float64: the KL-batch estimate, clamped or not.
double reference_point(const torch::Tensor& global_kl, bool clamp_kl) {
  TORCH_CHECK(global_kl.numel() == 2, "kto: argument 'global_kl' must hold (S, C); got ",
              global_kl.numel(), " elements");
  const auto g = global_kl.to(torch::kCPU, torch::kDouble).contiguous();
  kto::Options o;
  o.clamp_kl = clamp_kl;
  return kto::reference_point(kto::KlPartial{g.data_ptr<double>()[0], g.data_ptr<double>()[1]}, o);
}

/// metrics [9] float64, per_example [5, B] (logp, ρ, βρ, loss, g_s), num_tokens [B], row_lse
/// [rows]. `global_kl` ([2] float64: an all-reduced (S, C)) replaces the local KL batch when given.
std::vector<torch::Tensor> step_forward_cpu(
    const torch::Tensor& logits, const torch::Tensor& targets, const torch::Tensor& offsets,
    const torch::Tensor& reference_logp, const torch::Tensor& desirable,
    const torch::Tensor& kl_policy_logp, const torch::Tensor& kl_reference_logp,
    const torch::Tensor& kl_num_tokens, const torch::Tensor& global_kl, const kto::Options& o) {
  const Offsets off = offsets_view(offsets, logits.device());
  const auto labels = desirable.to(torch::kCPU, torch::kUInt8).contiguous();
  std::vector<torch::Tensor> out;
  dispatch(logits, [&](auto tag) {
    using T = decltype(tag);
    using A = kto::accumulator_t<T>;
    const auto fwd = kto::cpu::sequence_logprobs<T>(logits_view<const T>(logits),
                                                    targets_view(targets), off.view, o, exec());
    kto::KlPartial kl;
    if (global_kl.numel() == 2) {
      const auto g = global_kl.to(torch::kCPU, torch::kDouble).contiguous();
      kl.sum = g.data_ptr<double>()[0];
      kl.count = g.data_ptr<double>()[1];
    } else if (kto::uses_kl_batch(o)) {
      const auto p = to_acc(kl_policy_logp, logits), r = to_acc(kl_reference_logp, logits);
      const auto n = kl_num_tokens.to(torch::kCPU, torch::kLong).contiguous();
      kl = kto::kl_partial<A>(span_of<A>(p), span_of<A>(r),
                              kto::make_span(n.data_ptr<int64_t>(), n.numel()), o);
    }
    const auto ref = to_acc(reference_logp, logits);
    const auto fin = kto::finish<A>(kl, kto::make_span(fwd.logp), span_of<A>(ref),
                                    kto::make_span(labels.data_ptr<uint8_t>(), labels.numel()), o);
    auto metrics = metrics_tensor(fin.metrics, torch::kCPU);
    const index_t B = off.view.count;
    const auto acc = std::is_same<A, double>::value ? torch::kDouble : torch::kFloat;
    auto per_example = torch::empty({5, B}, torch::dtype(acc));
    const std::vector<A>* rows[5] = {&fwd.logp, &fin.examples.ratio, &fin.examples.reward,
                                     &fin.examples.loss, &fin.examples.grad_logp};
    for (int k = 0; k < 5; ++k)
      std::memcpy(per_example[k].data_ptr(), rows[k]->data(), B * sizeof(A));
    auto n = torch::empty({B}, torch::dtype(torch::kLong));
    std::memcpy(n.data_ptr(), fwd.num_tokens.data(), B * sizeof(index_t));
    auto lse = torch::empty({static_cast<int64_t>(fwd.row_lse.size())}, torch::dtype(acc));
    std::memcpy(lse.data_ptr(), fwd.row_lse.data(), fwd.row_lse.size() * sizeof(A));
    lse.nan_to_num_(0.0);  // unscored rows: the library's NaN marker becomes 0 (never read)
    out = {metrics, per_example, n, lse};
  });
  return out;
}

/// dL/dlogits for dL/dlogp_s = grad_logp[s], as a new contiguous tensor of the logits' shape.
torch::Tensor step_backward_cpu(const torch::Tensor& logits, const torch::Tensor& targets,
                                const torch::Tensor& offsets, const torch::Tensor& row_lse,
                                const torch::Tensor& grad_logp, const torch::Tensor& num_tokens,
                                bool average, int64_t ignore_index) {
  const Offsets off = offsets_view(offsets, logits.device());
  kto::Options o;
  o.average_logprob = average;
  o.ignore_index = ignore_index;
  auto grad =
      torch::empty(logits.sizes(), logits.options().memory_format(torch::MemoryFormat::Contiguous));
  const auto n = num_tokens.to(torch::kCPU, torch::kLong).contiguous();
  dispatch(logits, [&](auto tag) {
    using T = decltype(tag);
    using A = kto::accumulator_t<T>;
    const auto lse = to_acc(row_lse, logits), g = to_acc(grad_logp, logits);
    kto::cpu::backward<T>(logits_view<const T>(logits), targets_view(targets), off.view,
                          span_of<A>(lse), span_of<A>(g),
                          kto::make_span(n.data_ptr<int64_t>(), n.numel()), o, logits_view<T>(grad),
                          exec());
  });
  return grad;
}

// ---- fused linear: hidden states and the lm_head instead of logits ----

/// A [rows, D] tensor with unit column stride as a MatrixView.
template <class T>
kto::MatrixView<const T> matrix_of(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, "kto: argument '", name, "' must be 2-D [rows, D]; got ", x.dim(),
              " dims");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1, "kto: argument '", name,
              "' must be contiguous along D; got stride ", x.stride(1));
  return kto::MatrixView<const T>{reinterpret_cast<const T*>(x.data_ptr()), x.size(0), x.size(1),
                                  x.size(0) > 1 ? x.stride(0) : x.size(1)};
}

/// The lm_head of a [V, D] weight and a [V] bias (empty: none).
template <class T>
kto::LinearHead<T> head_of(const torch::Tensor& weight, const torch::Tensor& bias) {
  kto::LinearHead<T> head;
  head.weight = matrix_of<T>(weight, "weight");
  if (bias.numel())
    head.bias = kto::make_span(reinterpret_cast<const T*>(bias.data_ptr()), bias.numel());
  return head;
}

void check_same_dtype(const torch::Tensor& a, const char* name, const torch::Tensor& hidden) {
  TORCH_CHECK(a.numel() == 0 || a.scalar_type() == hidden.scalar_type(), "kto: argument '", name,
              "' must have the dtype of 'hidden' (", hidden.scalar_type(), "); got ",
              a.scalar_type());
}

/// metrics [9], per_example [5, B], num_tokens [B], d_hidden [N, D], d_weight [V, D], d_bias [V]
/// (empty without bias): gradients of the loss, in the accumulation type.
std::vector<torch::Tensor> fused_linear_forward_cpu(
    const torch::Tensor& hidden, const torch::Tensor& weight, const torch::Tensor& bias,
    const torch::Tensor& targets, const torch::Tensor& offsets, const torch::Tensor& reference_logp,
    const torch::Tensor& desirable, const torch::Tensor& kl_hidden, const torch::Tensor& kl_targets,
    const torch::Tensor& kl_offsets, const torch::Tensor& kl_reference_logp, const kto::Options& o,
    int64_t chunk_bytes, int64_t strategy) {
  const Offsets off = offsets_view(offsets, hidden.device());
  const bool kl = kto::uses_kl_batch(o) && kl_offsets.numel() > 0;
  const Offsets kl_off =
      offsets_view(kl ? kl_offsets : torch::zeros({1}, torch::kLong), hidden.device());
  const auto labels = desirable.to(torch::kCPU, torch::kUInt8).contiguous();
  std::vector<torch::Tensor> out;
  dispatch(hidden, [&](auto tag) {
    using T = decltype(tag);
    using A = kto::accumulator_t<T>;
    const kto::LinearHead<T> head = head_of<T>(weight, bias);
    kto::cpu::FusedLinearInputs<T> in;
    in.hidden = matrix_of<T>(hidden, "hidden");
    in.targets = targets_view(targets);
    in.sequences = off.view;
    const auto ref = to_acc(reference_logp, hidden);
    in.reference_logp = span_of<A>(ref);
    in.desirable = kto::make_span(labels.data_ptr<uint8_t>(), labels.numel());
    torch::Tensor kl_ref;
    if (kl) {
      in.kl_hidden = matrix_of<T>(kl_hidden, "kl_hidden");
      in.kl_targets = targets_view(kl_targets);
      in.kl_sequences = kl_off.view;
      kl_ref = to_acc(kl_reference_logp, hidden);
      in.kl_reference_logp = span_of<A>(kl_ref);
    } else {
      in.kl_hidden = kto::MatrixView<const T>{nullptr, 0, head.weight.cols, head.weight.cols};
      in.kl_sequences = kl_off.view;
    }
    const index_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
    auto dh = acc_tensor<A>({N, D}), dw = acc_tensor<A>({V, D});
    auto db = head.bias.size ? acc_tensor<A>({V}) : acc_tensor<A>({0});
    kto::cpu::LinearGradients<A> g;
    g.d_hidden = kto::matrix_view(dh.template data_ptr<A>(), N, D);
    g.d_weight = kto::matrix_view(dw.template data_ptr<A>(), V, D);
    if (head.bias.size) g.d_bias = kto::make_span(db.template data_ptr<A>(), V);
    kto::cpu::FusedLinearConfig cfg;
    cfg.chunk_bytes = static_cast<size_t>(chunk_bytes);
    cfg.strategy = static_cast<kto::cpu::FusedStrategy>(strategy);
    const auto r = kto::cpu::fused_linear_kto_step<T>(in, head, o, g, cfg, exec());
    const index_t B = off.view.count;
    auto per_example = acc_tensor<A>({5, B});
    const std::vector<A>* rows[5] = {&r.logp, &r.examples.ratio, &r.examples.reward,
                                     &r.examples.loss, &r.examples.grad_logp};
    for (int k = 0; k < 5; ++k)
      std::memcpy(per_example[k].data_ptr(), rows[k]->data(), B * sizeof(A));
    auto n = torch::empty({B}, torch::dtype(torch::kLong));
    std::memcpy(n.data_ptr(), r.num_tokens.data(), B * sizeof(index_t));
    out = {metrics_tensor(r.metrics, torch::kCPU), per_example, n, dh, dw, db};
  });
  return out;
}

/// Forward only: (logp [B], num_tokens [B]) from hidden states.
std::vector<torch::Tensor> fused_linear_logprobs_cpu(const torch::Tensor& hidden,
                                                     const torch::Tensor& weight,
                                                     const torch::Tensor& bias,
                                                     const torch::Tensor& targets,
                                                     const torch::Tensor& offsets,
                                                     const kto::Options& o, int64_t chunk_bytes) {
  const Offsets off = offsets_view(offsets, hidden.device());
  std::vector<torch::Tensor> out;
  dispatch(hidden, [&](auto tag) {
    using T = decltype(tag);
    using A = kto::accumulator_t<T>;
    const kto::LinearHead<T> head = head_of<T>(weight, bias);
    kto::cpu::FusedLinearConfig cfg;
    cfg.chunk_bytes = static_cast<size_t>(chunk_bytes);
    const auto f = kto::cpu::fused_linear_logprobs<T>(
        matrix_of<T>(hidden, "hidden"), targets_view(targets), off.view, head, o, cfg, exec());
    auto logp = acc_tensor<A>({off.view.count});
    auto n = torch::empty({off.view.count}, torch::dtype(torch::kLong));
    std::memcpy(logp.data_ptr(), f.logp.data(), f.logp.size() * sizeof(A));
    std::memcpy(n.data_ptr(), f.num_tokens.data(), f.num_tokens.size() * sizeof(index_t));
    out = {logp, n};
  });
  return out;
}

#ifdef KTO_TORCH_WITH_CUDA
namespace cuda_path {

void check(const std::string& message) {
  TORCH_CHECK(message.empty(), message);
}

void* stream() {
  return at::cuda::getCurrentCUDAStream().stream();
}

kto_torch_cuda::Logits logits_of(const torch::Tensor& z) {
  kto_torch_cuda::DType dtype;
  switch (z.scalar_type()) {
    case torch::kFloat:
      dtype = kto_torch_cuda::DType::f32;
      break;
    case torch::kHalf:
      dtype = kto_torch_cuda::DType::f16;
      break;
    case torch::kBFloat16:
      dtype = kto_torch_cuda::DType::bf16;
      break;
    default:
      TORCH_CHECK(false,
                  "kto: argument 'logits' on CUDA must be float32, bfloat16 or float16; got ",
                  z.scalar_type());
  }
  const auto v = logits_view<const char>(z);
  return kto_torch_cuda::Logits{dtype, z.data_ptr(), v.vocab, v.rows};
}

torch::Tensor device_float(const torch::Tensor& x, const torch::Device& d) {
  return x.to(d, torch::kFloat).contiguous();
}

torch::Tensor workspace(std::size_t bytes, const torch::Device& d) {
  return torch::empty({static_cast<int64_t>(bytes)}, torch::dtype(torch::kUInt8).device(d));
}

/// logp, num_tokens, row_lse, and the forward's workspace (holds its error word).
std::vector<torch::Tensor> forward(const torch::Tensor& logits, const torch::Tensor& targets,
                                   const Offsets& off, const kto::Options& o) {
  const auto d = logits.device();
  const auto rows = logits_view<const char>(logits).rows.rows;
  auto logp = torch::empty({off.view.count}, torch::dtype(torch::kFloat).device(d));
  auto n = torch::empty({off.view.count}, torch::dtype(torch::kLong).device(d));
  auto lse = torch::empty({rows}, torch::dtype(torch::kFloat).device(d));
  const std::size_t bytes = kto_torch_cuda::forward_workspace_bytes(rows);
  auto ws = workspace(bytes, d);
  check(kto_torch_cuda::forward(logits_of(logits), targets_view(targets), off.view, o,
                                logp.data_ptr<float>(), n.data_ptr<int64_t>(),
                                lse.data_ptr<float>(), ws.data_ptr(), bytes, stream()));
  return {logp, n, lse, ws};
}

std::vector<torch::Tensor> sequence_logprobs(const torch::Tensor& logits,
                                             const torch::Tensor& targets, const Offsets& off,
                                             const kto::Options& o) {
  auto f = forward(logits, targets, off, o);
  check(kto_torch_cuda::read_status(f[3].data_ptr(), off.view, stream()));
  return {f[0], f[1], f[2]};
}

std::vector<torch::Tensor> step_forward(const torch::Tensor& logits, const torch::Tensor& targets,
                                        const Offsets& off, const torch::Tensor& reference_logp,
                                        const torch::Tensor& desirable,
                                        const torch::Tensor& kl_policy_logp,
                                        const torch::Tensor& kl_reference_logp,
                                        const torch::Tensor& kl_num_tokens,
                                        const torch::Tensor& global_kl, const kto::Options& o) {
  const auto d = logits.device();
  auto f = forward(logits, targets, off, o);
  auto partial = torch::zeros({2}, torch::dtype(torch::kDouble).device(d));
  auto small = workspace(1024, d);  // error word + a kto::Metrics
  if (global_kl.numel() == 2) {
    partial = global_kl.to(d, torch::kDouble).contiguous();
  } else if (kto::uses_kl_batch(o) && kl_policy_logp.numel() > 0) {
    const auto p = device_float(kl_policy_logp, d), r = device_float(kl_reference_logp, d);
    const auto n = kl_num_tokens.to(d, torch::kLong).contiguous();
    check(kto_torch_cuda::kl_partial(p.data_ptr<float>(), r.data_ptr<float>(),
                                     n.numel() ? n.data_ptr<int64_t>() : nullptr, p.numel(), o,
                                     partial.data_ptr<double>(), small.data_ptr(), 256, stream()));
    check(kto_torch_cuda::read_status(small.data_ptr(), {}, stream()));
  }
  const auto B = off.view.count;
  auto metrics = torch::empty({9}, torch::dtype(torch::kDouble).device(d));
  auto per_example = torch::empty({5, B}, torch::dtype(torch::kFloat).device(d));
  const auto ref = device_float(reference_logp, d);
  const auto labels = desirable.to(d, torch::kUInt8).contiguous();
  check(kto_torch_cuda::finish(partial.data_ptr<double>(), f[0].data_ptr<float>(),
                               ref.data_ptr<float>(), labels.data_ptr<uint8_t>(), B, o,
                               metrics.data_ptr<double>(), per_example.data_ptr<float>(),
                               small.data_ptr(), 1024, stream()));
  check(kto_torch_cuda::read_status(f[3].data_ptr(), off.view, stream()));
  check(kto_torch_cuda::read_status(small.data_ptr(), {}, stream()));
  return {metrics, per_example, f[1], f[2]};
}

torch::Tensor step_backward(const torch::Tensor& logits, const torch::Tensor& targets,
                            const Offsets& off, const torch::Tensor& row_lse,
                            const torch::Tensor& grad_logp, const torch::Tensor& num_tokens,
                            const kto::Options& o) {
  const auto d = logits.device();
  auto grad =
      torch::empty(logits.sizes(), logits.options().memory_format(torch::MemoryFormat::Contiguous));
  const auto lse = device_float(row_lse, d), g = device_float(grad_logp, d);
  const auto n = num_tokens.to(d, torch::kLong).contiguous();
  check(kto_torch_cuda::backward(logits_of(logits), targets_view(targets), off.view,
                                 lse.data_ptr<float>(), g.data_ptr<float>(), n.data_ptr<int64_t>(),
                                 o, grad.data_ptr(), logits_view<const char>(grad).rows, stream()));
  return grad;
}

kto_torch_cuda::DType dtype_of(const torch::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case torch::kFloat:
      return kto_torch_cuda::DType::f32;
    case torch::kHalf:
      return kto_torch_cuda::DType::f16;
    case torch::kBFloat16:
      return kto_torch_cuda::DType::bf16;
    default:
      TORCH_CHECK(false, "kto: argument '", name,
                  "' on CUDA must be float32, bfloat16 or float16; got ", x.scalar_type());
  }
  return kto_torch_cuda::DType::f32;
}

kto_torch_cuda::Matrix matrix_cuda(const torch::Tensor& x, const char* name) {
  const auto m = matrix_of<char>(x, name);
  return kto_torch_cuda::Matrix{dtype_of(x, name), x.data_ptr(), m.rows, m.cols, m.stride};
}

std::vector<torch::Tensor> fused_linear_forward(
    const torch::Tensor& hidden, const torch::Tensor& weight, const torch::Tensor& bias,
    const torch::Tensor& targets, const torch::Tensor& offsets, const torch::Tensor& reference_logp,
    const torch::Tensor& desirable, const torch::Tensor& kl_hidden, const torch::Tensor& kl_targets,
    const torch::Tensor& kl_offsets, const torch::Tensor& kl_reference_logp, const kto::Options& o,
    int64_t chunk_bytes, int64_t strategy) {
  const auto d = hidden.device();
  const Offsets off = offsets_view(offsets, d);
  const auto host_offsets = offsets.to(torch::kCPU, torch::kLong).contiguous();
  const bool kl = kto::uses_kl_batch(o) && kl_offsets.numel() > 0;
  const Offsets kl_off = offsets_view(kl ? kl_offsets : torch::zeros({1}, torch::kLong), d);
  const auto ref = device_float(reference_logp, d);
  const auto kl_ref = kl ? device_float(kl_reference_logp, d) : ref;
  const auto labels = desirable.to(d, torch::kUInt8).contiguous();
  const auto empty_targets = torch::empty({0}, torch::dtype(torch::kLong).device(d));
  const index_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0), B = off.view.count;
  const auto f32 = torch::dtype(torch::kFloat).device(d);
  auto metrics = torch::empty({9}, torch::dtype(torch::kDouble).device(d));
  auto per_example = torch::empty({5, B}, f32);
  auto n = torch::empty({B}, torch::dtype(torch::kLong).device(d));
  auto dh = torch::empty({N, D}, f32), dw = torch::empty({V, D}, f32);
  auto db = torch::empty({bias.numel() ? V : 0}, f32);
  const auto kl_matrix = kl ? matrix_cuda(kl_hidden, "kl_hidden")
                            : kto_torch_cuda::Matrix{dtype_of(hidden, "hidden"), nullptr, 0, D, D};
  const auto kl_tv = kl ? targets_view(kl_targets) : targets_view(empty_targets);
  auto call = [&](void* ws, std::size_t* bytes) {
    check(kto_torch_cuda::fused_linear_step(
        matrix_cuda(hidden, "hidden"), matrix_cuda(weight, "weight"),
        bias.numel() ? bias.data_ptr() : nullptr, targets_view(targets), off.view,
        host_offsets.data_ptr<int64_t>(), ref.data_ptr<float>(), labels.data_ptr<uint8_t>(),
        kl_matrix, kl_tv, kl_off.view, kl_ref.data_ptr<float>(), o,
        static_cast<std::size_t>(chunk_bytes), static_cast<int>(strategy),
        metrics.data_ptr<double>(), per_example.data_ptr<float>(), n.data_ptr<int64_t>(),
        dh.data_ptr<float>(), dw.data_ptr<float>(), bias.numel() ? db.data_ptr<float>() : nullptr,
        ws, bytes, stream()));
  };
  std::size_t bytes = 0;
  call(nullptr, &bytes);
  auto ws = workspace(bytes, d);
  call(ws.data_ptr(), &bytes);
  check(kto_torch_cuda::read_status(ws.data_ptr(), off.view, stream()));
  return {metrics, per_example, n, dh, dw, db};
}

std::vector<torch::Tensor> fused_linear_logprobs(const torch::Tensor& hidden,
                                                 const torch::Tensor& weight,
                                                 const torch::Tensor& bias,
                                                 const torch::Tensor& targets,
                                                 const torch::Tensor& offsets,
                                                 const kto::Options& o, int64_t chunk_bytes) {
  const auto d = hidden.device();
  const Offsets off = offsets_view(offsets, d);
  auto logp = torch::empty({off.view.count}, torch::dtype(torch::kFloat).device(d));
  auto n = torch::empty({off.view.count}, torch::dtype(torch::kLong).device(d));
  auto call = [&](void* ws, std::size_t* bytes) {
    check(kto_torch_cuda::fused_linear_logprobs(
        matrix_cuda(hidden, "hidden"), matrix_cuda(weight, "weight"),
        bias.numel() ? bias.data_ptr() : nullptr, targets_view(targets), off.view, o,
        static_cast<std::size_t>(chunk_bytes), logp.data_ptr<float>(), n.data_ptr<int64_t>(), ws,
        bytes, stream()));
  };
  std::size_t bytes = 0;
  call(nullptr, &bytes);
  auto ws = workspace(bytes, d);
  call(ws.data_ptr(), &bytes);
  check(kto_torch_cuda::read_status(ws.data_ptr(), off.view, stream()));
  return {logp, n};
}

}  // namespace cuda_path
#endif

bool has_cuda() {
#ifdef KTO_TORCH_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// ---- device dispatch: CPU tensors → Eigen path, CUDA tensors → CUDA kernels ----

void require_cuda_build(const torch::Tensor& logits) {
  TORCH_CHECK(has_cuda(), "kto: argument 'logits' is on ", logits.device(),
              "; this build of kto_torch has the CPU kernels only (rebuild with nvcc present)");
}

std::vector<torch::Tensor> sequence_logprobs(const torch::Tensor& logits,
                                             const torch::Tensor& targets,
                                             const torch::Tensor& offsets, bool average,
                                             int64_t ignore_index) {
  if (!logits.is_cuda())
    return sequence_logprobs_cpu(logits, targets, offsets, average, ignore_index);
  require_cuda_build(logits);
#ifdef KTO_TORCH_WITH_CUDA
  kto::Options o;
  o.average_logprob = average;
  o.ignore_index = ignore_index;
  return cuda_path::sequence_logprobs(logits, targets, offsets_view(offsets, logits.device()), o);
#else
  return {};
#endif
}

std::vector<torch::Tensor> step_forward(
    const torch::Tensor& logits, const torch::Tensor& targets, const torch::Tensor& offsets,
    const torch::Tensor& reference_logp, const torch::Tensor& desirable,
    const torch::Tensor& kl_policy_logp, const torch::Tensor& kl_reference_logp,
    const torch::Tensor& kl_num_tokens, const torch::Tensor& global_kl, double beta,
    double desirable_weight, double undesirable_weight, int64_t loss_type, int64_t link,
    int64_t reference_point, int64_t kl_estimator, bool clamp_kl, double fixed_z0, bool average,
    int64_t reduction, int64_t mean_denominator, int64_t ignore_index) {
  const kto::Options o = kto::options_from_codes(
      beta, desirable_weight, undesirable_weight, static_cast<int>(loss_type),
      static_cast<int>(link), static_cast<int>(reference_point), static_cast<int>(kl_estimator),
      clamp_kl, fixed_z0, average, static_cast<int>(reduction), mean_denominator, ignore_index);
  if (!logits.is_cuda())
    return step_forward_cpu(logits, targets, offsets, reference_logp, desirable, kl_policy_logp,
                            kl_reference_logp, kl_num_tokens, global_kl, o);
  require_cuda_build(logits);
#ifdef KTO_TORCH_WITH_CUDA
  try {
    kto::validate_options(o, "kto_torch.step_forward");
  } catch (const kto::Error& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  return cuda_path::step_forward(logits, targets, offsets_view(offsets, logits.device()),
                                 reference_logp, desirable, kl_policy_logp, kl_reference_logp,
                                 kl_num_tokens, global_kl, o);
#else
  return {};
#endif
}

torch::Tensor step_backward(const torch::Tensor& logits, const torch::Tensor& targets,
                            const torch::Tensor& offsets, const torch::Tensor& row_lse,
                            const torch::Tensor& grad_logp, const torch::Tensor& num_tokens,
                            bool average, int64_t ignore_index) {
  if (!logits.is_cuda())
    return step_backward_cpu(logits, targets, offsets, row_lse, grad_logp, num_tokens, average,
                             ignore_index);
  require_cuda_build(logits);
#ifdef KTO_TORCH_WITH_CUDA
  kto::Options o;
  o.average_logprob = average;
  o.ignore_index = ignore_index;
  return cuda_path::step_backward(logits, targets, offsets_view(offsets, logits.device()), row_lse,
                                  grad_logp, num_tokens, o);
#else
  return {};
#endif
}

void check_fused_inputs(const torch::Tensor& hidden, const torch::Tensor& weight,
                        const torch::Tensor& bias, const torch::Tensor& kl_hidden) {
  check_same_dtype(weight, "weight", hidden);
  check_same_dtype(bias, "bias", hidden);
  check_same_dtype(kl_hidden, "kl_hidden", hidden);
  for (const auto* t : {&weight, &bias, &kl_hidden})
    TORCH_CHECK(t->numel() == 0 || t->device() == hidden.device(),
                "kto: every tensor of the fused-linear step must be on ", hidden.device(),
                " like 'hidden'; got one on ", t->device());
}

std::vector<torch::Tensor> fused_linear_forward(
    const torch::Tensor& hidden, const torch::Tensor& weight, const torch::Tensor& bias,
    const torch::Tensor& targets, const torch::Tensor& offsets, const torch::Tensor& reference_logp,
    const torch::Tensor& desirable, const torch::Tensor& kl_hidden, const torch::Tensor& kl_targets,
    const torch::Tensor& kl_offsets, const torch::Tensor& kl_reference_logp, double beta,
    double desirable_weight, double undesirable_weight, int64_t loss_type, int64_t link,
    int64_t reference_point, int64_t kl_estimator, bool clamp_kl, double fixed_z0, bool average,
    int64_t reduction, int64_t mean_denominator, int64_t ignore_index, int64_t chunk_bytes,
    int64_t strategy) {
  const kto::Options o = kto::options_from_codes(
      beta, desirable_weight, undesirable_weight, static_cast<int>(loss_type),
      static_cast<int>(link), static_cast<int>(reference_point), static_cast<int>(kl_estimator),
      clamp_kl, fixed_z0, average, static_cast<int>(reduction), mean_denominator, ignore_index);
  check_fused_inputs(hidden, weight, bias, kl_hidden);
  TORCH_CHECK(chunk_bytes > 0, "kto: argument 'chunk_bytes' must be > 0; got ", chunk_bytes);
  TORCH_CHECK(strategy == 0 || strategy == 1,
              "kto: argument 'strategy' must be keep_chunk or recompute; got code ", strategy);
  if (!hidden.is_cuda())
    return fused_linear_forward_cpu(hidden, weight, bias, targets, offsets, reference_logp,
                                    desirable, kl_hidden, kl_targets, kl_offsets, kl_reference_logp,
                                    o, chunk_bytes, strategy);
  require_cuda_build(hidden);
#ifdef KTO_TORCH_WITH_CUDA
  try {
    kto::validate_options(o, "kto_torch.fused_linear_forward");
  } catch (const kto::Error& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  return cuda_path::fused_linear_forward(hidden, weight, bias, targets, offsets, reference_logp,
                                         desirable, kl_hidden, kl_targets, kl_offsets,
                                         kl_reference_logp, o, chunk_bytes, strategy);
#else
  return {};
#endif
}

std::vector<torch::Tensor> fused_linear_logprobs(const torch::Tensor& hidden,
                                                 const torch::Tensor& weight,
                                                 const torch::Tensor& bias,
                                                 const torch::Tensor& targets,
                                                 const torch::Tensor& offsets, bool average,
                                                 int64_t ignore_index, int64_t chunk_bytes) {
  kto::Options o;
  o.average_logprob = average;
  o.ignore_index = ignore_index;
  check_fused_inputs(hidden, weight, bias, torch::empty({0}, hidden.options()));
  TORCH_CHECK(chunk_bytes > 0, "kto: argument 'chunk_bytes' must be > 0; got ", chunk_bytes);
  if (!hidden.is_cuda())
    return fused_linear_logprobs_cpu(hidden, weight, bias, targets, offsets, o, chunk_bytes);
  require_cuda_build(hidden);
#ifdef KTO_TORCH_WITH_CUDA
  return cuda_path::fused_linear_logprobs(hidden, weight, bias, targets, offsets, o, chunk_bytes);
#else
  return {};
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kto CPU kernels for the torch.library ops in kto_torch";
  m.def("sequence_logprobs", &sequence_logprobs);
  m.def("kl_partial", &kl_partial);
  m.def("reference_point", &reference_point);
  m.def("step_forward", &step_forward);
  m.def("step_backward", &step_backward);
  m.def("fused_linear_forward", &fused_linear_forward);
  m.def("fused_linear_logprobs", &fused_linear_logprobs);
  m.def("has_cuda", &has_cuda);
}
