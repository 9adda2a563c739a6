// fuzz_fused_step.cpp — kto::cpu::fused_linear_kto_step on small fuzzed problems.
//
// N ≤ 32 hidden rows of D ≤ 16, an lm_head of V ≤ 48 rows (optionally a
// vocabulary slice with a fuzzed all-gather), optional bias and KL batch,
// strides, every Options field, FusedStrategy codes including invalid ones,
// chunk_bytes from 0 to SIZE_MAX, NaN/inf/huge values anywhere (including
// hidden rows that are never scored), and outputs placed over inputs or over
// each other. Invariant: kto::Error is thrown, or the call returns with
//   * a finite loss and z0;
//   * if every scored input (hidden/KL rows that are scored, all of W and b)
//     is finite: d_hidden, d_weight, d_bias entirely finite;
//   * d_hidden rows that are not scored exactly 0, nothing outside the
//     output views written;
//   * an invalid strategy or a malformed all-gather rejected;
//   * with outputs aliasing inputs or each other: the same bits as without
//     aliasing (or kto::Error); with another thread count: the same bits.
#include <kto/cpu/fused_linear.hpp>

#include <string>

#include "fuzz_common.hpp"

namespace {

using namespace fuzz;

// ---- The one place that builds the head and the gradients -----------------
// LinearHead::bias and LinearGradients::d_bias are a pointer in older
// versions of the library and a Span in newer ones; both are handled here.
template <class H, class P>
auto set_bias(H& h, P* p, index_t n, int) -> decltype(h.bias = kto::Span<P>(p, n), void()) {
  h.bias = kto::Span<P>(p, n);
}
template <class H, class P>
void set_bias(H& h, P* p, index_t, long) {
  h.bias = p;
}
template <class G, class P>
auto set_d_bias(G& g, P* p, index_t n, int) -> decltype(g.d_bias = kto::Span<P>(p, n), void()) {
  g.d_bias = kto::Span<P>(p, n);
}
template <class G, class P>
void set_d_bias(G& g, P* p, index_t, long) {
  g.d_bias = p;
}
/// Whether bias sizes can be passed (Span) or must be exactly V (pointer).
constexpr bool kBiasIsSpan = !std::is_pointer<decltype(kto::LinearHead<float>::bias)>::value;

template <class T>
kto::LinearHead<T> make_head(kto::MatrixView<const T> weight, const T* bias, index_t bias_size,
                             index_t vocab_begin, index_t vocab_total) {
  kto::LinearHead<T> h;
  h.weight = weight;
  set_bias(h, bias, bias_size, 0);
  h.vocab_begin = vocab_begin;
  h.vocab_total = vocab_total;
  return h;
}

template <class Acc>
kto::cpu::LinearGradients<Acc> make_grads(kto::MatrixView<Acc> d_hidden,
                                          kto::MatrixView<Acc> d_weight, Acc* d_bias,
                                          index_t d_bias_size) {
  kto::cpu::LinearGradients<Acc> g;
  g.d_hidden = d_hidden;
  g.d_weight = d_weight;
  set_d_bias(g, d_bias, d_bias_size, 0);
  return g;
}
// ---------------------------------------------------------------------------

/// The seven buffers, each placed in an arena at an offset.
enum Buf { kHidden, kKlHidden, kWeight, kBias, kDHidden, kDWeight, kDBias, kBufs };
const char* const kBufNames[kBufs] = {"hidden",   "kl_hidden", "weight", "bias",
                                      "d_hidden", "d_weight",  "d_bias"};

struct Matrix {
  index_t rows = 0, cols = 0, stride = 0;
  index_t extent() const { return rows > 0 ? (rows - 1) * stride + cols : 0; }
};

template <class T>
struct Case {
  using Acc = kto::accumulator_t<T>;
  kto::Options o;
  kto::cpu::ExecutionPolicy exec;
  kto::cpu::FusedLinearConfig cfg;
  int strategy_code = 0;
  index_t N = 0, D = 1, V = 1, B = 1, kl_N = 0, kl_B = 0;
  Matrix hidden, kl_hidden, weight, d_hidden, d_weight;
  index_t bias_size = 0, d_bias_size = 0;                  // 0: no bias / no d_bias
  std::vector<T> hidden_v, kl_hidden_v, weight_v, bias_v;  // values, at their extents
  std::vector<index_t> targets, offsets, kl_targets, kl_offsets;
  std::vector<Acc> ref, kl_ref;
  index_t ref_size = 0, kl_ref_size = 0, desirable_size = 0;
  std::vector<std::uint8_t> desirable;
  index_t vocab_begin = 0, vocab_total = 0;
  int gather = 0;  ///< 0 two equal ranks, 1 one rank only, 2 one extra partial, 3 nothing,
                   ///< 4 two ranks of NaN lse
  int alias = 0;   ///< 0 none, else which output lands on which buffer (see place())
  index_t alias_offset = 0;
  bool determinism = false;

