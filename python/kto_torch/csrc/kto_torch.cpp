// kto_torch.cpp — PyTorch bindings of kto (the edge where dtype dispatch lives).
// The ops themselves (schemas, fake kernels, autograd) are registered in
// Python with torch.library (kto_torch/__init__.py); these functions are their
// kernels.
//
// Every entry point first checks every tensor argument — device, dtype, shape
// and stride — and names the public Python function, the argument, the
// expectation and what came; then it makes one library call. Strides are
// passed literally (the library reads a stride of 0, torch's expand, as one
// row repeated); a layout the library cannot read in place (the vocabulary
// not contiguous, interleaved batch entries such as a transposed [T, B, V], a
// matrix whose rows overlap) is copied to a contiguous tensor first.
// Gradients are always fresh contiguous tensors.
//
// Devices: logits/hidden decide; targets, weight, bias and the KL batch's
// hidden states must be on the same device. The small per-sequence tensors
// (offsets, reference_logp, desirable, the KL log-probs and counts, global_kl)
// may also be on the CPU: they are copied where the kernels need them.
// CUDA tensors go to kto's CUDA kernels when the extension was built with
// them (KTO_TORCH_WITH_CUDA); device-detected errors are read back after the
// forward (one stream synchronisation) so they raise like the CPU ones.
#include <torch/extension.h>

#include <kto/cpu/isa.hpp>
#include <kto/kto.hpp>

#ifdef KTO_TORCH_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kto_torch_cuda.h"
#endif

#include <cmath>
#include <cstring>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

using kto::index_t;

// The public Python functions, named in every error of their ops.
constexpr const char* kSequenceLogprobs = "kto_torch.sequence_logprobs";
constexpr const char* kKtoLoss = "kto_torch.kto_loss";
constexpr const char* kKtoLossBackward = "kto_torch.kto_loss (backward)";
constexpr const char* kKlPartial = "kto_torch.kl_partial";
constexpr const char* kReferencePoint = "kto_torch.reference_point";
constexpr const char* kFusedLoss = "kto_torch.fused_linear_kto_loss";
constexpr const char* kFusedLogprobs = "kto_torch.fused_linear_logprobs";

// ---- argument checks ----

