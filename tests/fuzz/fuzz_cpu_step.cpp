// fuzz_cpu_step.cpp — kto::cpu::kto_step on small fuzzed problems.
//
// Valid memory layouts (padded, packed with a row stride, the shifted
// logits[:, :-1] / labels[:, 1:] views; rows ≤ 64, V ≤ 64) with fuzzed
// contents: every Options field (invalid enum codes, NaN/negative/huge β and
// weights, odd ignore_index), target ids out of range, offsets non-monotone or
// past the end, labels 0..255, KL spans of the wrong size, negative token
// counts, NaN/inf/denormal/huge logits, in-place gradients and thread counts.
// Invariant: kto::Error is thrown, or the call returns with
//   * a finite loss and z0, finite g_s,
//   * every gradient element of the view finite (the buffer is poisoned with
//     NaN first, so an element never written shows up too), and no element
//     outside the view's rows changed,
//   * the same bits with another thread count (half of the inputs).
// float, double, half and bfloat16 logits.
#include <kto/cpu/kto_step.hpp>

#include "../cpp/type_name.hpp"
#include "fuzz_common.hpp"

namespace {

using namespace fuzz;

using test::type_name;

template <class T>
T to(double x) {
  return static_cast<T>(x);
}
template <>
Eigen::half to<Eigen::half>(double x) {
  return Eigen::half(static_cast<float>(x));
}
template <>
Eigen::bfloat16 to<Eigen::bfloat16>(double x) {
  return Eigen::bfloat16(static_cast<float>(x));
}
template <class T>
double up(T x) {
  return static_cast<double>(static_cast<float>(x));
}
template <>
double up<double>(double x) {
  return x;
}

/// The problem in storage, with its views.
template <class T>
struct Problem {
  using Acc = kto::accumulator_t<T>;
  index_t V = 1, B = 1, rows = 0;
  int layout = 0;  ///< 0 padded, 1 packed with a row stride, 2 shifted [B, S, V] view
  index_t seq = 1, row_stride = 1;
  std::vector<T> logits;
  std::vector<index_t> labels;  ///< target storage
  std::vector<index_t> offsets;
  std::vector<Acc> ref, kl_policy, kl_ref;
  std::vector<std::uint8_t> desirable;
  std::vector<index_t> kl_tokens;
  index_t ref_size = 0, desirable_size = 0, kl_policy_size = 0, kl_ref_size = 0, kl_tokens_size = 0;