  index_t extent(Buf b) const {
    switch (b) {
      case kHidden:
        return hidden.extent();
      case kKlHidden:
        return kl_hidden.extent();
      case kWeight:
        return weight.extent();
      case kBias:
        return bias_size;
      case kDHidden:
        return d_hidden.extent();
      case kDWeight:
        return d_weight.extent();
      default:
        return d_bias_size;
    }
  }
};

/// chunk_bytes: tiny, around one row, default, huge.
size_t read_chunk_bytes(Reader& in, size_t per_row) {
  const std::uint8_t k = in.u8();
  switch (k % 12) {
    case 0:
      return 0;
    case 1:
      return 1 + in.u8() % 8;
    case 2:
      return per_row > 0 ? per_row - 1 : 0;
    case 3:
      return per_row;
    case 4:
      return per_row + 1;
    case 5:
    case 6:
      return per_row * static_cast<size_t>(in.range(2, 40));
    case 7:
      return size_t{256} << 20;
    case 8:
      return std::numeric_limits<size_t>::max();
    case 9:
      return std::numeric_limits<size_t>::max() / 2 + in.u8();
    case 10:
      return static_cast<size_t>(in.u64());
    default:
      return size_t{1} << 20;
  }
}

template <class T>
Case<T> read_case(Reader& in) {
  using Acc = kto::accumulator_t<T>;
  Case<T> c;
  c.o = read_options(in);
  c.exec = read_exec(in);
  c.N = in.range(0, 32);
  c.D = in.range(1, 16);
  c.V = in.range(1, 48);
  c.B = in.usually(248) ? in.range(1, 6) : 0;
  c.kl_N = in.range(0, 16);
  c.kl_B = in.range(0, 4);
  auto stride = [&](index_t cols) {
    const std::uint8_t k = in.u8();
    if (k < 192) return cols;
    if (k < 240) return cols + in.range(1, 3);
    return in.range(0, cols);  // overlapping rows (or 0 = broadcast, literally)
  };
  c.hidden = {c.N, c.D, stride(c.D)};
  c.kl_hidden = {c.kl_N, c.D, stride(c.D)};
  c.weight = {c.V, c.D, stride(c.D)};
  c.d_hidden = {c.N, c.D, stride(c.D)};
  c.d_weight = {c.V, c.D, stride(c.D)};
  const bool with_bias = in.flag();
  c.bias_size = with_bias ? c.V : 0;
  c.d_bias_size = in.usually(224) ? c.bias_size : c.V - c.bias_size;
  if (kBiasIsSpan && in.rarely(16)) c.bias_size = in.range(0, c.V + 2);
  if (kBiasIsSpan && in.rarely(16)) c.d_bias_size = in.range(0, c.V + 2);

  // Values: hidden ~ 1, W ~ 2/√D (logits ~ N(0, 4)), b ~ 0.5; a few specials.
  auto fill = [&](std::vector<T>& v, index_t n, double scale) {
    v.resize(static_cast<size_t>(n));
    std::vector<double> d(v.size());
    fill_values(in, d.data(), n, scale);
    for (size_t i = 0; i < d.size(); ++i) v[i] = static_cast<T>(d[i]);
  };
  fill(c.hidden_v, c.hidden.extent(), 1.0);
  fill(c.kl_hidden_v, c.kl_hidden.extent(), 1.0);
  fill(c.weight_v, c.weight.extent(), 2.0 / std::sqrt(static_cast<double>(c.D)));
  fill(c.bias_v, c.bias_size, 0.5);

  // Vocabulary slice: usually the whole head.
  const std::uint8_t vs = in.u8();
  if (vs >= 208 && vs < 240) {
    c.vocab_total = c.V + in.range(0, 20);
    c.vocab_begin = in.range(0, c.vocab_total - c.V);
  } else if (vs >= 240) {
    c.vocab_total = in.usually(128) ? in.extreme() : c.V + in.range(-2, 20);
    c.vocab_begin = in.usually(128) ? in.extreme() : in.range(-2, 20);
  }
  c.gather = in.usually(224) ? 0 : in.range(1, 4);
  const index_t total = c.vocab_total > c.V ? std::min<index_t>(c.vocab_total, 1000) : c.V;

  c.targets.resize(static_cast<size_t>(c.N));
  fill_targets(in, c.targets.data(), c.N, total, c.o.ignore_index);
  c.offsets = read_offsets(in, c.B, c.N);
  c.kl_targets.resize(static_cast<size_t>(c.kl_N));
  fill_targets(in, c.kl_targets.data(), c.kl_N, total, c.o.ignore_index);
  c.kl_offsets = read_offsets(in, c.kl_B, c.kl_N);
  // An unscored hidden row full of NaN (a padding row in a real batch).
  if (in.rarely(64) && c.N > 0) {
    const index_t r = in.range(0, c.N - 1);
    for (index_t k = 0; k < c.D; ++k)
      c.hidden_v[static_cast<size_t>(r * c.hidden.stride + k)] =
          std::numeric_limits<T>::quiet_NaN();
    if (in.flag()) c.targets[static_cast<size_t>(r)] = c.o.ignore_index;
  }

  auto size = [&](index_t expected) {
    const std::uint8_t k = in.u8();
    if (k < 232) return expected;
    return std::max<index_t>(0, expected + in.range(-2, 2));
  };
  c.ref_size = size(c.B);
  c.ref.resize(static_cast<size_t>(c.ref_size));
  fill_values(in, c.ref.data(), c.ref_size, 4.0);
  for (auto& x : c.ref) x = x - Acc(8);
  c.desirable_size = size(c.B);
  c.desirable.resize(static_cast<size_t>(c.desirable_size));
  fill_labels(in, c.desirable);
  c.kl_ref_size = size(c.kl_B);
  c.kl_ref.resize(static_cast<size_t>(c.kl_ref_size));
  fill_values(in, c.kl_ref.data(), c.kl_ref_size, 4.0);
  for (auto& x : c.kl_ref) x = x - Acc(8);

  const size_t per_row = sizeof(Acc) * static_cast<size_t>(c.V + c.D);
  c.cfg.chunk_bytes = read_chunk_bytes(in, per_row);
  c.strategy_code = in.code(2);
  c.cfg.strategy = static_cast<kto::FusedStrategy>(c.strategy_code);
  c.alias = in.usually(192) ? 0 : in.range(1, 9);
  c.alias_offset = in.usually(160) ? 0 : in.range(1, 40);
  c.determinism = in.rarely(96);
  return c;
}

/// Where each buffer lives: arena and offset. alias = 0: each its own arena.
struct Placement {
  int arena[kBufs];
  index_t offset[kBufs];
};

Placement place(int alias, index_t k) {
  Placement p;
  for (int b = 0; b < kBufs; ++b) p.arena[b] = b, p.offset[b] = 0;
  // (output, buffer it is placed over)
  const int pairs[][2] = {{kDHidden, kHidden},   {kDWeight, kWeight}, {kDBias, kBias},
                          {kDHidden, kKlHidden}, {kDWeight, kHidden}, {kDBias, kWeight},
                          {kDHidden, kDWeight},  {kDBias, kDWeight},  {kDHidden, kWeight}};
  if (alias >= 1 && alias <= 9) {
    const int out = pairs[alias - 1][0], over = pairs[alias - 1][1];
    p.arena[out] = p.arena[over];
    p.offset[out] = k;
  }
  return p;
}

template <class T>
struct Outcome {
  using Acc = kto::accumulator_t<T>;
  bool threw = false;
  std::string error;
  kto::cpu::StepResult<Acc> result;
  std::vector<Acc> d_hidden, d_weight, d_bias;  ///< copied out of the output regions
  std::vector<std::vector<T>> arenas;
  bool malformed_gather = false;  ///< the all-gather hook returned a detectably wrong count
};

template <class T>
Outcome<T> run(const Case<T>& c, const Placement& pl, const kto::cpu::ExecutionPolicy& exec) {
  static_assert(std::is_same<T, kto::accumulator_t<T>>::value, "aliasing needs T == Acc");
  using Acc = T;
  Outcome<T> out;
  // Arena sizes: the largest end of anything placed there.
  std::vector<index_t> size(kBufs, 0);
  for (int b = 0; b < kBufs; ++b)
    size[pl.arena[b]] = std::max(size[pl.arena[b]], pl.offset[b] + c.extent(static_cast<Buf>(b)));
  out.arenas.resize(kBufs);
  for (int a = 0; a < kBufs; ++a) out.arenas[a].assign(static_cast<size_t>(size[a]), T(0));
  auto at = [&](int b) -> T* {
    auto& ar = out.arenas[pl.arena[b]];
    return ar.empty() ? nullptr : ar.data() + pl.offset[b];
  };
  // Outputs poisoned first, inputs written over them.
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int b : {kDHidden, kDWeight, kDBias})
    std::fill(at(b), at(b) + c.extent(static_cast<Buf>(b)), nan);
  std::copy(c.hidden_v.begin(), c.hidden_v.end(), at(kHidden));
  std::copy(c.kl_hidden_v.begin(), c.kl_hidden_v.end(), at(kKlHidden));
  std::copy(c.weight_v.begin(), c.weight_v.end(), at(kWeight));
  std::copy(c.bias_v.begin(), c.bias_v.end(), at(kBias));