template <class... Args>
std::string text(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

std::string shape_of(const torch::Tensor& t) {
  return text(t.sizes());
}

/// kto_torch.KTOError (a ValueError) "<fn>: argument '<name>' must <expectation>; got <got>".
void require(bool ok, const char* fn, const std::string& name, const std::string& expectation,
             const std::string& got) {
  if (!ok)
    throw kto::Error(fn, name,
                     text(fn, ": argument '", name, "' must ", expectation, "; got ", got));
}

/// Raises kto_torch._errors.<name>(message) with the error's attributes set.
void raise_python(const char* name, const kto::Error& e,
                  const std::vector<std::pair<const char*, pybind11::object>>& extra = {}) {
  pybind11::object cls = pybind11::module_::import("kto_torch._errors").attr(name);
  pybind11::object error = cls(e.what());
  error.attr("function") = e.function();
  error.attr("argument") = e.argument();
  for (const auto& [key, value] : extra) error.attr(key) = value;
  PyErr_SetObject(cls.ptr(), error.ptr());
}

/// The library's errors as kto_torch's exception classes (kto_torch/_errors.py).
void translate_kto_errors(std::exception_ptr p) {
  if (!p) return;
  try {
    std::rethrow_exception(p);
  } catch (const kto::NonFiniteLogitsError& e) {
    raise_python("NonFiniteLogitsError", e,
                 {{"sequence", pybind11::int_(e.sequence())}, {"row", pybind11::int_(e.row())}});
  } catch (const kto::PeerError& e) {
    raise_python("PeerError", e);
  } catch (const kto::Error& e) {
    raise_python("KTOError", e);
  }
}

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

/// CSR offsets (B + 1 integer entries) as int64 on `where` (the device the library reads them on).
Offsets offsets_operand(const char* fn, const char* name, const torch::Tensor& offsets,
                        const torch::Tensor& anchor, const char* anchor_name,
                        const torch::Device& where) {
  check_device(fn, name, offsets, anchor, anchor_name, Where::anchor_or_cpu);
  require(offsets.scalar_type() == torch::kLong || offsets.scalar_type() == torch::kInt, fn, name,
          "hold int64 (or int32) row offsets", text(offsets.scalar_type()));
  require(offsets.dim() == 1 && offsets.size(0) >= 1, fn, name,
          "be 1-D with B + 1 entries (CSR offsets over the rows)",
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
torch::Tensor matrix_operand(const char* fn, const char* name, const torch::Tensor& x,
                             const torch::Tensor& anchor, const char* anchor_name) {
  check_device(fn, name, x, anchor, anchor_name, Where::anchor);
  require(x.dim() == 2, fn, name, "be 2-D [rows, D]",
          text(x.dim(), " dims (shape ", shape_of(x), ")"));
  const bool ok =
      (x.size(1) <= 1 || x.stride(1) == 1) && (x.size(0) <= 1 || x.stride(0) >= x.size(1));
  return ok ? x : x.contiguous();
}

template <class T>
kto::MatrixView<const T> matrix_of(const torch::Tensor& x) {
  return kto::MatrixView<const T>{reinterpret_cast<const T*>(x.data_ptr()), x.size(0), x.size(1),
                                  x.size(0) > 1 ? x.stride(0) : x.size(1)};
}

/// The fused ops' hidden states, lm_head weight and bias, checked against each other.
struct Head {
  torch::Tensor hidden, weight, bias;  // bias undefined: none
  int64_t N = 0, D = 0, V = 0;
  bool mixed = false;  // an fp32 weight read through a copy in hidden's dtype
};

Head head_operands(const char* fn, const torch::Tensor& hidden, const torch::Tensor& weight,
                   const torch::Tensor& bias) {
  check_anchor(fn, "hidden", hidden);
  Head h;
  h.hidden = matrix_operand(fn, "hidden", hidden, hidden, "hidden");
  check_logit_dtype(fn, "hidden", hidden);
  h.weight = matrix_operand(fn, "weight", weight, hidden, "hidden");
  h.N = hidden.size(0);
  h.D = hidden.size(1);
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
  // D against hidden.size(1): the library's check (head.weight.cols).
  require(h.V >= 1, fn, "weight", "be [V, D] with V >= 1", shape_of(weight));
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

// ---- the CPU kernels ----

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

torch::ScalarType acc_of(const torch::Tensor& z) {
  return z.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

template <class A>
kto::Span<const A> span_of(const torch::Tensor& x) {
  return kto::make_span(x.data_ptr<A>(), x.numel());
}

kto::Span<const index_t> index_span(const torch::Tensor& x) {
  return kto::make_span(x.data_ptr<int64_t>(), x.numel());
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

/// The library's metric names, in the order of the metrics array.
std::vector<std::string> metric_names() {
  return std::vector<std::string>(kto::kMetricNames, kto::kMetricNames + kto::kMetricCount);
}

/// The library's names of the per-example rows, in their order.
std::vector<std::string> example_output_names() {
  return std::vector<std::string>(kto::kExampleOutputNames,
                                  kto::kExampleOutputNames + kto::kExampleOutputCount);
}

/// The library's default chunk budget of the fused-linear step on each device.
int64_t default_chunk_bytes(bool cuda) {
  return static_cast<int64_t>(cuda ? kto::kDefaultCudaChunkBytes : kto::kDefaultCpuChunkBytes);
}

/// The library's option names, in the order of the options array every op takes.
std::vector<std::string> option_names() {
  return std::vector<std::string>(kto::kOptionNames, kto::kOptionNames + kto::kOptionCount);
}

/// Options from the one array the ops take (kto/options.hpp's binding contract).
kto::Options options_of(const char* fn, const std::vector<double>& options) {
  return kto::options_from_array(options.data(), static_cast<kto::index_t>(options.size()), fn);
}

/// Checked operands of a step on logits: what the CPU and CUDA kernels both take.
struct StepOperands {
  torch::Tensor logits, targets;
  Offsets offsets;
};

StepOperands step_operands(const char* fn, const torch::Tensor& logits,
                           const torch::Tensor& targets, const torch::Tensor& offsets) {
  StepOperands s;
  s.logits = logits_operand(fn, "logits", logits);
  s.targets = targets_operand(fn, "targets", targets, logits, "logits", rows_of(logits), &logits);
  s.offsets = offsets_operand(fn, "offsets", offsets, logits, "logits", logits.device());
  return s;
}

/// (logp [B], num_tokens [B] int64, row_lse [rows]) in the accumulation type.
std::vector<torch::Tensor> sequence_logprobs_cpu(const StepOperands& s, const kto::Options& o) {
  std::vector<torch::Tensor> out;
  dispatch(s.logits, [&](auto tag) {
    using T = decltype(tag);
    const auto f = kto::cpu::sequence_logprobs<T>(
        logits_view<const T>(s.logits), targets_view(s.targets), s.offsets.view, o, exec());
    out = {tensor_of(f.logp), tensor_of(f.num_tokens), tensor_of(f.row_lse)};
  });
  return out;
}

/// The per-sequence inputs of a step, checked and converted for the kernels.
struct StepVectors {
  torch::Tensor reference_logp, desirable;
  torch::Tensor kl_policy_logp, kl_reference_logp, kl_num_tokens;  // empty: none
  std::optional<std::pair<double, double>> global_kl;
};

StepVectors step_vectors(const char* fn, const torch::Tensor& logits, int64_t B,
                         const torch::Tensor& reference_logp, const torch::Tensor& desirable,
                         const torch::Tensor& kl_policy_logp,
                         const torch::Tensor& kl_reference_logp, const torch::Tensor& kl_num_tokens,
                         const torch::Tensor& global_kl, torch::ScalarType acc) {
  const auto d = logits.device();
  StepVectors v;
  v.reference_logp =
      float_vector(fn, "reference_logp", reference_logp, logits, "logits", B, acc, d);
  v.desirable = labels_operand(fn, desirable, logits, "logits", B, d);
  v.kl_policy_logp =
      float_vector(fn, "kl_policy_logp", kl_policy_logp, logits, "logits", -1, acc, d);
  const int64_t K = v.kl_policy_logp.size(0);
  v.kl_reference_logp =
      float_vector(fn, "kl_reference_logp", kl_reference_logp, logits, "logits", K, acc, d);
  v.kl_num_tokens = int_vector(fn, "kl_num_tokens", kl_num_tokens, logits, "logits", K, d, true);
  v.global_kl = global_kl_operand(fn, global_kl, logits, "logits");
  return v;
}

/// metrics [9] float64, per_example [5, B] (logp, ρ, βρ, loss, g_s), num_tokens [B], row_lse
/// [rows]: kto::cpu::step_forward, with `global_kl` (an all-reduced (S, C)) handed to it through
/// its all-reduce hook in place of the local KL batch.
std::vector<torch::Tensor> step_forward_cpu(const StepOperands& s, const StepVectors& v,
                                            const kto::Options& o) {
  std::vector<torch::Tensor> out;
  dispatch(s.logits, [&](auto tag) {
    using T = decltype(tag);
    using A = kto::accumulator_t<T>;
    kto::cpu::StepInputs<T> in{logits_view<const T>(s.logits),
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

/// dL/dlogits for dL/dlogp_s = grad_logp[s], as a new contiguous tensor of the logits' shape.
torch::Tensor step_backward_cpu(const StepOperands& s, const BackwardVectors& b,
                                const kto::Options& o) {
  auto grad = torch::empty(s.logits.sizes(),
                           s.logits.options().memory_format(torch::MemoryFormat::Contiguous));
  dispatch(s.logits, [&](auto tag) {
    using T = decltype(tag);
    using A = kto::accumulator_t<T>;
    kto::cpu::backward<T>(logits_view<const T>(s.logits), targets_view(s.targets), s.offsets.view,
                          span_of<A>(b.row_lse), span_of<A>(b.grad_logp), index_span(b.num_tokens),
                          o, logits_view<T>(grad), exec());
  });
  return grad;
}

// ---- fused linear: hidden states and the lm_head instead of logits ----

/// The KL batch of the fused step: absent (kl_offsets empty) or complete.
struct FusedKl {
  bool given = false;
  torch::Tensor hidden, targets, reference_logp;
  Offsets offsets;
};

struct FusedOperands {
  Head head;
  torch::Tensor targets, reference_logp, desirable;
  Offsets offsets;
  FusedKl kl;
};

FusedOperands fused_operands(const char* fn, const torch::Tensor& hidden,
                             const torch::Tensor& weight, const torch::Tensor& bias,
                             const torch::Tensor& targets, const torch::Tensor& offsets,
                             const torch::Tensor& reference_logp, const torch::Tensor& desirable,
                             const torch::Tensor& kl_hidden, const torch::Tensor& kl_targets,
                             const torch::Tensor& kl_offsets,
                             const torch::Tensor& kl_reference_logp) {
  FusedOperands f;
  f.head = head_operands(fn, hidden, weight, bias);
  const auto d = hidden.device();
  const auto acc = hidden.is_cuda() ? torch::kFloat : acc_of(hidden);
  f.targets = targets_operand(fn, "targets", targets, hidden, "hidden", f.head.N);
  f.offsets = offsets_operand(fn, "offsets", offsets, hidden, "hidden", d);
  const int64_t B = f.offsets.count();
  f.reference_logp =
      float_vector(fn, "reference_logp", reference_logp, hidden, "hidden", B, acc, d);
  f.desirable = labels_operand(fn, desirable, hidden, "hidden", B, d);
  f.kl.given = kl_offsets.numel() > 0;
  if (f.kl.given) {
    f.kl.offsets = offsets_operand(fn, "kl_offsets", kl_offsets, hidden, "hidden", d);
    f.kl.hidden = matrix_operand(fn, "kl_hidden", kl_hidden, hidden, "hidden");
    require(kl_hidden.scalar_type() == hidden.scalar_type(), fn, "kl_hidden",
            text("have the dtype of 'hidden' (", hidden.scalar_type(), ")"),
            text(kl_hidden.scalar_type()));
    f.kl.targets =
        targets_operand(fn, "kl_targets", kl_targets, hidden, "hidden", kl_hidden.size(0));
    f.kl.reference_logp = float_vector(fn, "kl_reference_logp", kl_reference_logp, hidden, "hidden",
                                       f.kl.offsets.count(), acc, d);
  } else {
    require(kl_hidden.numel() == 0 && kl_targets.numel() == 0 && kl_reference_logp.numel() == 0, fn,
            "kl_offsets", "be given (B_kl + 1 entries) with the KL batch", "none");
  }
  return f;
}

/// metrics [9], per_example [5, B], num_tokens [B], d_hidden [N, D], d_weight [V, D], d_bias [V]
/// (empty without bias): gradients of the loss, in the accumulation type. A frozen head
/// (!weight_grad, !bias_grad): d_weight [0, D] and d_bias [0], and the library computes
/// neither (no dW GEMM, no [V, D] buffer).
std::vector<torch::Tensor> fused_linear_forward_cpu(const FusedOperands& f, const kto::Options& o,
                                                    int64_t chunk_bytes, int64_t strategy,
                                                    bool weight_grad, bool bias_grad) {
  const bool kl = kto::uses_kl_batch(o) && f.kl.given;
  std::vector<torch::Tensor> out;
  dispatch(f.head.hidden, [&](auto tag) {
    using T = decltype(tag);
    using A = kto::accumulator_t<T>;
    const kto::LinearHead<T> head = linear_head<T>(f.head);
    kto::cpu::FusedLinearInputs<T> in;
    in.hidden = matrix_of<T>(f.head.hidden);
    in.targets = targets_view(f.targets);
    in.sequences = f.offsets.view;
    in.reference_logp = kto::reference_logp(span_of<A>(f.reference_logp));
    in.desirable = kto::make_span(f.desirable.data_ptr<uint8_t>(), f.desirable.numel());
    if (kl) {  // otherwise the default (absent) views
      in.kl.hidden = matrix_of<T>(f.kl.hidden);
      in.kl.targets = targets_view(f.kl.targets);
      in.kl.sequences = f.kl.offsets.view;
      in.kl.reference_logp = kto::reference_logp(span_of<A>(f.kl.reference_logp));
    }
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
  f.targets = targets_operand(fn, "targets", targets, hidden, "hidden", f.head.N);
  f.offsets = offsets_operand(fn, "offsets", offsets, hidden, "hidden", hidden.device());
  return f;
}

/// Forward only: (logp [B], num_tokens [B]) from hidden states.
std::vector<torch::Tensor> fused_linear_logprobs_cpu(const FusedLogprobOperands& f,
                                                     const kto::Options& o, int64_t chunk_bytes) {
  std::vector<torch::Tensor> out;
  dispatch(f.head.hidden, [&](auto tag) {
    using T = decltype(tag);
    kto::cpu::FusedLinearConfig cfg;
    cfg.chunk_bytes = static_cast<size_t>(chunk_bytes);
    const auto r =
        kto::cpu::fused_linear_logprobs<T>(matrix_of<T>(f.head.hidden), targets_view(f.targets),
                                           f.offsets.view, linear_head<T>(f.head), o, cfg, exec());
    out = {tensor_of(r.logp), tensor_of(r.num_tokens)};
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

/// logp, num_tokens, row_lse, and the forward's workspace (holds its error word).
std::vector<torch::Tensor> forward(const StepOperands& s, const kto::Options& o) {
  const auto d = s.logits.device();
  const index_t rows = rows_of(s.logits), B = s.offsets.count();
  auto logp = torch::empty({B}, torch::dtype(torch::kFloat).device(d));
  auto n = torch::empty({B}, torch::dtype(torch::kLong).device(d));
  auto lse = torch::empty({rows}, torch::dtype(torch::kFloat).device(d));
  const std::size_t bytes = kto_torch_cuda::forward_workspace_bytes(rows);
  auto ws = workspace(bytes, d);
  check(kto_torch_cuda::forward(logits_of(s.logits), targets_view(s.targets), s.offsets.view, o,
                                logp.data_ptr<float>(), n.data_ptr<int64_t>(),
                                lse.data_ptr<float>(), ws.data_ptr(), bytes, stream()));
  return {logp, n, lse, ws};
}

std::vector<torch::Tensor> sequence_logprobs(const StepOperands& s, const kto::Options& o) {
  const c10::cuda::CUDAGuard guard(s.logits.device());
  auto f = forward(s, o);
  check(kto_torch_cuda::read_status(f[3].data_ptr(), s.offsets.view, stream()));
  return {f[0], f[1], f[2]};
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

std::vector<torch::Tensor> fused_linear_forward(const FusedOperands& f, const kto::Options& o,
                                                int64_t chunk_bytes, int64_t strategy) {
  const auto d = f.head.hidden.device();
  const c10::cuda::CUDAGuard guard(d);
  const bool kl = kto::uses_kl_batch(o) && f.kl.given;
  // Host copies of targets and offsets: whole sequences share a chunk, and the GEMMs multiply
  // the scored rows only (compact scoring).
  const CompactBatch target(f.targets, f.offsets);
  const CompactBatch kl_batch = kl ? CompactBatch(f.kl.targets, f.kl.offsets) : CompactBatch();
  const auto empty_targets = torch::empty({0}, torch::dtype(torch::kLong).device(d));
  const index_t N = f.head.N, D = f.head.D, V = f.head.V, B = f.offsets.count();
  const auto f32 = torch::dtype(torch::kFloat).device(d);
  auto metrics = torch::empty({9}, torch::dtype(torch::kDouble).device(d));
  auto per_example = torch::empty({kto::kExampleOutputCount, B}, f32);
  auto n = torch::empty({B}, torch::dtype(torch::kLong).device(d));
  // vocab_blocks writes dW once per block: in the weight's own dtype (half of fp32's
  // bytes) unless the parameter is fp32 (mixed precision keeps the fp32 sums).
  const bool dw_in_input_type =
      strategy == static_cast<int64_t>(kto::FusedStrategy::vocab_blocks) && !f.head.mixed;
  auto dh = torch::empty({N, D}, f32);
  auto dw = torch::empty({V, D}, dw_in_input_type ? f.head.weight.options() : f32);
  auto db = torch::empty({f.head.bias.defined() ? V : 0}, f32);
  auto statistics = token_statistics_on(d, o, B);
  const auto kl_matrix = kl ? matrix_cuda(f.kl.hidden)
                            : kto_torch_cuda::Matrix{dtype_of(f.head.hidden), nullptr, 0, D, D};
  const auto kl_tv = kl ? targets_view(kl_batch.targets) : targets_view(empty_targets);
  // An absent KL batch: no rows, B_kl = 0 (the CUDA step wants its offsets non-null).
  const auto no_kl_offsets = torch::zeros({1}, torch::dtype(torch::kLong).device(d));
  const auto kl_seq = kl ? f.kl.offsets.view : kto::sequences(no_kl_offsets.data_ptr<int64_t>(), 0);
  const float* kl_ref = kl ? f.kl.reference_logp.data_ptr<float>() : nullptr;
  auto call = [&](void* ws, std::size_t* bytes) {
    check(kto_torch_cuda::fused_linear_step(
        matrix_cuda(f.head.hidden), matrix_cuda(f.head.weight), bias_cuda(f.head),
        targets_view(target.targets), f.offsets.view, target.host_offsets_data(),
        target.host_targets_data(), f.reference_logp.data_ptr<float>(),
        f.desirable.data_ptr<uint8_t>(), kl_matrix, kl_tv, kl_seq, kl_batch.host_offsets_data(),
        kl_batch.host_targets_data(), kl_ref, o, static_cast<std::size_t>(chunk_bytes),
        static_cast<int>(strategy), metrics.data_ptr<double>(), per_example.data_ptr<float>(),
        n.data_ptr<int64_t>(), o.token_statistics ? statistics.data_ptr<double>() : nullptr,
        dh.data_ptr<float>(), dw.data_ptr(), dw_in_input_type,
        f.head.bias.defined() ? db.data_ptr<float>() : nullptr, ws, bytes, stream()));
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

}  // namespace cuda_path
#endif

bool has_cuda() {
#ifdef KTO_TORCH_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// ---- entry points: checks, then one library call on the backend torch's dispatcher
// chose (each op is registered per device in kto_torch/__init__.py: `_cpu` for CPU
// tensors, `_cuda` for CUDA ones) ----

enum class Backend { cpu, cuda };

/// The CUDA kernel of an op: a build with CUDA, and its anchor tensor on a CUDA device.
void require_cuda(const char* fn, const char* name, const torch::Tensor& z) {
  TORCH_CHECK_NOT_IMPLEMENTED(has_cuda(), fn, ": argument '", name, "' is on ", z.device(),
                              "; this build of kto_torch has the CPU kernels only (rebuild it "
                              "where nvcc is present)");
  require(z.is_cuda(), fn, name, "be on a CUDA device (another argument is)", text(z.device()));
}

template <Backend B>
std::vector<torch::Tensor> sequence_logprobs(const torch::Tensor& logits,
                                             const torch::Tensor& targets,
                                             const torch::Tensor& offsets,
                                             const std::vector<double>& options) {
  const char* fn = kSequenceLogprobs;
  const StepOperands s = step_operands(fn, logits, targets, offsets);
  const kto::Options o = options_of(fn, options);
  if constexpr (B == Backend::cpu) {
    return sequence_logprobs_cpu(s, o);
  } else {
    require_cuda(fn, "logits", logits);
#ifdef KTO_TORCH_WITH_CUDA
    return cuda_path::sequence_logprobs(s, o);
#else
    return {};
#endif
  }
}

/// Local (S, C) of a KL batch as a float64 [2] tensor, for an all-reduce.
torch::Tensor kl_partial(const torch::Tensor& policy_logp, const torch::Tensor& reference_logp,
                         const torch::Tensor& num_tokens, int64_t kl_estimator) {
  const char* fn = kKlPartial;
  require(kl_estimator == 0 || kl_estimator == 1, fn, "kl_estimator",
          "be mean (0) or nonempty_mean (1)", text(kl_estimator));
  kto::Options o;
  o.kl_estimator = static_cast<kto::KlEstimator>(kl_estimator);
  check_anchor(fn, "kl_policy_logp", policy_logp);
  const auto cpu = torch::Device(torch::kCPU);
  const auto p = float_vector(fn, "kl_policy_logp", policy_logp, policy_logp, "kl_policy_logp", -1,
                              torch::kDouble, cpu);
  const auto r = float_vector(fn, "kl_reference_logp", reference_logp, policy_logp,
                              "kl_policy_logp", p.size(0), torch::kDouble, cpu);
  const auto n = int_vector(fn, "kl_num_tokens", num_tokens, policy_logp, "kl_policy_logp",
                            p.size(0), cpu, true);
  const kto::KlPartial kl =
      kto::kl_partial<double>(kto::policy_logp(span_of<double>(p)),
                              kto::reference_logp(span_of<double>(r)), index_span(n), o);
  return torch::tensor({kl.sum, kl.count}, torch::dtype(torch::kDouble));
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

/// The schemas' Optional[Tensor]: an absent operand reads as an empty 1-D tensor on `like`'s
/// device (what the checks below treat as "not given").
using OptionalTensor = std::optional<torch::Tensor>;
torch::Tensor or_empty(const OptionalTensor& t, const torch::Tensor& like,
                       torch::ScalarType dtype) {
  return t ? *t : torch::empty({0}, like.options().dtype(dtype));
}

template <Backend B>
std::vector<torch::Tensor> step_forward(
    const torch::Tensor& logits, const torch::Tensor& targets, const torch::Tensor& offsets,
    const torch::Tensor& reference_logp, const torch::Tensor& desirable,
    const OptionalTensor& kl_policy_logp, const OptionalTensor& kl_reference_logp,
    const OptionalTensor& kl_num_tokens, const OptionalTensor& global_kl,
    const std::vector<double>& options) {
  const char* fn = kKtoLoss;
  const StepOperands s = step_operands(fn, logits, targets, offsets);
  const auto acc = B == Backend::cuda ? torch::kFloat : acc_of(s.logits);
  const StepVectors v = step_vectors(fn, logits, s.offsets.count(), reference_logp, desirable,
                                     or_empty(kl_policy_logp, logits, torch::kFloat),
                                     or_empty(kl_reference_logp, logits, torch::kFloat),
                                     or_empty(kl_num_tokens, logits, torch::kLong),
                                     or_empty(global_kl, logits, torch::kDouble), acc);
  const kto::Options o = options_of(fn, options);
  if constexpr (B == Backend::cpu) {
    return step_forward_cpu(s, v, o);
  } else {
    require_cuda(fn, "logits", logits);
#ifdef KTO_TORCH_WITH_CUDA
    return cuda_path::step_forward(s, v, o);
#else
    return {};
#endif
  }
}

template <Backend B>
torch::Tensor step_backward(const torch::Tensor& logits, const torch::Tensor& targets,
                            const torch::Tensor& offsets, const torch::Tensor& row_lse,
                            const torch::Tensor& grad_logp, const torch::Tensor& num_tokens,
                            const std::vector<double>& options) {
  const char* fn = kKtoLossBackward;
  const StepOperands s = step_operands(fn, logits, targets, offsets);
  const auto acc = B == Backend::cuda ? torch::kFloat : acc_of(s.logits);
  const BackwardVectors b = backward_vectors(fn, s, row_lse, grad_logp, num_tokens, acc);
  const kto::Options o = options_of(fn, options);
  if constexpr (B == Backend::cpu) {
    return step_backward_cpu(s, b, o);
  } else {
    require_cuda(fn, "logits", logits);
#ifdef KTO_TORCH_WITH_CUDA
    return cuda_path::step_backward(s, b, o);
#else
    return {};
#endif
  }
}

void check_chunk_bytes(const char* fn, int64_t chunk_bytes) {
  require(chunk_bytes > 0, fn, "chunk_bytes", "be > 0", text(chunk_bytes));
}

template <Backend B>
std::vector<torch::Tensor> fused_linear_forward(
    const torch::Tensor& hidden, const torch::Tensor& weight, const OptionalTensor& bias,
    const torch::Tensor& targets, const torch::Tensor& offsets, const torch::Tensor& reference_logp,
    const torch::Tensor& desirable, const OptionalTensor& kl_hidden,
    const OptionalTensor& kl_targets, const OptionalTensor& kl_offsets,
    const OptionalTensor& kl_reference_logp, const std::vector<double>& options,
    int64_t chunk_bytes, int64_t strategy, bool weight_grad, bool bias_grad) {
  const char* fn = kFusedLoss;
  const auto h = hidden.scalar_type();
  const FusedOperands f = fused_operands(
      fn, hidden, weight, or_empty(bias, hidden, h), targets, offsets, reference_logp, desirable,
      or_empty(kl_hidden, hidden, h), or_empty(kl_targets, hidden, torch::kLong),
      or_empty(kl_offsets, hidden, torch::kLong),
      or_empty(kl_reference_logp, hidden, torch::kFloat));
  const kto::Options o = options_of(fn, options);
  check_chunk_bytes(fn, chunk_bytes);
  if constexpr (B == Backend::cpu) {
    require(strategy == 0 || strategy == 1, fn, "strategy",
            "be keep_chunk (0) or recompute (1) on the CPU (vocab_blocks (2) is CUDA only)",
            text(strategy));
    return fused_linear_forward_cpu(f, o, chunk_bytes, strategy, weight_grad, bias_grad);
  } else {
    require_cuda(fn, "hidden", hidden);
    require(strategy >= 0 && strategy <= 2, fn, "strategy",
            "be keep_chunk (0), recompute (1) or vocab_blocks (2)", text(strategy));
#ifdef KTO_TORCH_WITH_CUDA
    auto out = cuda_path::fused_linear_forward(f, o, chunk_bytes, strategy);
    // The CUDA step computes dW and db whatever is asked (no frozen-head path there yet):
    // the op's outputs are the same as on the CPU, empty when not asked for.
    if (!weight_grad) out[4] = out[4].new_empty({0, f.head.D});
    if (!bias_grad) out[5] = out[5].new_empty({0});
    return out;
#else
    return {};
#endif
  }
}

template <Backend B>
std::vector<torch::Tensor> fused_linear_logprobs(
    const torch::Tensor& hidden, const torch::Tensor& weight, const OptionalTensor& bias,
    const torch::Tensor& targets, const torch::Tensor& offsets, const std::vector<double>& options,
    int64_t chunk_bytes) {
  const char* fn = kFusedLogprobs;
  const FusedLogprobOperands f = fused_logprob_operands(
      fn, hidden, weight, or_empty(bias, hidden, hidden.scalar_type()), targets, offsets);
  const kto::Options o = options_of(fn, options);
  check_chunk_bytes(fn, chunk_bytes);
  if constexpr (B == Backend::cpu) {
    return fused_linear_logprobs_cpu(f, o, chunk_bytes);
  } else {
    require_cuda(fn, "hidden", hidden);
#ifdef KTO_TORCH_WITH_CUDA
    return cuda_path::fused_linear_logprobs(f, o, chunk_bytes);
#else
    return {};
#endif
  }
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kto kernels (CPU, and CUDA where built) for the torch.library ops in kto_torch";
  pybind11::register_exception_translator(&translate_kto_errors);
  m.def("sequence_logprobs_cpu", &sequence_logprobs<Backend::cpu>);
  m.def("sequence_logprobs_cuda", &sequence_logprobs<Backend::cuda>);
  m.def("kl_partial", &kl_partial);
  m.def("reference_point", &reference_point);
  m.def("step_forward_cpu", &step_forward<Backend::cpu>);
  m.def("step_forward_cuda", &step_forward<Backend::cuda>);
  m.def("step_backward_cpu", &step_backward<Backend::cpu>);
  m.def("step_backward_cuda", &step_backward<Backend::cuda>);
  m.def("fused_linear_forward_cpu", &fused_linear_forward<Backend::cpu>);
  m.def("fused_linear_forward_cuda", &fused_linear_forward<Backend::cuda>);
  m.def("fused_linear_logprobs_cpu", &fused_linear_logprobs<Backend::cpu>);
  m.def("fused_linear_logprobs_cuda", &fused_linear_logprobs<Backend::cuda>);
  m.def("has_cuda", &has_cuda);
  m.def("metric_names", &metric_names);
  m.def("option_names", &option_names);
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