  template <class U>
  kto::LogitsView<U> view(U* data) const {
    if (layout == 2) return kto::logits_batched<U>(data, B, seq - 1, V, seq * V, V);
    return kto::LogitsView<U>{data, V, kto::RowIndex{rows, rows > 0 ? rows : 1, 0, row_stride}};
  }
  kto::TargetsView targets() const {
    if (layout == 2) return kto::targets_batched(labels.data() + 1, B, seq - 1, seq, 1);
    return kto::targets_vector(labels.data(), rows);
  }
};

template <class T>
Problem<T> read_problem(Reader& in, const kto::Options& o) {
  using Acc = kto::accumulator_t<T>;
  Problem<T> p;
  p.V = in.range(1, 64);
  p.layout = in.u8() % 3;
  p.B = in.usually(248) ? in.range(1, 8) : 0;
  if (p.layout == 0) {
    p.seq = in.range(1, 8);
    p.rows = p.B * p.seq;
    p.row_stride = p.V;
  } else if (p.layout == 1) {
    p.rows = in.range(0, 64);
    p.row_stride = p.V + (in.usually(128) ? 0 : in.range(1, 3));
  } else {
    p.seq = in.range(2, 9);  // stored length; the view drops the last position
    p.rows = p.B * (p.seq - 1);
  }
  const index_t stored_rows = p.layout == 2 ? p.B * p.seq : p.rows;
  const index_t stride = p.layout == 2 ? p.V : p.row_stride;
  p.logits.resize(static_cast<size_t>(stored_rows * stride));
  std::vector<double> values(p.logits.size());
  const std::uint8_t sc = in.u8();
  const double scale = sc < 160 ? 4.0 : (sc < 224 ? 30.0 : (sc < 248 ? 1e3 : 1e30));
  fill_values(in, values.data(), static_cast<index_t>(values.size()), scale);
  for (size_t i = 0; i < values.size(); ++i) p.logits[i] = to<T>(values[i]);
  // (Never empty: the shifted view starts one element in.)
  p.labels.resize(static_cast<size_t>(std::max<index_t>(1, p.layout == 2 ? stored_rows : p.rows)));
  fill_targets(in, p.labels.data(), static_cast<index_t>(p.labels.size()), p.V, o.ignore_index);
  if (p.layout == 0 && in.usually(200)) {
    p.offsets = kto::padded_offsets(p.B, p.seq);
    if (in.rarely(16)) p.offsets[in.u8() % p.offsets.size()] = in.extreme();
  } else {
    p.offsets = read_offsets(in, p.B, p.rows);
  }
  // Spans: usually B (or the KL batch size), sometimes off.
  auto size = [&](index_t expected) {
    const std::uint8_t k = in.u8();
    if (k < 224) return expected;
    if (k < 248) return std::max<index_t>(0, expected + in.range(-2, 2));
    return in.range(0, 9);
  };
  p.ref_size = size(p.B);
  p.ref.resize(static_cast<size_t>(p.ref_size));
  fill_values(in, p.ref.data(), p.ref_size, 8.0);
  for (auto& x : p.ref) x = x - Acc(8);
  p.desirable_size = size(p.B);
  p.desirable.resize(static_cast<size_t>(p.desirable_size));
  fill_labels(in, p.desirable);
  const index_t kl_n = in.range(0, 8);
  p.kl_policy_size = size(kl_n);
  p.kl_ref_size = size(kl_n);
  p.kl_policy.resize(static_cast<size_t>(p.kl_policy_size));
  p.kl_ref.resize(static_cast<size_t>(p.kl_ref_size));
  fill_values(in, p.kl_policy.data(), p.kl_policy_size, 8.0);
  fill_values(in, p.kl_ref.data(), p.kl_ref_size, 8.0);
  for (auto& x : p.kl_policy) x = x - Acc(10);
  for (auto& x : p.kl_ref) x = x - Acc(10);
  p.kl_tokens_size = in.flag() ? 0 : size(kl_n);
  p.kl_tokens.resize(static_cast<size_t>(p.kl_tokens_size));
  for (auto& t : p.kl_tokens) t = in.usually(232) ? in.range(0, 6) : in.extreme();
  return p;
}

template <class T>
struct Outcome {
  bool threw = false;
  std::string error;
  kto::cpu::StepResult<kto::accumulator_t<T>> result;
  std::vector<T> grad;  ///< the whole gradient buffer after the call
};

template <class T>
Outcome<T> run(const Problem<T>& p, const kto::Options& o, bool in_place,
               const kto::cpu::ExecutionPolicy& exec) {
  Outcome<T> out;
  std::vector<T> logits = p.logits;  // a fresh copy: in place overwrites it
  if (in_place) {
    out.grad = logits;
  } else {
    out.grad.assign(p.logits.size(), to<T>(std::numeric_limits<double>::quiet_NaN()));
  }
  const T* lp = in_place ? out.grad.data() : logits.data();
  kto::cpu::StepInputs<T> in;
  in.policy_logits = p.view(lp);
  in.targets = p.targets();
  in.sequences = kto::sequences(p.offsets.data(), p.B);
  in.reference_logp = kto::reference_logp(p.ref.data(), p.ref_size);
  in.desirable = kto::make_span(p.desirable.data(), p.desirable_size);
  in.kl.policy_logp = kto::policy_logp(p.kl_policy.data(), p.kl_policy_size);
  in.kl.reference_logp = kto::reference_logp(p.kl_ref.data(), p.kl_ref_size);
  in.kl.num_tokens = kto::make_span(p.kl_tokens.data(), p.kl_tokens_size);
  try {
    out.result = kto::cpu::kto_step<T>(in, o, p.view(out.grad.data()), exec);
    note("returned");
  } catch (const kto::Error& e) {
    out.threw = true;
    out.error = e.what();
    note("kto::Error " + e.argument());
  }
  return out;
}

template <class T>
void check(const Problem<T>& p, const kto::Options& o, bool in_place, const Outcome<T>& out) {
  const char* t = type_name<T>();
  if (out.threw) return;
  const auto& r = out.result;
  FUZZ_CHECK(std::isfinite(r.metrics.loss) && std::isfinite(r.metrics.kl),
             "kto_step<%s> returned loss %g, kl (z0) %g; options %s", t, r.metrics.loss,
             r.metrics.kl, describe(o).c_str());
  for (size_t s = 0; s < r.examples.grad_logp.size(); ++s)
    FUZZ_CHECK(std::isfinite(static_cast<double>(r.examples.grad_logp[s])),
               "kto_step<%s> returned grad_logp[%zu] = %g (logp %g, rho %g); options %s", t, s,
               static_cast<double>(r.examples.grad_logp[s]), static_cast<double>(r.logp[s]),
               static_cast<double>(r.examples.ratio[s]), describe(o).c_str());
  if (kto::uses_kl_batch(o) && o.kl_estimator == kto::KlEstimator::nonempty_mean)
    for (index_t j = 0; j < p.kl_tokens_size; ++j)
      FUZZ_CHECK(p.kl_tokens[static_cast<size_t>(j)] >= 0,
                 "kto_step<%s> accepted kl.num_tokens[%lld] = %lld (nonempty_mean)", t,
                 (long long)j, (long long)p.kl_tokens[static_cast<size_t>(j)]);
  // Every element of the view's rows finite; nothing else touched.
  std::vector<bool> in_view(out.grad.size(), false);
  const auto g = p.view(out.grad.data());
  for (index_t row = 0; row < p.rows; ++row) {
    const T* x = g.row(row);
    for (index_t v = 0; v < p.V; ++v) {
      FUZZ_CHECK(std::isfinite(up(x[v])),
                 "kto_step<%s> returned grad[row %lld][%lld] = %g (V %lld, layout %d, in place "
                 "%d); options %s",
                 t, (long long)row, (long long)v, up(x[v]), (long long)p.V, p.layout,
                 in_place ? 1 : 0, describe(o).c_str());
      in_view[static_cast<size_t>(x + v - out.grad.data())] = true;
    }
  }
  for (size_t i = 0; i < out.grad.size(); ++i) {
    if (in_view[i]) continue;
    const T expect = in_place ? p.logits[i] : to<T>(std::numeric_limits<double>::quiet_NaN());
    FUZZ_CHECK(same_bits(out.grad[i], expect),
               "kto_step<%s> wrote element %zu of the gradient buffer, outside the view", t, i);
  }
}

template <class T>
void fuzz_step(Reader& in) {
  const kto::Options o = read_options(in);
  const auto exec = read_exec(in);
  const bool in_place = in.rarely(64);
  const bool determinism = in.flag();
  const Problem<T> p = read_problem<T>(in, o);
  std::vector<double> logits;
  for (const T& x : p.logits) logits.push_back(up(x));
  context() =
      format(
          "kto_step<%s>: V %lld, B %lld, rows %lld, layout %d (0 padded, 1 strided, 2 shifted), "
          "seq %lld, row_stride %lld, in place %d, threads %d, min_rows_per_thread %lld; ",
          type_name<T>(), (long long)p.V, (long long)p.B, (long long)p.rows, p.layout,
          (long long)p.seq, (long long)p.row_stride, in_place ? 1 : 0, exec.num_threads,
          (long long)exec.min_rows_per_thread) +
      "logits " + summary(logits.data(), logits.size()) + ", offsets " + list(p.offsets) +
      ", targets " + list(p.labels) + ", reference_logp " + list(p.ref) + ", desirable " +
      list(p.desirable) + ", kl policy " + list(p.kl_policy) + ", kl reference " + list(p.kl_ref) +
      ", kl tokens " + list(p.kl_tokens) + "; options " + describe(o);
  announce();
  const Outcome<T> a = run(p, o, in_place, exec);
  check(p, o, in_place, a);
  if (!determinism) return;
  kto::cpu::ExecutionPolicy other;
  other.num_threads = exec.num_threads == 1 ? 3 : 1;
  other.min_rows_per_thread = 1;
  const Outcome<T> b = run(p, o, in_place, other);
  FUZZ_CHECK(a.threw == b.threw, "kto_step<%s> threw with %d threads but not with %d: %s",
             type_name<T>(), a.threw ? exec.num_threads : other.num_threads,
             a.threw ? other.num_threads : exec.num_threads, (a.threw ? a.error : b.error).c_str());
  if (a.threw) return;
  FUZZ_CHECK(same_bits(a.result.metrics.loss, b.result.metrics.loss),
             "kto_step<%s>: loss %.17g with %d threads, %.17g with %d", type_name<T>(),
             a.result.metrics.loss, exec.num_threads, b.result.metrics.loss, other.num_threads);
  for (size_t i = 0; i < a.grad.size(); ++i)
    FUZZ_CHECK(same_bits(a.grad[i], b.grad[i]),
               "kto_step<%s>: gradient element %zu differs between %d and %d threads",
               type_name<T>(), i, exec.num_threads, other.num_threads);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, size_t size) {
  Reader in(data, size);
  const std::uint8_t k = in.u8();
  if (k < 112) {
    fuzz_step<float>(in);
  } else if (k < 224) {
    fuzz_step<double>(in);
  } else if (k < 240) {
    fuzz_step<Eigen::bfloat16>(in);
  } else {
    fuzz_step<Eigen::half>(in);
  }
  return 0;
}