  auto cview = [&](const Matrix& m, int b) {
    return kto::MatrixView<const T>{at(b), m.rows, m.cols, m.stride};
  };
  auto mview = [&](const Matrix& m, int b) {
    return kto::MatrixView<Acc>{at(b), m.rows, m.cols, m.stride};
  };
  kto::cpu::FusedLinearInputs<T> in;
  in.hidden = cview(c.hidden, kHidden);
  in.targets = kto::targets_vector(c.targets.data(), c.N);
  in.sequences = kto::sequences(c.offsets.data(), c.B);
  in.reference_logp = kto::reference_logp(c.ref.data(), c.ref_size);
  in.desirable = kto::make_span(c.desirable.data(), c.desirable_size);
  in.kl.hidden = cview(c.kl_hidden, kKlHidden);
  in.kl.targets = kto::targets_vector(c.kl_targets.data(), c.kl_N);
  in.kl.sequences = kto::sequences(c.kl_offsets.data(), c.kl_B);
  in.kl.reference_logp = kto::reference_logp(c.kl_ref.data(), c.kl_ref_size);
  const auto head = make_head<T>(cview(c.weight, kWeight), c.bias_size ? at(kBias) : nullptr,
                                 c.bias_size, c.vocab_begin, c.vocab_total);
  const auto grads = make_grads<Acc>(mview(c.d_hidden, kDHidden), mview(c.d_weight, kDWeight),
                                     c.d_bias_size ? at(kDBias) : nullptr, c.d_bias_size);
  kto::cpu::FusedLinearHooks<Acc> hooks;
  const int gather = c.gather;
  bool* malformed = &out.malformed_gather;
  hooks.gather_partials = [gather, malformed](const std::vector<kto::RowPartial<Acc>>& local,
                                              std::vector<kto::RowPartial<Acc>>& all) {
    // Detectably wrong: nothing for something, one rank's partials alone (a slice needs
    // two at least), or a count no rank count explains (one extra after a single partial
    // looks like two ranks).
    *malformed = (gather == 3 && !local.empty()) || (gather == 1 && !local.empty()) ||
                 (gather == 2 && local.size() != 1);
    all = local;
    if (gather == 0 || gather == 4) all.insert(all.end(), local.begin(), local.end());
    if (gather == 2) all.push_back({Acc(0), Acc(0)});
    if (gather == 3) all.clear();
    if (gather == 4)
      for (auto& p : all) p.lse = std::numeric_limits<Acc>::quiet_NaN();
  };
  try {
    out.result = kto::cpu::fused_linear_kto_step<T>(in, head, c.o, grads, c.cfg, exec, hooks);
    note("returned");
  } catch (const kto::Error& e) {
    out.threw = true;
    out.error = e.what();
    note("kto::Error " + e.argument());
    return out;
  }
  auto copy_rows = [&](const Matrix& m, int b, std::vector<Acc>& dst) {
    for (index_t r = 0; r < m.rows; ++r)
      for (index_t k = 0; k < m.cols; ++k) dst.push_back(at(b)[r * m.stride + k]);
  };
  copy_rows(c.d_hidden, kDHidden, out.d_hidden);
  copy_rows(c.d_weight, kDWeight, out.d_weight);
  for (index_t v = 0; v < c.d_bias_size; ++v) out.d_bias.push_back(at(kDBias)[v]);
  return out;
}

