// fuzz_validators.cpp — views with fuzzed shapes and strides, always backed by
// exactly the memory they claim.
//
// The harness builds LogitsView / TargetsView / SequencesView / Span arguments
// through the library's helpers (logits_matrix, logits_batched,
// targets_vector, targets_batched) or by filling the structs directly, reads
// their geometry literally (an explicit stride is taken as given: 0 means
// every row at the same place), and allocates exactly the extent that
// geometry spans. It then calls one of sequence_logprobs, kto_step, backward,
// finish or kl_partial. Invariant: the call throws kto::Error, or it returns
// and
//   * touched nothing outside the buffers (AddressSanitizer),
//   * no view it was given was impossible (extent past INT64_MAX or below the
//     base pointer, rows_per_batch < 1, a negative size), no gradient view had
//     overlapping rows or partly overlapped the logits,
//   * its loss, z0, log-probs and gradients are finite.
// Anything else aborts (a finding; libFuzzer keeps the input).
#include <kto/cpu/backward.hpp>
#include <kto/cpu/kto_step.hpp>
#include <kto/cpu/sequence_logprobs.hpp>
#include <kto/finish.hpp>

#include <string>

#include "fuzz_common.hpp"

namespace {

using namespace fuzz;
using fuzz::describe;

/// How the caller builds a logits view, and the geometry it means by it.
struct LogitsArgs {
  int builder = 0;  ///< 0 logits_matrix, 1 with stride, 2 logits_batched, 3 direct RowIndex
  index_t rows = 0, vocab = 1, stride = 0, batch = 0, seq_len = 0;
  index_t batch_stride = 0, row_stride = 0, rows_per_batch = 1;
  i128 lit_rows = 0, lit_rpb = 1, lit_bs = 0, lit_rs = 0;  ///< literal geometry
  Extent ext;
};

i128 clamp_width(i128 w) {
  return std::max<i128>(0, std::min<i128>(w, 4096));
}

LogitsArgs read_logits_args(Reader& in, index_t vocab) {
  LogitsArgs a;
  a.vocab = vocab;
  a.builder = in.u8() % 4;
  switch (a.builder) {
    case 0:
      a.rows = in.size(10);
      a.lit_rows = a.rows, a.lit_rpb = 1, a.lit_bs = a.vocab, a.lit_rs = a.vocab;
      break;
    case 1:
      a.rows = in.size(10);
      a.stride = in.stride(a.vocab);
      a.lit_rows = a.rows, a.lit_rpb = 1, a.lit_bs = a.stride, a.lit_rs = a.stride;
      break;
    case 2:
      a.batch = in.size(4);
      a.seq_len = in.size(6);
      a.row_stride = in.stride(a.vocab);
      a.batch_stride = in.stride(static_cast<index_t>(
          clamp_width(i128(a.seq_len > 0 ? a.seq_len - 1 : 0) * a.row_stride + a.vocab)));
      a.lit_rows = i128(a.batch) * a.seq_len;
      a.lit_rpb = a.seq_len, a.lit_bs = a.batch_stride, a.lit_rs = a.row_stride;
      break;
    default:
      a.rows = in.size(10);
      a.rows_per_batch = in.usually(224) ? in.range(1, 6) : in.extreme();
      a.row_stride = in.stride(a.vocab);
      a.batch_stride = in.stride(
          static_cast<index_t>(clamp_width((i128(a.rows_per_batch) - 1) * a.row_stride + a.vocab)));
      a.lit_rows = a.rows, a.lit_rpb = a.rows_per_batch;
      a.lit_bs = a.batch_stride, a.lit_rs = a.row_stride;
      break;
  }
  a.ext = extent_of(a.lit_rows, a.lit_rpb, a.lit_bs, a.lit_rs, a.vocab);
  return a;
}

template <class T>
kto::LogitsView<T> make_logits(const LogitsArgs& a, T* p) {
  switch (a.builder) {
    case 0:
      return kto::logits_matrix<T>(p, a.rows, a.vocab);
    case 1:
      return kto::logits_matrix<T>(p, a.rows, a.vocab, a.stride);
    case 2:
      return kto::logits_batched<T>(p, a.batch, a.seq_len, a.vocab, a.batch_stride, a.row_stride);
    default:
      return kto::LogitsView<T>{
          p, a.vocab, kto::RowIndex{a.rows, a.rows_per_batch, a.batch_stride, a.row_stride}};
  }
}

/// The literal RowIndex of a view (only meaningful when its extent is ok).
kto::RowIndex literal_index(const LogitsArgs& a) {
  return kto::RowIndex{static_cast<index_t>(a.lit_rows), static_cast<index_t>(a.lit_rpb),
                       static_cast<index_t>(a.lit_bs), static_cast<index_t>(a.lit_rs)};
}

struct TargetArgs {
  int builder = 0;  ///< 0 targets_vector, 1 with stride, 2 targets_batched, 3 direct
  index_t rows = 0, stride = 1, batch = 0, seq_len = 0, batch_stride = 0, rows_per_batch = 1;
  i128 lit_rows = 0, lit_rpb = 1, lit_bs = 0, lit_rs = 0;
  Extent ext;
};

TargetArgs read_target_args(Reader& in, const LogitsArgs& l) {
  TargetArgs a;
  const std::uint8_t mode = in.u8();
  if (mode < 176) {  // matching the logits, as a caller would
    if (l.builder == 2) {
      a.builder = 2;
      a.batch = l.batch;
      a.seq_len = l.seq_len;
      a.stride = in.usually(224) ? 1 : in.stride(1);
      a.batch_stride = in.stride(static_cast<index_t>(
          clamp_width(i128(a.seq_len > 0 ? a.seq_len - 1 : 0) * a.stride + 1)));
    } else {
      a.builder = in.usually(192) ? 0 : 1;
      a.rows = l.rows;
      if (a.builder == 1) a.stride = in.stride(1);
    }
  } else {
    a.builder = in.u8() % 4;
    a.rows = in.size(10);
    a.batch = in.size(4);
    a.seq_len = in.size(6);
    a.stride = in.stride(1);
    a.rows_per_batch = in.usually(224) ? in.range(1, 6) : in.extreme();
    a.batch_stride = in.stride(8);
  }
  switch (a.builder) {
    case 0:
      a.lit_rows = a.rows, a.lit_rpb = 1, a.lit_bs = 1, a.lit_rs = 1;
      break;
    case 1:
      a.lit_rows = a.rows, a.lit_rpb = 1, a.lit_bs = a.stride, a.lit_rs = a.stride;
      break;
    case 2:
      a.lit_rows = i128(a.batch) * a.seq_len, a.lit_rpb = a.seq_len;
      a.lit_bs = a.batch_stride, a.lit_rs = a.stride;
      break;
    default:
      a.lit_rows = a.rows, a.lit_rpb = a.rows_per_batch;
      a.lit_bs = a.batch_stride, a.lit_rs = a.stride;
      break;
  }
  a.ext = extent_of(a.lit_rows, a.lit_rpb, a.lit_bs, a.lit_rs, 1);
  return a;
}

kto::TargetsView make_targets(const TargetArgs& a, const index_t* p) {
  switch (a.builder) {
    case 0:
      return kto::targets_vector(p, a.rows);
    case 1:
      return kto::targets_vector(p, a.rows, a.stride);
    case 2:
      return kto::targets_batched(p, a.batch, a.seq_len, a.batch_stride, a.stride);
    default:
      return kto::TargetsView{p, kto::RowIndex{a.rows, a.rows_per_batch, a.batch_stride, a.stride}};
  }
}

const char* const kLogitsBuilders[] = {"logits_matrix(p, rows, V)",
                                       "logits_matrix(p, rows, V, stride)",
                                       "logits_batched(p, batch, seq_len, V, bs, rs)",
                                       "LogitsView{p, V, RowIndex{rows, rpb, bs, rs}}"};
const char* const kTargetBuilders[] = {"targets_vector(p, rows)", "targets_vector(p, rows, stride)",
                                       "targets_batched(p, batch, seq_len, bs, stride)",
                                       "TargetsView{p, RowIndex{rows, rpb, bs, stride}}"};

std::string describe(const LogitsArgs& a) {
  return format(
      "%s with rows %lld, V %lld, stride %lld, batch %lld, seq_len %lld, bs %lld, rs "
      "%lld, rpb %lld (extent %s)",
      kLogitsBuilders[a.builder], (long long)a.rows, (long long)a.vocab, (long long)a.stride,
      (long long)a.batch, (long long)a.seq_len, (long long)a.batch_stride, (long long)a.row_stride,
      (long long)a.rows_per_batch,
      a.ext.ok ? format("%lld elements", (long long)a.ext.hi).c_str() : "impossible");
}

std::string describe(const TargetArgs& a) {
  return format("%s with rows %lld, stride %lld, batch %lld, seq_len %lld, bs %lld, rpb %lld",
                kTargetBuilders[a.builder], (long long)a.rows, (long long)a.stride,
                (long long)a.batch, (long long)a.seq_len, (long long)a.batch_stride,
                (long long)a.rows_per_batch);
}

/// Records why the library must reject the call; reported if it does not.
struct Verdict {
  std::string why;
  void must_reject(const std::string& reason) {
    if (why.empty()) why = reason;
  }
};

class Skip {};  ///< The input claims more memory than a harness allocates.

/// Rows of a possible view above which the input is skipped: the library
/// rightly keeps O(rows) scalars, and a repeated (stride 0) view of 2^40 rows
/// is valid but needs terabytes for them.
constexpr i128 kMaxRows = i128{1} << 20;

/// Exactly the memory of an extent, or a token buffer for an impossible one.
template <class T>
std::vector<T> backing(const Extent& e, i128 rows, Verdict& v, const char* name) {
  if (e.ok) {
    if (e.hi > kMaxElements || rows > kMaxRows) throw Skip();
    return std::vector<T>(static_cast<size_t>(e.hi));
  }
  v.must_reject(std::string(name) + ": view spans memory that cannot exist (extent outside [0, " +
                "INT64_MAX], rows < 0 or rows_per_batch < 1)");
  return std::vector<T>(16);
}

/// A span of `size` elements (maybe null or of negative size), backed exactly.
template <class T>
struct SpanArg {
  std::vector<T> buf;
  kto::Span<const T> span;
};

template <class T>
SpanArg<T> read_span(Reader& in, index_t expected, Verdict& v, const char* name, bool used) {
  SpanArg<T> s;
  const std::uint8_t mode = in.u8();
  index_t size = expected;
  if (mode >= 208) size = in.usually(128) ? sat_add(expected, in.range(-2, 2)) : in.size(8);
  if (size > kMaxElements) throw Skip();
  const bool null = mode >= 200 && mode < 208;
  if (size < 0) {
    if (used) v.must_reject(std::string(name) + ": negative size");
    s.buf.resize(4);
  } else {
    s.buf.resize(static_cast<size_t>(size));
  }
  s.span = kto::Span<const T>(null ? nullptr : s.buf.data(), size);
  return s;
}

template <class T>
void fill_span(Reader& in, SpanArg<T>& s, double scale) {
  fill_values(in, s.buf.data(), static_cast<index_t>(s.buf.size()), scale);
}

SpanArg<std::uint8_t> read_labels(Reader& in, index_t expected, Verdict& v, bool used = true) {
  auto s = read_span<std::uint8_t>(in, expected, v, "desirable", used);
  Rng rng{in.u32()};
  const bool raw = in.rarely(16);
  for (auto& x : s.buf) x = static_cast<std::uint8_t>(raw ? rng.next() & 255 : rng.next() & 1);
  return s;
}

/// Offsets with `count` (maybe negative) entries + 1, backed exactly.
struct OffsetsArg {
  std::vector<index_t> buf;
  kto::SequencesView view;
};

OffsetsArg read_sequences(Reader& in, index_t rows_hint, Verdict& v) {
  OffsetsArg o;
  index_t count = in.usually(224) ? in.range(1, 6) : in.size(6);
  if (count > 64) throw Skip();
  const bool null = in.rarely(4);
  if (count < 0) {
    v.must_reject("sequences.count < 0");
    o.buf.assign(1, 0);
  } else {
    o.buf = read_offsets(in, count, rows_hint);
  }
  o.view = kto::sequences(null ? nullptr : o.buf.data(), count);
  return o;
}

index_t rows_hint(const Extent& e, i128 lit_rows) {
  return e.ok && lit_rows <= 64 ? static_cast<index_t>(lit_rows) : 8;
}

/// The gradient view of kto_step/backward: its own buffer, in place, fuzzed
/// geometry, or an offset inside the logits' arena.
struct GradPlan {
  int mode = 0;  ///< 0 same geometry, 1 in place, 2 own geometry, 3 offset in the logits arena
  LogitsArgs args;
  index_t offset = 0;
};

struct Arena {
  std::vector<float> logits;  ///< the logits, and the gradient in modes 1 and 3
  std::vector<float> grad;    ///< the gradient in modes 0 and 2
  float* grad_base = nullptr;
};

/// Element positions of each (row, column) of a literal view at `base`.
void positions(const kto::RowIndex& ix, index_t width, index_t base,
               std::vector<std::pair<index_t, index_t>>& out) {
  std::vector<index_t> offs;
  row_offsets(ix, offs);
  for (index_t r = 0; r < static_cast<index_t>(offs.size()); ++r)
    for (index_t c = 0; c < width; ++c) out.push_back({base + offs[r] + c, r * width + c});
}

/// A gradient view may alias the logits only element for element (in place).
bool bad_overlap(const LogitsArgs& l, const LogitsArgs& g, index_t offset) {
  if (!l.ext.ok || !g.ext.ok) return false;
  std::vector<std::pair<index_t, index_t>> lp, gp;
  positions(literal_index(l), l.vocab, 0, lp);
  positions(literal_index(g), g.vocab, offset, gp);
  std::sort(lp.begin(), lp.end());
  for (const auto& e : gp) {
    auto it = std::lower_bound(lp.begin(), lp.end(), std::make_pair(e.first, kInt64Min));
    for (; it != lp.end() && it->first == e.first; ++it)
      if (it->second != e.second) return true;
  }
  return false;
}

void check_grad(const kto::LogitsView<float>& g, const LogitsArgs& a, const char* what) {
  std::vector<index_t> offs;
  if (!row_offsets(literal_index(a), offs)) return;
  for (index_t r = 0; r < static_cast<index_t>(offs.size()); ++r) {
    const index_t bad = first_non_finite(g.data + offs[r], a.vocab);
    FUZZ_CHECK(bad < 0, "%s returned a non-finite gradient at row %lld, column %lld: %g", what,
               (long long)r, (long long)bad, (double)g.data[offs[r] + bad]);
  }
}

void op_sequence_logprobs(Reader& in) {
  Verdict v;
  const kto::Options o = read_options(in);
  const auto exec = read_exec(in);
  const index_t vocab = in.usually(240) ? in.range(1, 12) : in.extreme();
  const LogitsArgs la = read_logits_args(in, vocab);
  auto lbuf = backing<float>(la.ext, la.lit_rows, v, "logits");
  fill_values(in, lbuf.data(), static_cast<index_t>(lbuf.size()), 4.0);
  const TargetArgs ta = read_target_args(in, la);
  auto tbuf = backing<index_t>(ta.ext, ta.lit_rows, v, "targets");
  fill_targets(in, tbuf.data(), static_cast<index_t>(tbuf.size()), vocab, o.ignore_index);
  OffsetsArg seqs = read_sequences(in, rows_hint(la.ext, la.lit_rows), v);

  context() = "sequence_logprobs: logits " + describe(la) + " " +
              summary(lbuf.data(), lbuf.size()) + "; targets " + describe(ta) + " " + list(tbuf) +
              "; sequences count " + std::to_string(seqs.view.count) +
              (seqs.view.offsets ? " offsets " + list(seqs.buf) : " null") + "; options " +
              describe(o);
  announce();
  const auto logits = make_logits<const float>(la, lbuf.data());
  const auto targets = make_targets(ta, tbuf.data());
  try {
    const auto f = kto::cpu::sequence_logprobs<float>(logits, targets, seqs.view, o, exec);
    note("sequence_logprobs returned");
    FUZZ_CHECK(v.why.empty(), "sequence_logprobs accepted an impossible view: %s", v.why.c_str());
    for (size_t s = 0; s < f.logp.size(); ++s)
      FUZZ_CHECK(std::isfinite(f.logp[s]), "sequence_logprobs returned logp[%zu] = %g", s,
                 (double)f.logp[s]);
  } catch (const kto::Error& e) {
    note(std::string(e.function()) + ": " + e.argument());
  }
}

void op_kto_step(Reader& in, bool backward_only) {
  Verdict v;
  const kto::Options o = read_options(in);
  const auto exec = read_exec(in);
  const index_t vocab = in.usually(240) ? in.range(1, 12) : in.extreme();
  const LogitsArgs la = read_logits_args(in, vocab);

  GradPlan gp;
  const std::uint8_t gm = in.u8();
  gp.mode = gm < 128 ? 0 : (gm < 176 ? 1 : (gm < 224 ? 2 : 3));
  gp.args = la;
  if (gp.mode == 2) gp.args = read_logits_args(in, in.usually(224) ? vocab : in.range(1, 12));
  if (gp.mode == 3) gp.offset = in.range(0, 64);

  // The logits arena also holds the gradient in place / at an offset.
  Arena ar;
  if (!la.ext.ok && gp.mode != 0 && gp.mode != 2) gp.mode = 0;
  if (gp.mode == 1 || gp.mode == 3) {
    if (!gp.args.ext.ok) throw Skip();
    const i128 hi = std::max<i128>(la.ext.hi, gp.offset + gp.args.ext.hi);
    if (hi > kMaxElements || la.lit_rows > kMaxRows || gp.args.lit_rows > kMaxRows) throw Skip();
    ar.logits.resize(static_cast<size_t>(hi));
  } else {
    ar.logits = backing<float>(la.ext, la.lit_rows, v, "logits");
    ar.grad = backing<float>(gp.args.ext, gp.args.lit_rows, v, "grad");
  }
  fill_values(in, ar.logits.data(), static_cast<index_t>(ar.logits.size()), 4.0);
  std::fill(ar.grad.begin(), ar.grad.end(), std::numeric_limits<float>::quiet_NaN());
  ar.grad_base = gp.mode == 1 || gp.mode == 3 ? ar.logits.data() + gp.offset : ar.grad.data();
  if (gp.args.ext.ok && gp.args.lit_rows > 1 && rows_overlap(literal_index(gp.args), vocab))
    v.must_reject("grad rows overlap each other");
  if ((gp.mode == 1 || gp.mode == 3) && bad_overlap(la, gp.args, gp.offset))
    v.must_reject("grad partly overlaps the logits");

  const TargetArgs ta = read_target_args(in, la);
  auto tbuf = backing<index_t>(ta.ext, ta.lit_rows, v, "targets");
  fill_targets(in, tbuf.data(), static_cast<index_t>(tbuf.size()), vocab, o.ignore_index);
  OffsetsArg seqs = read_sequences(in, rows_hint(la.ext, la.lit_rows), v);
  const index_t count = seqs.view.count;
  // backward() takes none of these: only kto_step must reject them.
  const bool used = !backward_only;
  const bool kl_used = used && kto::uses_kl_batch(o);
  auto ref = read_span<float>(in, count, v, "reference_logp", used);
  fill_span(in, ref, 8.0);
  auto labels = read_labels(in, count, v, used);
  const index_t kl_n = in.usually(224) ? in.range(0, 6) : in.size(6);
  auto klp = read_span<float>(in, kl_n, v, "kl.policy_logp", kl_used);
  fill_span(in, klp, 8.0);
  auto klr = read_span<float>(in, kl_n, v, "kl.reference_logp", kl_used);
  fill_span(in, klr, 8.0);
  auto klt = read_span<index_t>(in, in.usually(128) ? 0 : kl_n, v, "kl.num_tokens", kl_used);
  for (auto& t : klt.buf) t = in.usually(224) ? in.range(0, 4) : in.extreme();
  if (kl_used && o.kl_estimator == kto::KlEstimator::nonempty_mean && klt.span.size > 0 &&
      klt.span.data != nullptr)
    for (index_t j = 0; j < klt.span.size; ++j)
      if (klt.buf[static_cast<size_t>(j)] < 0)
        v.must_reject("kl.num_tokens holds a negative count");

  auto span_text = [](const char* name, const auto& sp) {
    return std::string(", ") + name + (sp.span.data ? " " : " null ") +
           format("size %lld ", (long long)sp.span.size) + list(sp.buf);
  };
  context() = std::string(backward_only ? "backward" : "kto_step") + ": logits " + describe(la) +
              " " + summary(ar.logits.data(), ar.logits.size()) + "; grad mode " +
              std::to_string(gp.mode) + " (0 own, 1 in place, 2 own geometry, 3 at offset " +
              std::to_string(gp.offset) + " in the logits) " + describe(gp.args) + "; targets " +
              describe(ta) + " " + list(tbuf) + "; sequences count " +
              std::to_string(seqs.view.count) +
              (seqs.view.offsets ? " offsets " + list(seqs.buf) : " null") +
              span_text("reference_logp", ref) + span_text("desirable", labels) +
              span_text("kl.policy_logp", klp) + span_text("kl.reference_logp", klr) +
              span_text("kl.num_tokens", klt) + "; options " + describe(o);
  announce();
  const auto logits = make_logits<const float>(la, ar.logits.data());
  const auto grad = make_logits<float>(gp.args, ar.grad_base);
  const auto targets = make_targets(ta, tbuf.data());
  kto::cpu::StepInputs<float> sin{
      logits,      targets,
      seqs.view,   kto::reference_logp(ref.span),
      labels.span, {kto::policy_logp(klp.span), kto::reference_logp(klr.span), klt.span}};
  try {
    if (backward_only) {
      // The phases driven by hand: forward, then backward with caller spans.
      const auto f = kto::cpu::sequence_logprobs<float>(logits, targets, seqs.view, o, exec);
      auto lse = read_span<float>(in, static_cast<index_t>(f.row_lse.size()), v, "row_lse", true);
      for (size_t i = 0; i < lse.buf.size() && i < f.row_lse.size(); ++i) lse.buf[i] = f.row_lse[i];
      auto g = read_span<float>(in, count, v, "grad_logp", true);
      fill_span(in, g, 1.0);
      auto n = read_span<index_t>(in, count, v, "num_tokens", true);
      for (size_t i = 0; i < n.buf.size() && i < f.num_tokens.size(); ++i)
        n.buf[i] = f.num_tokens[i];
      kto::cpu::backward<float>(logits, targets, seqs.view, lse.span, g.span, n.span, o, grad,
                                exec);
      note("backward returned");
      FUZZ_CHECK(v.why.empty(), "backward accepted an impossible view: %s", v.why.c_str());
      return;
    }
    const auto r = kto::cpu::kto_step<float>(sin, o, grad, exec);
    note("kto_step returned");
    FUZZ_CHECK(v.why.empty(), "kto_step accepted an impossible input: %s", v.why.c_str());
    FUZZ_CHECK(std::isfinite(r.metrics.loss) && std::isfinite(r.metrics.kl),
               "kto_step returned loss %g, kl (z0) %g; options %s", r.metrics.loss, r.metrics.kl,
               describe(o).c_str());
    check_grad(grad, gp.args, "kto_step");
  } catch (const kto::Error& e) {
    note(std::string(e.function()) + ": " + e.argument());
  }
}

void op_finish(Reader& in, bool dbl) {
  Verdict v;
  const kto::Options o = read_options(in);
  const index_t n = in.usually(224) ? in.range(0, 6) : in.size(6);
  auto run = [&](auto zero) {
    using Acc = decltype(zero);
    auto pol = read_span<Acc>(in, n, v, "policy_logp", true);
    fill_span(in, pol, 8.0);
    auto ref = read_span<Acc>(in, n, v, "reference_logp", true);
    fill_span(in, ref, 8.0);
    auto labels = read_labels(in, n, v);
    const bool direct = in.flag();
    kto::KlPartial kl;
    kl.sum = in.real();
    kl.count = in.usually(224) ? static_cast<double>(in.range(0, 6)) : in.special();
    if (!direct) {
      Verdict kv;
      const index_t m = in.range(0, 6);
      auto kp = read_span<Acc>(in, m, kv, "kl.policy_logp", true);
      fill_span(in, kp, 8.0);
      auto kr = read_span<Acc>(in, m, kv, "kl.reference_logp", true);
      fill_span(in, kr, 8.0);
      auto kt = read_span<index_t>(in, in.flag() ? 0 : m, kv, "kl.num_tokens", true);
      for (auto& t : kt.buf) t = in.usually(224) ? in.range(0, 4) : in.extreme();
      if (kt.span.data != nullptr && kt.span.size > 0 &&
          o.kl_estimator == kto::KlEstimator::nonempty_mean)
        for (index_t j = 0; j < kt.span.size; ++j)
          if (kt.buf[static_cast<size_t>(j)] < 0)
            kv.must_reject("kl.num_tokens holds a negative count");
      context() = format("kl_partial: policy size %lld%s ", (long long)kp.span.size,
                         kp.span.data ? "" : " (null)") +
                  list(kp.buf) + format(", reference size %lld ", (long long)kr.span.size) +
                  list(kr.buf) + format(", num_tokens size %lld ", (long long)kt.span.size) +
                  list(kt.buf) + "; options " + describe(o);
      announce();
      try {
        kl = kto::kl_partial<Acc>(kto::policy_logp(kp.span), kto::reference_logp(kr.span), kt.span,
                                  o);
        FUZZ_CHECK(kv.why.empty(), "kl_partial accepted: %s", kv.why.c_str());
      } catch (const kto::Error& e) {
        note(std::string(e.function()) + ": " + e.argument());
        return;
      }
    }
    context() = format("finish<%s>: KlPartial{sum %g, count %g}",
                       sizeof(Acc) == 4 ? "float" : "double", kl.sum, kl.count) +
                ", policy_logp " + format("size %lld ", (long long)pol.span.size) + list(pol.buf) +
                ", reference_logp " + format("size %lld ", (long long)ref.span.size) +
                list(ref.buf) + ", desirable " + list(labels.buf) + "; options " + describe(o);
    announce();
    try {
      const auto f = kto::finish<Acc>(kl, kto::policy_logp(pol.span), kto::reference_logp(ref.span),
                                      labels.span, o);
      note("finish returned");
      FUZZ_CHECK(v.why.empty(), "finish accepted: %s", v.why.c_str());
      FUZZ_CHECK(std::isfinite(f.metrics.loss) && std::isfinite(f.metrics.kl),
                 "finish returned loss %g, kl (z0) %g from KlPartial{sum %g, count %g}, %lld "
                 "examples, options %s",
                 f.metrics.loss, f.metrics.kl, kl.sum, kl.count, (long long)pol.span.size,
                 describe(o).c_str());
      for (size_t s = 0; s < f.examples.grad_logp.size(); ++s)
        FUZZ_CHECK(std::isfinite(f.examples.grad_logp[s]), "finish returned grad_logp[%zu] = %g", s,
                   (double)f.examples.grad_logp[s]);
    } catch (const kto::Error&) {
    }
  };
  if (dbl) {
    run(0.0);
  } else {
    run(0.0f);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, size_t size) {
  Reader in(data, size);
  context().clear();
  try {
    switch (in.u8() % 6) {
      case 0:
        op_sequence_logprobs(in);
        break;
      case 1:
      case 2:
        op_kto_step(in, false);
        break;
      case 3:
        op_kto_step(in, true);
        break;
      case 4:
        op_finish(in, false);
        break;
      default:
        op_finish(in, true);
        break;
    }
  } catch (const Skip&) {
    note("skipped (claims more memory than the harness allocates)");
  } catch (const kto::Error& e) {  // from a view helper (logits_batched, ...): fine
    note(std::string(e.function()) + ": " + e.argument());
  }
  return 0;
}
