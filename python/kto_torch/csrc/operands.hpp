// operands.hpp — the checks of every tensor a kto_torch op takes, and the operands
// they become: what the CPU ops (cpu_ops.hpp) and the CUDA ops (cuda_ops.hpp) both
// receive.
//
// Each check names the public Python function, the argument, the expectation and
// what came (errors.hpp's require). Strides are passed literally (the library reads
// a stride of 0, torch's expand, as one row repeated); a layout the library cannot
// read in place (the vocabulary not contiguous, interleaved batch entries such as a
// transposed [T, B, V], a matrix whose rows overlap) is copied to a contiguous
// tensor first.
//
// Devices: logits/hidden decide; targets, weight and bias must be on the same
// device. The small per-sequence tensors (offsets, reference_logp, desirable, the
// KL batch's log-probs and token counts, global_kl) may also be on the CPU: they
// are copied where the kernels need them.
#pragma once

#include <torch/extension.h>

#include <kto/kto.hpp>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "errors.hpp"

namespace kto_torch {
namespace {

using kto::index_t;

// The public Python functions, named in every error of their ops.
constexpr const char* kSequenceLogprobs = "kto_torch.sequence_logprobs";
constexpr const char* kKtoLoss = "kto_torch.kto_loss";
constexpr const char* kKtoLossBackward = "kto_torch.kto_loss (backward)";
constexpr const char* kKlPartial = "kto_torch.kl_partial";
constexpr const char* kReferencePoint = "kto_torch.reference_point";
constexpr const char* kContextParallelLoss = "kto_torch.distributed.context_parallel_kto_loss";
constexpr const char* kFusedLoss = "kto_torch.fused_linear_kto_loss";
constexpr const char* kFusedLogprobs = "kto_torch.fused_linear_logprobs";

// ---- argument checks ----

/// Where a tensor may live relative to the anchor (logits or hidden).
enum class Where { anchor, anchor_or_cpu };

void check_anchor(const char* fn, const char* name, const torch::Tensor& t) {
  require(t.device().is_cpu() || t.device().is_cuda(), fn, name,
          "hold data on the CPU or a CUDA device", text(t.device()));
}

void check_device(const char* fn, const char* name, const torch::Tensor& t,
                  const torch::Tensor& anchor, const char* anchor_name, Where where) {
  if (t.device() == anchor.device()) return;
  if (where == Where::anchor_or_cpu && t.device().is_cpu()) return;
  require(false, fn, name,
          text("be on ", anchor.device(), " like '", anchor_name, "'",
               where == Where::anchor_or_cpu ? " (or on the CPU)" : ""),
          text(t.device()));
}

bool is_float_type(torch::ScalarType s) {
  return s == torch::kFloat || s == torch::kDouble || s == torch::kBFloat16 || s == torch::kHalf;
}

/// The logits/hidden dtypes the kernels take on this device.
void check_logit_dtype(const char* fn, const char* name, const torch::Tensor& z) {
  if (z.is_cuda()) {
    require(z.scalar_type() == torch::kFloat || z.scalar_type() == torch::kBFloat16 ||
                z.scalar_type() == torch::kHalf,
            fn, name, "be float32, bfloat16 or float16 on CUDA", text(z.scalar_type()));
  } else {
    require(is_float_type(z.scalar_type()), fn, name, "be float32, float64, bfloat16 or float16",
            text(z.scalar_type()));
  }
}

/// Whether strides (s0 over n0 entries of s1 × n1 rows of `width` elements)
/// are a layout the library reads in place: rows `width` apart or repeated
/// (stride 0), batch entries past the previous entry's rows or repeated. A
/// stride over an extent of 1 is never used.
bool readable_rows(int64_t n1, int64_t s1, int64_t width, int64_t n0 = 1, int64_t s0 = 0) {
  if (n1 > 1 && !(s1 == 0 || s1 >= width)) return false;
  int64_t span = width;
  if (n1 > 1) {
    int64_t reach = 0;
    if (__builtin_mul_overflow(n1 - 1, s1, &reach) || __builtin_add_overflow(reach, width, &span))
      return false;
  }
  return n0 <= 1 || s0 == 0 || s0 >= span;
}

/// Logits ([rows, V] or [B, T, V]) the library can read: the tensor itself, or a contiguous copy.
torch::Tensor logits_operand(const char* fn, const char* name, const torch::Tensor& z) {
  check_anchor(fn, name, z);
  require(z.dim() == 2 || z.dim() == 3, fn, name, "be [rows, V] or [B, T, V]",
          text(z.dim(), " dims (shape ", shape_of(z), ")"));
  check_logit_dtype(fn, name, z);
  const int64_t V = z.size(-1);
  require(V >= 1, fn, name, "have a vocabulary of at least 1 (last dimension)", shape_of(z));
  const bool unit = V == 1 || z.stride(-1) == 1;
  const bool rows = z.dim() == 2 ? readable_rows(z.size(0), z.stride(0), V)
                                 : readable_rows(z.size(1), z.stride(1), V, z.size(0), z.stride(0));
  return unit && rows ? z : z.contiguous();
}

int64_t rows_of(const torch::Tensor& z) {
  return z.dim() == 2 ? z.size(0) : z.size(0) * z.size(1);
}

/// The row layout of a [rows, V] or [B, T, V] logits tensor (strides literal).
template <class T>
kto::LogitsView<T> logits_view(const torch::Tensor& z) {
  auto* data = reinterpret_cast<T*>(z.data_ptr());
  if (z.dim() == 2) return kto::logits_matrix<T>(data, z.size(0), z.size(1), z.stride(0));
  return kto::logits_batched<T>(data, z.size(0), z.size(1), z.size(2), z.stride(0), z.stride(1));
}

/// Token ids for `rows` rows ([rows], or [B, T] matching [B, T, V] logits), int64.
torch::Tensor targets_operand(const char* fn, const char* name, const torch::Tensor& t,
                              const torch::Tensor& anchor, const char* anchor_name, int64_t rows,
                              const torch::Tensor* batched_like = nullptr) {
  check_device(fn, name, t, anchor, anchor_name, Where::anchor);
  require(t.scalar_type() == torch::kLong || t.scalar_type() == torch::kInt, fn, name,
          "hold int64 (or int32) token ids", text(t.scalar_type()));
  require(t.dim() == 1 || t.dim() == 2, fn, name, "be [rows] or [B, T]",
          text(t.dim(), " dims (shape ", shape_of(t), ")"));
  if (t.dim() == 2 && batched_like != nullptr && batched_like->dim() == 3) {
    require(t.size(0) == batched_like->size(0) && t.size(1) == batched_like->size(1), fn, name,
            text("have the shape [B, T] = [", batched_like->size(0), ", ", batched_like->size(1),
                 "] of '", anchor_name, "'"),
            shape_of(t));
  }
  require(t.numel() == rows, fn, name,
          text("hold one id per row of '", anchor_name, "' (", rows, ")"),
          text(t.numel(), " (shape ", shape_of(t), ")"));
  torch::Tensor out = t.scalar_type() == torch::kLong ? t : t.to(torch::kLong);
  const bool ok = out.dim() == 1
                      ? readable_rows(out.size(0), out.stride(0), 1)
                      : readable_rows(out.size(1), out.stride(1), 1, out.size(0), out.stride(0));
  return ok ? out : out.contiguous();
}

kto::TargetsView targets_view(const torch::Tensor& t) {
  if (t.dim() == 1) return kto::targets_vector(t.data_ptr<int64_t>(), t.size(0), t.stride(0));
  return kto::targets_batched(t.data_ptr<int64_t>(), t.size(0), t.size(1), t.stride(0),
                              t.stride(1));
}

struct Offsets {
  torch::Tensor tensor;  // keeps the data alive
  kto::SequencesView view;
  index_t count() const { return view.count; }
};

/// CSR offsets (B + 1 integer entries, B >= min_count) as int64 on `where` (the device the
/// library reads them on).
Offsets offsets_operand(const char* fn, const char* name, const torch::Tensor& offsets,
                        const torch::Tensor& anchor, const char* anchor_name,
                        const torch::Device& where, int64_t min_count = 0) {
  check_device(fn, name, offsets, anchor, anchor_name, Where::anchor_or_cpu);
  require(offsets.scalar_type() == torch::kLong || offsets.scalar_type() == torch::kInt, fn, name,
          "hold int64 (or int32) row offsets", text(offsets.scalar_type()));
  require(offsets.dim() == 1 && offsets.size(0) >= 1, fn, name,
          "be 1-D with B + 1 entries (CSR offsets over the rows)",
          text("shape ", shape_of(offsets)));
  require(
      offsets.size(0) >= min_count + 1, fn, name,
      text("hold B + 1 entries with B >= ", min_count, " sequences (an empty batch has no loss)"),
      text("shape ", shape_of(offsets)));
  Offsets o{offsets.to(where, torch::kLong).contiguous(), {}};
  o.view = kto::sequences(o.tensor.data_ptr<int64_t>(), o.tensor.size(0) - 1);
  return o;
}

/// A 1-D floating tensor of `n` entries (n < 0: any length; allow_empty: 0 too),
/// as `dtype` on `where`.
torch::Tensor float_vector(const char* fn, const char* name, const torch::Tensor& t,
                           const torch::Tensor& anchor, const char* anchor_name, int64_t n,
                           torch::ScalarType dtype, const torch::Device& where,
                           bool allow_empty = false) {
  check_device(fn, name, t, anchor, anchor_name, Where::anchor_or_cpu);
  require(is_float_type(t.scalar_type()), fn, name, "be a floating-point tensor",
          text(t.scalar_type()));
  require(t.dim() == 1, fn, name, "be 1-D", text("shape ", shape_of(t)));
  require(n < 0 || t.size(0) == n || (allow_empty && t.size(0) == 0), fn, name,
          text("have ", n, " entries (one per sequence)"), text(t.size(0)));
  return t.to(where, dtype).contiguous();
}

/// A 1-D integer tensor of `n` entries (allow_empty: 0 too), as int64 on `where`.
torch::Tensor int_vector(const char* fn, const char* name, const torch::Tensor& t,
                         const torch::Tensor& anchor, const char* anchor_name, int64_t n,
                         const torch::Device& where, bool allow_empty = false) {
  check_device(fn, name, t, anchor, anchor_name, Where::anchor_or_cpu);
  require(c10::isIntegralType(t.scalar_type(), /*includeBool=*/false), fn, name,
          "be an integer tensor (token counts)", text(t.scalar_type()));
  require(t.dim() == 1, fn, name, "be 1-D", text("shape ", shape_of(t)));
  require(n < 0 || t.size(0) == n || (allow_empty && t.size(0) == 0), fn, name,
          text("have ", n, " entries (one per sequence)"), text(t.size(0)));
  return t.to(where, torch::kLong).contiguous();
}

/// Labels: bool, or integers/floats equal to 0 or 1, checked in their own dtype
/// (so 256 or 0.9 are not cast to 0 first); B entries, as uint8 on `where`.
torch::Tensor labels_operand(const char* fn, const torch::Tensor& d, const torch::Tensor& anchor,
                             const char* anchor_name, int64_t n, const torch::Device& where) {
  const char* name = "desirable";
  check_device(fn, name, d, anchor, anchor_name, Where::anchor_or_cpu);
  const auto s = d.scalar_type();
  require(s == torch::kBool || c10::isIntegralType(s, false) || is_float_type(s), fn, name,
          "be bool, or integers or floats equal to 0 or 1", text(s));
  require(d.dim() == 1, fn, name, "be 1-D (one label per sequence)", text("shape ", shape_of(d)));
  require(d.size(0) == n, fn, name, text("have ", n, " entries (one per sequence)"),
          text(d.size(0)));
  const torch::Tensor host = d.to(torch::kCPU).contiguous();
  if (s != torch::kBool) {
    const torch::Tensor bad = host.ne(0).logical_and(host.ne(1));
    if (bad.any().item<bool>()) {
      const int64_t i = bad.nonzero()[0][0].item<int64_t>();
      require(false, fn, text(name, "[", i, "]"), "be 0 (undesirable) or 1 (desirable), or a bool",
              text(host[i].item()));
    }
  }
  return host.to(torch::kUInt8).to(where).contiguous();
}

/// (S, C) of an all-reduced KL partial; an empty tensor means none was given
/// (the Python functions pass None that way and reject an explicit wrong size).
std::optional<std::pair<double, double>> global_kl_operand(const char* fn, const torch::Tensor& g,
                                                           const torch::Tensor& anchor,
                                                           const char* anchor_name) {
  if (g.numel() == 0 && g.dim() == 1) return std::nullopt;
  const char* name = "global_kl";
  check_device(fn, name, g, anchor, anchor_name, Where::anchor_or_cpu);
  require(is_float_type(g.scalar_type()), fn, name, "be a floating-point tensor (float64)",
          text(g.scalar_type()));
  require(g.dim() == 1 && g.numel() == 2, fn, name,
          "hold the all-reduced (S, C): 1-D with 2 elements", text("shape ", shape_of(g)));
  const auto h = g.to(torch::kCPU, torch::kDouble).contiguous();
  const double S = h.data_ptr<double>()[0], C = h.data_ptr<double>()[1];
  require(std::isfinite(S) && std::isfinite(C) && C >= 0, fn, name,
          "hold a finite sum S and a count C >= 0", text("(", S, ", ", C, ")"));
  return std::make_pair(S, C);
}

/// A [rows, cols] matrix the library can read (unit column stride, rows at
/// least cols apart): the tensor itself, or a contiguous copy (stride 0 from
/// expand, a transpose, overlapping rows).
torch::Tensor matrix_operand(const torch::Tensor& x) {
  const bool ok =
      (x.size(1) <= 1 || x.stride(1) == 1) && (x.size(0) <= 1 || x.stride(0) >= x.size(1));
  return ok ? x : x.contiguous();
}

template <class T>
kto::MatrixView<const T> matrix_of(const torch::Tensor& x) {
  return kto::MatrixView<const T>{reinterpret_cast<const T*>(x.data_ptr()), x.size(0), x.size(1),
                                  x.size(0) > 1 ? x.stride(0) : x.size(1)};
}

template <class A>
kto::Span<const A> span_of(const torch::Tensor& x) {
  return kto::make_span(x.data_ptr<A>(), x.numel());
}

kto::Span<const index_t> index_span(const torch::Tensor& x) {
  return kto::make_span(x.data_ptr<int64_t>(), x.numel());
}

/// The accumulation type of the CPU kernels for these logits (hidden states).
torch::ScalarType acc_of(const torch::Tensor& z) {
  return z.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

/// Options from the one array the ops take (kto/options.hpp's binding contract).
kto::Options options_of(const char* fn, const std::vector<double>& options) {
  return kto::options_from_array(options.data(), static_cast<kto::index_t>(options.size()), fn);
}

// ---- the operands of the logits ops ----

/// Checked operands of a step on logits: what the CPU and CUDA kernels both take.
struct StepOperands {
  torch::Tensor logits, targets;
  Offsets offsets;
};

StepOperands step_operands(const char* fn, const torch::Tensor& logits,
                           const torch::Tensor& targets, const torch::Tensor& offsets,
                           int64_t min_sequences = 0) {
  StepOperands s;
  s.logits = logits_operand(fn, "logits", logits);
  s.targets = targets_operand(fn, "targets", targets, logits, "logits", rows_of(logits), &logits);
  s.offsets =
      offsets_operand(fn, "offsets", offsets, logits, "logits", logits.device(), min_sequences);
  return s;
}

/// The per-sequence inputs of a step, checked and converted for the kernels: the target
/// batch's reference log-probs and labels, and the KL batch as its log-probs (or an
/// all-reduced (S, C)).
struct StepVectors {
  torch::Tensor reference_logp, desirable;
  torch::Tensor kl_policy_logp, kl_reference_logp, kl_num_tokens;  // empty: none
  std::optional<std::pair<double, double>> global_kl;
};

StepVectors step_vectors(const char* fn, const torch::Tensor& anchor, const char* anchor_name,
                         int64_t B, const torch::Tensor& reference_logp,
                         const torch::Tensor& desirable, const torch::Tensor& kl_policy_logp,
                         const torch::Tensor& kl_reference_logp, const torch::Tensor& kl_num_tokens,
                         const torch::Tensor& global_kl, torch::ScalarType acc) {
  const auto d = anchor.device();
  const char* a = anchor_name;
  StepVectors v;
  v.reference_logp = float_vector(fn, "reference_logp", reference_logp, anchor, a, B, acc, d);
  v.desirable = labels_operand(fn, desirable, anchor, a, B, d);
  v.kl_policy_logp = float_vector(fn, "kl_policy_logp", kl_policy_logp, anchor, a, -1, acc, d);
  const int64_t K = v.kl_policy_logp.size(0);
  v.kl_reference_logp =
      float_vector(fn, "kl_reference_logp", kl_reference_logp, anchor, a, K, acc, d);
  v.kl_num_tokens = int_vector(fn, "kl_num_tokens", kl_num_tokens, anchor, a, K, d, true);
  v.global_kl = global_kl_operand(fn, global_kl, anchor, a);
  return v;
}

/// A step that estimates z0 from a KL batch (reference_point kl_batch, loss_type kto) needs
/// one with an example to count: its log-probs (and, for nonempty_mean, token counts with a
/// scored token somewhere), or the all-reduced (S, C) of one on some rank.
void require_kl_batch(const char* fn, const StepVectors& v, const kto::Options& o) {
  if (!kto::uses_kl_batch(o)) return;
  if (v.global_kl) {
    require(v.global_kl->second >= 1, fn, "global_kl",
            "count at least one KL example (C >= 1) with reference_point='kl_batch'",
            text("C = ", v.global_kl->second));
    return;
  }
  const int64_t K = v.kl_policy_logp.numel();
  require(K > 0, fn, "kl_policy_logp",
          "hold the KL batch's log-probs (at least one sequence) with "
          "reference_point='kl_batch' (the default): pass kl_policy_logp and "
          "kl_reference_logp (and kl_num_tokens), or global_kl, or choose "
          "reference_point='zero' or 'fixed'",
          "none");
  if (o.kl_estimator != kto::KlEstimator::nonempty_mean) return;
  const auto& n = v.kl_num_tokens;
  require(n.numel() == K, fn, "kl_num_tokens",
          text("have ", K, " entries (one per KL sequence) with kl_estimator='nonempty_mean'"),
          text(n.numel()));
  require(n.gt(0).any().item<bool>(), fn, "kl_num_tokens",
          "count at least one KL sequence with a scored token with "
          "kl_estimator='nonempty_mean' and reference_point='kl_batch'",
          "none");
}

/// The residuals of the backward, checked against the logits.
struct BackwardVectors {
  torch::Tensor row_lse, grad_logp, num_tokens;
};

BackwardVectors backward_vectors(const char* fn, const StepOperands& s,
                                 const torch::Tensor& row_lse, const torch::Tensor& grad_logp,
                                 const torch::Tensor& num_tokens, torch::ScalarType acc) {
  const auto& z = s.logits;
  const auto d = z.device();
  BackwardVectors b;
  b.row_lse = float_vector(fn, "row_lse", row_lse, z, "logits", rows_of(z), acc, d);
  b.grad_logp = float_vector(fn, "grad_logp", grad_logp, z, "logits", s.offsets.count(), acc, d);
  b.num_tokens = int_vector(fn, "num_tokens", num_tokens, z, "logits", s.offsets.count(), d);
  return b;
}

// ---- the operands of the fused-linear ops: hidden states and the lm_head ----

/// The fused ops' hidden states (as [N, D]), lm_head weight and bias, checked against each
/// other.
struct Head {
  torch::Tensor hidden, weight, bias;  // bias undefined: none
  int64_t N = 0, D = 0, V = 0;
  bool mixed = false;  // an fp32 weight read through a copy in hidden's dtype
};

Head head_operands(const char* fn, const torch::Tensor& hidden, const torch::Tensor& weight,
                   const torch::Tensor& bias) {
  check_anchor(fn, "hidden", hidden);
  require(hidden.dim() == 2 || hidden.dim() == 3, fn, "hidden", "be [N, D] or [B, T, D]",
          text(hidden.dim(), " dims (shape ", shape_of(hidden), ")"));
  check_logit_dtype(fn, "hidden", hidden);
  Head h;
  h.D = hidden.size(-1);
  require(h.D >= 1, fn, "hidden", "have a hidden size D >= 1 (last dimension)",
          text("shape ", shape_of(hidden)));
  check_device(fn, "weight", weight, hidden, "hidden", Where::anchor);
  // The lm_head's weight as nn.Linear(D, V) holds it: [V, D]. Its transpose, [D, V], is
  // the one mistake the library's own check (hidden.cols against weight.cols) would blame
  // on the hidden states.
  const bool transposed = weight.dim() == 2 && weight.size(0) == h.D && weight.size(1) != h.D;
  require(weight.dim() == 2 && weight.size(1) == h.D && weight.size(0) >= 1, fn, "weight",
          text("be the lm_head's weight [V, D] with V >= 1 and D = ", h.D,
               " (the last dimension of 'hidden'), as nn.Linear(D, V).weight holds it"),
          text("shape ", shape_of(weight),
               transposed ? ": a transposed [D, V] head; pass lm_head.weight itself, not its "
                            "transpose"
                          : ""));
  h.hidden = matrix_operand(hidden.dim() == 3 ? hidden.reshape({-1, h.D}) : hidden);
  h.weight = matrix_operand(weight);
  h.N = h.hidden.size(0);
  h.V = weight.size(0);
  // Mixed precision (an fp32 lm_head under bf16/fp16 autocast, TRL's default): the GEMMs
  // read a copy of the weight and bias in hidden's dtype, and their gradients stay the
  // library's fp32 sums, never rounded to hidden's dtype on the way to an fp32 parameter.
  const bool half =
      hidden.scalar_type() == torch::kBFloat16 || hidden.scalar_type() == torch::kHalf;
  const bool mixed = half && weight.scalar_type() == torch::kFloat;
  h.mixed = mixed;
  const std::string head_dtype =
      half ? text("have the dtype of 'hidden' (", hidden.scalar_type(), ") or be Float")
           : text("have the dtype of 'hidden' (", hidden.scalar_type(), ")");
  require(weight.scalar_type() == hidden.scalar_type() || mixed, fn, "weight", head_dtype,
          text(weight.scalar_type()));
  if (mixed) h.weight = h.weight.to(hidden.scalar_type());
  if (bias.numel() > 0 || bias.dim() != 1) {  // an empty 1-D tensor: no bias
    check_device(fn, "bias", bias, hidden, "hidden", Where::anchor);
    require(bias.scalar_type() == weight.scalar_type(), fn, "bias",
            text("have the dtype of 'weight' (", weight.scalar_type(), ")"),
            text(bias.scalar_type()));
    require(bias.dim() == 1 && bias.size(0) == h.V, fn, "bias",
            text("be 1-D with V = weight.size(0) = ", h.V, " entries"),
            text("shape ", shape_of(bias)));
    h.bias = mixed ? bias.to(hidden.scalar_type()).contiguous()
                   : (h.V > 1 && bias.stride(0) != 1 ? bias.contiguous() : bias);
  }
  return h;
}

template <class T>
kto::LinearHead<T> linear_head(const Head& h) {
  kto::LinearHead<T> head;
  head.weight = matrix_of<T>(h.weight);
  if (h.bias.defined())
    head.bias = kto::make_span(reinterpret_cast<const T*>(h.bias.data_ptr()), h.bias.numel());
  return head;
}

/// The operands of the fused step: the head, the target batch's rows and per-sequence
/// inputs, and the KL batch as its log-probs, as the logits step takes it.
struct FusedOperands {
  Head head;
  torch::Tensor targets;
  Offsets offsets;
  StepVectors v;
};

FusedOperands fused_operands(const char* fn, const torch::Tensor& hidden,
                             const torch::Tensor& weight, const torch::Tensor& bias,
                             const torch::Tensor& targets, const torch::Tensor& offsets,
                             const torch::Tensor& reference_logp, const torch::Tensor& desirable,
                             const torch::Tensor& kl_policy_logp,
                             const torch::Tensor& kl_reference_logp,
                             const torch::Tensor& kl_num_tokens, const torch::Tensor& global_kl,
                             torch::ScalarType acc) {
  FusedOperands f;
  f.head = head_operands(fn, hidden, weight, bias);
  const auto d = hidden.device();
  f.targets = targets_operand(fn, "targets", targets, hidden, "hidden", f.head.N, &hidden);
  f.offsets = offsets_operand(fn, "offsets", offsets, hidden, "hidden", d, 1);
  f.v = step_vectors(fn, hidden, "hidden", f.offsets.count(), reference_logp, desirable,
                     kl_policy_logp, kl_reference_logp, kl_num_tokens, global_kl, acc);
  return f;
}

/// The fused step's options: z0 from the KL batch's log-probs (or the all-reduced (S, C))
/// by the library's own estimate, handed to the step as a fixed reference point (the fused
/// step then needs no KL batch of its own; its loss, metrics and gradients are those the
/// step would give with the KL batch inside).
kto::Options with_kl_reference_point(const char* fn, const StepVectors& v, kto::Options o) {
  require_kl_batch(fn, v, o);
  if (!kto::uses_kl_batch(o)) return o;
  kto::KlPartial p;
  if (v.global_kl) {
    p.sum = v.global_kl->first;
    p.count = v.global_kl->second;
  } else {
    const auto host = [](const torch::Tensor& t, torch::ScalarType s) {
      return t.to(torch::kCPU, s).contiguous();
    };
    const auto policy = host(v.kl_policy_logp, torch::kDouble);
    const auto reference = host(v.kl_reference_logp, torch::kDouble);
    const auto tokens = host(v.kl_num_tokens, torch::kLong);
    p = kto::kl_partial<double>(kto::policy_logp(span_of<double>(policy)),
                                kto::reference_logp(span_of<double>(reference)), index_span(tokens),
                                o);
  }
  o.fixed_z0 = kto::reference_point(p, o);
  o.reference_point = kto::ReferencePoint::fixed;
  return o;
}

struct FusedLogprobOperands {
  Head head;
  torch::Tensor targets;
  Offsets offsets;
};

FusedLogprobOperands fused_logprob_operands(const char* fn, const torch::Tensor& hidden,
                                            const torch::Tensor& weight, const torch::Tensor& bias,
                                            const torch::Tensor& targets,
                                            const torch::Tensor& offsets) {
  FusedLogprobOperands f;
  f.head = head_operands(fn, hidden, weight, bias);
  f.targets = targets_operand(fn, "targets", targets, hidden, "hidden", f.head.N, &hidden);
  f.offsets = offsets_operand(fn, "offsets", offsets, hidden, "hidden", hidden.device());
  return f;
}

// ---- the library's names as the caller's (errors.hpp) ----

/// What the library calls the operands of an op on logits (or hidden states, `anchor`),
/// as its Python function names them; flat row indices over the anchor's leading
/// dimensions and over the targets' shape.
Names names_of(const char* fn, const char* anchor_name, const torch::Tensor& anchor,
               const torch::Tensor& targets, bool global_kl = false) {
  const auto rows = leading_dims(anchor, 1);
  return Names(fn, {{"policy_logits", anchor_name, rows},
                    {"logits", anchor_name, rows},
                    {"hidden", anchor_name, rows},
                    {"targets", "targets", leading_dims(targets, 0)},
                    {"sequences", "offsets", {}},
                    {"head.weight", "weight", {}},
                    {"head.bias", "bias", {}},
                    {"head", "weight", {}},
                    {"kl.policy_logp", "kl_policy_logp", {}},
                    {"kl.reference_logp", "kl_reference_logp", {}},
                    {"kl.num_tokens", "kl_num_tokens", {}},
                    {"kl.count", global_kl ? "global_kl" : "kl_num_tokens", {}},
                    {"kl.sum", "global_kl", {}},
                    {"grad", anchor_name, rows}});
}

}  // namespace
}  // namespace kto_torch