template <class T>
bool scored(const Case<T>& c, const std::vector<index_t>& targets,
            const std::vector<index_t>& offsets, index_t count, index_t r) {
  if (count < 1) return false;
  return r >= offsets.front() && r < offsets[static_cast<size_t>(count)] &&
         targets[static_cast<size_t>(r)] != c.o.ignore_index;
}

template <class T>
bool scored_inputs_finite(const Case<T>& c) {
  for (index_t r = 0; r < c.N; ++r)
    if (scored(c, c.targets, c.offsets, c.B, r) &&
        !all_finite(c.hidden_v.data() + r * c.hidden.stride, c.D))
      return false;
  if (kto::uses_kl_batch(c.o))
    for (index_t r = 0; r < c.kl_N; ++r)
      if (scored(c, c.kl_targets, c.kl_offsets, c.kl_B, r) &&
          !all_finite(c.kl_hidden_v.data() + r * c.kl_hidden.stride, c.D))
        return false;
  for (index_t v = 0; v < c.V; ++v)
    if (!all_finite(c.weight_v.data() + v * c.weight.stride, c.D)) return false;
  return all_finite(c.bias_v.data(), static_cast<index_t>(c.bias_v.size()));
}

template <class T>
void check(const Case<T>& c, const Outcome<T>& r) {
  if (r.threw) return;
  FUZZ_CHECK(c.strategy_code == 0 || c.strategy_code == 1,
             "fused_linear_kto_step accepted FusedStrategy code %d", c.strategy_code);
  FUZZ_CHECK(!r.malformed_gather,
             "fused_linear_kto_step accepted a malformed all-gather (mode %d: %s)", c.gather,
             c.gather == 1   ? "one rank's partials alone"
             : c.gather == 2 ? "one partial too many"
                             : "no partials");
  const auto& m = r.result.metrics;
  FUZZ_CHECK(std::isfinite(m.loss) && std::isfinite(m.kl),
             "fused_linear_kto_step returned loss %g, kl (z0) %g; options %s", m.loss, m.kl,
             describe(c.o).c_str());
  if (scored_inputs_finite(c)) {
    const index_t h = first_non_finite(r.d_hidden.data(), static_cast<index_t>(r.d_hidden.size()));
    FUZZ_CHECK(h < 0, "finite scored inputs gave d_hidden[%lld, %lld] = %g", (long long)(h / c.D),
               (long long)(h % c.D), h < 0 ? 0.0 : (double)r.d_hidden[static_cast<size_t>(h)]);
    const index_t w = first_non_finite(r.d_weight.data(), static_cast<index_t>(r.d_weight.size()));
    FUZZ_CHECK(w < 0, "finite scored inputs gave d_weight[%lld, %lld] = %g", (long long)(w / c.D),
               (long long)(w % c.D), w < 0 ? 0.0 : (double)r.d_weight[static_cast<size_t>(w)]);
    const index_t b = first_non_finite(r.d_bias.data(), static_cast<index_t>(r.d_bias.size()));
    FUZZ_CHECK(b < 0, "finite scored inputs gave d_bias[%lld] = %g", (long long)b,
               b < 0 ? 0.0 : (double)r.d_bias[static_cast<size_t>(b)]);
  }
  for (index_t row = 0; row < c.N; ++row) {
    if (scored(c, c.targets, c.offsets, c.B, row)) continue;
    for (index_t k = 0; k < c.D; ++k)
      FUZZ_CHECK(r.d_hidden[static_cast<size_t>(row * c.D + k)] == 0,
                 "d_hidden[%lld, %lld] = %g on a row that is not scored", (long long)row,
                 (long long)k, (double)r.d_hidden[static_cast<size_t>(row * c.D + k)]);
  }
}

template <class T>
void compare(const Outcome<T>& a, const Outcome<T>& b, const char* what, bool b_may_throw) {
  FUZZ_CHECK(!a.threw || b.threw, "fused_linear_kto_step returned with %s but threw without: %s",
             what, a.error.c_str());
  FUZZ_CHECK(b_may_throw || a.threw || !b.threw,
             "fused_linear_kto_step threw with %s but returned without: %s", what, b.error.c_str());
  if (a.threw || b.threw) return;
  FUZZ_CHECK(same_bits(a.result.metrics.loss, b.result.metrics.loss),
             "fused_linear_kto_step: loss %.17g, with %s %.17g", a.result.metrics.loss, what,
             b.result.metrics.loss);
  auto same = [&](const std::vector<T>& x, const std::vector<T>& y, const char* name) {
    FUZZ_CHECK(x.size() == y.size(), "%s sizes differ", name);
    for (size_t i = 0; i < x.size(); ++i)
      FUZZ_CHECK(same_bits(x[i], y[i]), "fused_linear_kto_step: %s[%zu] = %.9g, with %s %.9g", name,
                 i, (double)x[i], what, (double)y[i]);
  };
  same(a.d_hidden, b.d_hidden, "d_hidden");
  same(a.d_weight, b.d_weight, "d_weight");
  same(a.d_bias, b.d_bias, "d_bias");
}

template <class T>
void fuzz_fused(Reader& in) {
  const Case<T> c = read_case<T>(in);
  context() =
      format(
          "fused<%s>: N %lld, D %lld, V %lld, B %lld, KL rows %lld, KL B %lld; strides "
          "hidden %lld, kl_hidden %lld, weight %lld, d_hidden %lld, d_weight %lld; bias %lld, "
          "d_bias %lld; vocab_begin %lld, vocab_total %lld, gather %d; chunk_bytes %zu, "
          "strategy %d; threads %d, min_rows_per_thread %lld; alias %d at %lld; ",
          sizeof(T) == 4 ? "float" : "double", (long long)c.N, (long long)c.D, (long long)c.V,
          (long long)c.B, (long long)c.kl_N, (long long)c.kl_B, (long long)c.hidden.stride,
          (long long)c.kl_hidden.stride, (long long)c.weight.stride, (long long)c.d_hidden.stride,
          (long long)c.d_weight.stride, (long long)c.bias_size, (long long)c.d_bias_size,
          (long long)c.vocab_begin, (long long)c.vocab_total, c.gather, c.cfg.chunk_bytes,
          c.strategy_code, c.exec.num_threads, (long long)c.exec.min_rows_per_thread, c.alias,
          (long long)c.alias_offset) +
      "hidden " + summary(c.hidden_v.data(), c.hidden_v.size()) + ", kl_hidden " +
      summary(c.kl_hidden_v.data(), c.kl_hidden_v.size()) + ", weight " +
      summary(c.weight_v.data(), c.weight_v.size()) + ", bias " +
      summary(c.bias_v.data(), c.bias_v.size()) + ", targets " + list(c.targets, 32) +
      ", offsets " + list(c.offsets) + ", kl targets " + list(c.kl_targets, 16) + ", kl offsets " +
      list(c.kl_offsets) + ", reference_logp " + list(c.ref) + ", desirable " + list(c.desirable) +
      ", kl reference " + list(c.kl_ref) + "; options " + describe(c.o);
  announce();
  const Outcome<T> a = run(c, place(0, 0), c.exec);
  check(c, a);
  if (c.alias != 0) {
    const Placement pl = place(c.alias, c.alias_offset);
    const Outcome<T> b = run(c, pl, c.exec);
    int out = 0, over = 0;
    for (int k = 0; k < kBufs; ++k)
      if (pl.arena[k] != k) out = k, over = pl.arena[k];
    std::string what = std::string(kBufNames[out]) + " placed at element " +
                       std::to_string(c.alias_offset) + " of " + kBufNames[over];
    compare(a, b, what.c_str(), true);
  } else if (c.determinism) {
    kto::cpu::ExecutionPolicy other;
    other.num_threads = c.exec.num_threads == 1 ? 3 : 1;
    other.min_rows_per_thread = 1;
    const Outcome<T> b = run(c, place(0, 0), other);
    const std::string what = std::to_string(other.num_threads) + " threads instead of " +
                             std::to_string(c.exec.num_threads);
    compare(a, b, what.c_str(), false);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, size_t size) {
  Reader in(data, size);
  if (in.u8() < 192) {
    fuzz_fused<float>(in);
  } else {
    fuzz_fused<double>(in);
  }
  return 0;
}
