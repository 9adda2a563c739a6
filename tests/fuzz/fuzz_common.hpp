// fuzz_common.hpp — what the three libFuzzer harnesses share.
//
// Reader turns the fuzz bytes into sizes, strides, option codes, ids and
// values. Most draws are ordinary (small sizes, moderate logits) so the
// library gets past its checks and runs; a fraction are extreme: 0, negative,
// INT64_MAX, 2^32, NaN, ±inf, denormals, FLT_MAX, DBL_MAX. Bulk values come
// from a PRNG seeded by the bytes plus a few byte-chosen overrides, so inputs
// stay short (-max_len ≈ 1 KiB) however large the problem.
//
// Extent computes, in 128-bit arithmetic, the elements a row view really
// spans by its documented formula (offset(r) = (r / rows_per_batch) ·
// batch_stride + (r % rows_per_batch) · row_stride, plus the row width): the
// harnesses allocate exactly that much, so any read or write the library makes
// outside it is an AddressSanitizer report. A view whose extent does not fit
// in int64 (or reaches below its base pointer) cannot exist in memory: the
// library must reject it.
//
// A harness calls finding() (abort, so libFuzzer keeps the input) when the
// library returns normally where it must have thrown kto::Error, or returns a
// non-finite or otherwise wrong answer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include <kto/config.hpp>
#include <kto/cpu/parallel.hpp>
#include <kto/error.hpp>
#include <kto/layout.hpp>
#include <kto/options.hpp>

namespace fuzz {

using kto::index_t;
using i128 = __int128;

constexpr index_t kInt64Max = std::numeric_limits<index_t>::max();
constexpr index_t kInt64Min = std::numeric_limits<index_t>::min();

/// Largest buffer (elements) a harness allocates for one view.
constexpr index_t kMaxElements = index_t{1} << 16;

/// What the current input is, in words; printed with a finding, and before
/// the call when KTO_FUZZ_VERBOSE is set (to read a sanitizer report's input).
inline std::string& context() {
  static std::string text;
  return text;
}
inline void announce() {
  static const bool on = std::getenv("KTO_FUZZ_VERBOSE") != nullptr;
  if (on) std::fprintf(stderr, "==kto-fuzz== input: %s\n", context().c_str());
}

[[noreturn]] inline void finding(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "\n==kto-fuzz== FINDING: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  va_end(args);
  if (!context().empty()) std::fprintf(stderr, "==kto-fuzz== input: %s\n", context().c_str());
  std::abort();
}

#define FUZZ_CHECK(cond, ...)                  \
  do {                                         \
    if (!(cond)) ::fuzz::finding(__VA_ARGS__); \
  } while (0)

/// With KTO_FUZZ_STATS set, counts outcomes (returned, or the argument an
/// error named) and prints them at exit: how much of the input gets past the
/// checks. Run it over a corpus: `KTO_FUZZ_STATS=1 ./fuzz_x -runs=0 corpus/`.
inline void note(const std::string& what) {
  struct Counts {
    std::map<std::string, long> m;
    ~Counts() {
      if (m.empty()) return;
      std::fprintf(stderr, "==kto-fuzz== outcomes:\n");
      for (const auto& kv : m) std::fprintf(stderr, "%10ld  %s\n", kv.second, kv.first.c_str());
    }
  };
  static const bool on = std::getenv("KTO_FUZZ_STATS") != nullptr;
  static Counts counts;
  if (on) ++counts.m[what];
}

/// splitmix64: the bulk values of a buffer, from a seed the bytes choose.
struct Rng {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [-1, 1).
  double unit() { return static_cast<double>(next() >> 11) * 0x1p-52 - 1.0; }
  index_t below(index_t n) { return n > 0 ? static_cast<index_t>(next() % std::uint64_t(n)) : 0; }
};

inline const std::vector<index_t>& extreme_indices() {
  static const std::vector<index_t> v = {0,
                                         1,
                                         -1,
                                         -2,
                                         2,
                                         -100,
                                         index_t{1} << 31,
                                         (index_t{1} << 31) - 1,
                                         index_t{1} << 32,
                                         (index_t{1} << 32) + 1,
                                         (index_t{1} << 32) - 1,
                                         -(index_t{1} << 32),
                                         index_t{1} << 62,
                                         (index_t{1} << 62) + (index_t{1} << 61),
                                         kInt64Max / 2,
                                         kInt64Max / 2 + 1,
                                         kInt64Max - 1,
                                         kInt64Max,
                                         kInt64Min,
                                         kInt64Min + 1,
                                         -kInt64Max / 2};
  return v;
}

inline const std::vector<double>& special_reals() {
  static const std::vector<double> v = {
      0.0,
      -0.0,
      1.0,
      -1.0,
      0.5,
      std::numeric_limits<double>::quiet_NaN(),
      -std::numeric_limits<double>::quiet_NaN(),
      std::numeric_limits<double>::infinity(),
      -std::numeric_limits<double>::infinity(),
      std::numeric_limits<double>::denorm_min(),
      static_cast<double>(std::numeric_limits<float>::denorm_min()),
      static_cast<double>(std::numeric_limits<float>::min()),
      static_cast<double>(std::numeric_limits<float>::max()),
      -static_cast<double>(std::numeric_limits<float>::max()),
      std::numeric_limits<double>::min(),
      std::numeric_limits<double>::max(),
      -std::numeric_limits<double>::max(),
      1e-300,
      1e-30,
      1e-8,
      1e4,
      -1e4,
      1e30,
      -1e30,
      3.5e38,
      1e39,
      -1e39,
      1e300,
      88.8,
      -88.8,
      -103.98,
      709.8,
      -745.2};
  return v;
}

/// a + b, saturated to the int64 range.
inline index_t sat_add(index_t a, index_t b) {
  const i128 s = i128(a) + b;
  return s > kInt64Max ? kInt64Max : (s < kInt64Min ? kInt64Min : static_cast<index_t>(s));
}

/// Reads the fuzz bytes front to back; past the end every read is 0.
class Reader {
 public:
  Reader(const std::uint8_t* data, size_t size) : p_(data), n_(size) {}
  bool empty() const { return n_ == 0; }
  std::uint8_t u8() {
    if (n_ == 0) return 0;
    --n_;
    return *p_++;
  }
  std::uint16_t u16() { return static_cast<std::uint16_t>(u8() | (u8() << 8)); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(u16()) | (std::uint32_t(u16()) << 16); }
  std::uint64_t u64() { return static_cast<std::uint64_t>(u32()) | (std::uint64_t(u32()) << 32); }
  bool flag() { return (u8() & 1) != 0; }
  /// True with probability num/256, and for a 0 byte (inputs read past their end).
  bool usually(int num) { return u8() < num; }
  /// True with probability num/256, never for a 0 byte.
  bool rarely(int num) { return u8() >= 256 - num; }
  /// Uniform-ish in [lo, hi] (hi − lo < 2^16).
  index_t range(index_t lo, index_t hi) {
    if (hi <= lo) return lo;
    const std::uint64_t span = static_cast<std::uint64_t>(hi) - static_cast<std::uint64_t>(lo) + 1;
    const std::uint64_t draw = span <= 256 ? u8() : u16();
    return static_cast<index_t>(static_cast<std::uint64_t>(lo) + (span ? draw % span : draw));
  }
  /// An extreme integer, or 64 raw bits.
  index_t extreme() {
    const auto& t = extreme_indices();
    const std::uint8_t k = u8();
    if (k < t.size()) return t[k];
    if (k < 200) return t[k % t.size()];
    return static_cast<index_t>(u64());
  }
  /// Mostly in [0, small_max]; 1 in 8 an extreme value.
  index_t size(index_t small_max) {
    if (u8() < 224) return range(0, small_max);
    return extreme();
  }
  /// A stride for rows of `width`: mostly `width` or a little more, else anything.
  index_t stride(index_t width) {
    const std::uint8_t k = u8();
    if (k < 128) return width;
    if (k < 192) return sat_add(width, range(0, 4));
    if (k < 208) return range(0, width > 0 && width < 1000 ? 2 * width + 2 : 8);
    if (k < 216) return 0;
    return extreme();
  }
  /// A special real (NaN, ±inf, denormal, huge, ...) or 64 raw bits.
  double special() {
    const auto& t = special_reals();
    const std::uint8_t k = u8();
    if (k < t.size()) return t[k];
    if (k < 224) return t[k % t.size()];
    double d;
    const std::uint64_t bits = u64();
    std::memcpy(&d, &bits, sizeof d);
    return d;
  }
  /// A moderate value (|x| ≤ 16 in steps of 1/8), 1 in 8 special.
  double real() {
    if (u8() < 224) return static_cast<double>(static_cast<std::int8_t>(u8())) / 8.0;
    return special();
  }
  /// A positive option value: usually sane, sometimes anything.
  double positive(double usual) {
    const std::uint8_t k = u8();
    if (k < 160) return usual;
    if (k < 200) return static_cast<double>(u8() + 1) / 64.0;
    return special();
  }
  /// An enum code: usually valid (< valid), sometimes any int.
  int code(int valid) {
    const std::uint8_t k = u8();
    if (k < 224) return static_cast<int>(k % valid);
    const int odd[] = {valid,
                       valid + 1,
                       -1,
                       255,
                       std::numeric_limits<int>::max(),
                       std::numeric_limits<int>::min()};
    return odd[u8() % 6];
  }

 private:
  const std::uint8_t* p_;
  size_t n_;
};

/// Labels of the examples: 0 or 1, or (one input in 16) any byte, from a seed
/// drawn here.
inline void fill_labels(Reader& in, std::vector<std::uint8_t>& labels) {
  Rng rng{in.u32()};
  const bool raw = in.rarely(16);
  for (auto& d : labels) d = static_cast<std::uint8_t>(raw ? rng.next() & 255 : rng.next() & 1);
}

/// Fills v with seeded values of magnitude ≲ scale, then a few byte-chosen
/// overrides with special values (NaN, ±inf, denormals, huge).
template <class T>
void fill_values(Reader& in, T* v, index_t n, double scale) {
  Rng rng{in.u32()};
  for (index_t i = 0; i < n; ++i) v[i] = static_cast<T>(scale * rng.unit());
  const int overrides = in.rarely(64) ? 1 + in.u8() % 5 : 0;
  for (int k = 0; k < overrides && n > 0; ++k) {
    const index_t at = static_cast<index_t>(in.u16()) % n;
    v[at] = static_cast<T>(in.special());
  }
}

/// The elements a row view spans: [lo, hi) relative to its base pointer.
struct Extent {
  bool ok = false;  ///< rows ≥ 0, rows_per_batch ≥ 1 when rows > 0, lo ≥ 0, hi ≤ INT64_MAX
  i128 lo = 0, hi = 0;
};

/// Exact extent of `rows` rows of `width` elements at the documented offsets.
inline Extent extent_of(i128 rows, i128 rows_per_batch, i128 batch_stride, i128 row_stride,
                        i128 width) {
  Extent e;
  if (rows < 0 || width < 0 || rows > kInt64Max) return e;
  if (rows == 0 || width == 0) {
    e.ok = true;
    return e;
  }
  if (rows_per_batch < 1) return e;
  // offset is linear in (batch b, index i) over a box: its extremes are corners.
  const i128 q = (rows - 1) / rows_per_batch;
  const i128 last_i = (rows - 1) % rows_per_batch;
  const i128 max_i = std::min(rows_per_batch - 1, rows - 1);
  i128 lo = 0, hi = 0;
  bool first = true;
  auto corner = [&](i128 b, i128 i) {
    const i128 off = b * batch_stride + i * row_stride;
    if (first || off < lo) lo = off;
    if (first || off > hi) hi = off;
    first = false;
  };
  corner(0, 0);
  corner(0, max_i);
  corner(q, 0);
  corner(q, last_i);
  if (q >= 1) {
    corner(q - 1, rows_per_batch - 1);
    corner(q - 1, 0);
  }
  e.lo = lo;
  e.hi = hi + width;
  e.ok = lo >= 0 && e.hi <= kInt64Max;
  return e;
}

inline Extent extent_of(const kto::RowIndex& ix, index_t width) {
  return extent_of(ix.rows, ix.rows_per_batch, ix.batch_stride, ix.row_stride, width);
}

/// Element offsets of each row start, when the view is small enough to list.
inline bool row_offsets(const kto::RowIndex& ix, std::vector<index_t>& out) {
  out.clear();
  const Extent e = extent_of(ix, 1);
  if (!e.ok || ix.rows > kMaxElements) return false;
  for (index_t r = 0; r < ix.rows; ++r) {
    const i128 off =
        i128(r / ix.rows_per_batch) * ix.batch_stride + i128(r % ix.rows_per_batch) * ix.row_stride;
    out.push_back(static_cast<index_t>(off));
  }
  return true;
}

/// Whether two rows of an output view share an element (a write race / garbage).
inline bool rows_overlap(const kto::RowIndex& ix, index_t width) {
  std::vector<index_t> offs;
  if (!row_offsets(ix, offs)) return true;
  std::sort(offs.begin(), offs.end());
  for (size_t i = 1; i < offs.size(); ++i)
    if (offs[i] - offs[i - 1] < width) return true;
  return false;
}

template <class T>
bool all_finite(const T* v, index_t n) {
  for (index_t i = 0; i < n; ++i)
    if (!std::isfinite(static_cast<double>(v[i]))) return false;
  return true;
}

template <class T>
index_t first_non_finite(const T* v, index_t n) {
  for (index_t i = 0; i < n; ++i)
    if (!std::isfinite(static_cast<double>(v[i]))) return i;
  return -1;
}

/// Bitwise equality of two values (NaN == NaN when the bits match).
template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// An execution policy: thread counts and the per-thread minimum, extremes included.
inline kto::cpu::ExecutionPolicy read_exec(Reader& in) {
  kto::cpu::ExecutionPolicy p;
  const std::uint8_t k = in.u8();
  p.num_threads = k < 160 ? 1 + k % 4 : (k < 200 ? 0 : (k < 230 ? -1 - k % 3 : 64));
  const std::uint8_t m = in.u8();
  if (m < 128) {
    p.min_rows_per_thread = 1 + m % 8;
  } else if (m < 240) {
    p.min_rows_per_thread = 8;
  } else {
    p.min_rows_per_thread = in.extreme();
  }
  return p;
}

/// Options with every field fuzzed; most draws valid so the step runs.
inline kto::Options read_options(Reader& in) {
  kto::Options o;
  if (in.rarely(64)) return o;
  o.beta = in.positive(in.usually(128) ? 0.1 : 1.0);
  o.desirable_weight = in.positive(1.0);
  o.undesirable_weight = in.positive(in.usually(128) ? 1.0 : 1.33);
  o.loss_type = static_cast<kto::LossType>(in.code(2));
  o.link = static_cast<kto::Link>(in.code(2));
  o.reference_point = static_cast<kto::ReferencePoint>(in.code(3));
  o.kl_estimator = static_cast<kto::KlEstimator>(in.code(2));
  const std::uint8_t bits = in.u8();
  o.clamp_kl = (bits & 1) != 0;
  o.average_logprob = (bits & 2) != 0;
  o.fixed_z0 = in.usually(192) ? in.real() : in.special();
  o.reduction = static_cast<kto::Reduction>(in.code(2));
  o.mean_denominator = in.usually(192) ? 0 : in.size(8);
  const std::uint8_t ig = in.u8();
  o.ignore_index = ig < 192 ? -100 : (ig < 220 ? in.range(-2, 8) : in.extreme());
  return o;
}

/// printf into a std::string.
inline std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  return buf;
}

template <class V>
std::string list(const V& v, size_t max = 12) {
  std::string out = "[";
  for (size_t i = 0; i < v.size() && i < max; ++i)
    if constexpr (std::is_integral<std::decay_t<decltype(v[i])>>::value) {
      out += (i ? ", " : "") + format("%lld", static_cast<long long>(v[i]));
    } else {
      out += (i ? ", " : "") + format("%g", static_cast<double>(v[i]));
    }
  if (v.size() > max) out += ", ...";
  return out + "]";
}

/// min/max and the count of NaN and ±inf of some values.
template <class T>
std::string summary(const T* v, size_t n) {
  double lo = INFINITY, hi = -INFINITY;
  size_t nan = 0, inf = 0;
  for (size_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(v[i]);
    if (std::isnan(x)) {
      ++nan;
    } else {
      if (std::isinf(x)) ++inf;
      lo = std::min(lo, x), hi = std::max(hi, x);
    }
  }
  return format("{%zu values in [%g, %g], %zu NaN, %zu inf}", n, lo, hi, nan, inf);
}

/// The options in one line, for finding messages.
inline std::string describe(const kto::Options& o) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "beta=%g lambda_D=%g lambda_U=%g loss_type=%d link=%d reference_point=%d "
                "kl_estimator=%d clamp_kl=%d fixed_z0=%g average_logprob=%d reduction=%d "
                "mean_denominator=%lld ignore_index=%lld",
                o.beta, o.desirable_weight, o.undesirable_weight, static_cast<int>(o.loss_type),
                static_cast<int>(o.link), static_cast<int>(o.reference_point),
                static_cast<int>(o.kl_estimator), o.clamp_kl ? 1 : 0, o.fixed_z0,
                o.average_logprob ? 1 : 0, static_cast<int>(o.reduction),
                static_cast<long long>(o.mean_denominator), static_cast<long long>(o.ignore_index));
  return buf;
}

/// CSR offsets over `rows` rows: padded, packed (sorted random), or raw.
inline std::vector<index_t> read_offsets(Reader& in, index_t count, index_t rows) {
  std::vector<index_t> off(static_cast<size_t>(count + 1), 0);
  const std::uint8_t mode = in.u8();
  if (mode < 96 && count > 0) {  // padded
    const index_t len = rows / count;
    for (index_t s = 0; s <= count; ++s) off[static_cast<size_t>(s)] = s * len;
  } else if (mode < 224) {  // packed: sorted draws in [0, rows]
    Rng rng{in.u32()};
    for (auto& x : off) x = rng.below(rows + 1);
    std::sort(off.begin(), off.end());
    if (in.flag()) off.front() = 0;
    if (in.flag()) off.back() = rows;
  } else {  // raw
    for (auto& x : off) x = in.usually(128) ? in.range(-2, sat_add(rows, 2)) : in.extreme();
  }
  // A few corruptions: non-monotone, past the end, negative, extreme.
  const int edits = in.rarely(32) ? 1 + in.u8() % 3 : 0;
  for (int k = 0; k < edits; ++k) {
    const auto at = static_cast<size_t>(in.u8()) % off.size();
    off[at] = in.usually(128) ? in.range(-2, sat_add(rows, 3)) : in.extreme();
  }
  return off;
}

/// Target ids: mostly in [0, vocab) with some ignore_index, a few anything.
inline void fill_targets(Reader& in, index_t* t, index_t n, index_t vocab, index_t ignore_index) {
  Rng rng{in.u32()};
  const std::uint8_t ignore_rate = in.u8();
  for (index_t i = 0; i < n; ++i)
    t[i] = (rng.next() & 255) < ignore_rate / 4 ? ignore_index : rng.below(vocab > 0 ? vocab : 1);
  const int overrides = in.rarely(64) ? 1 + in.u8() % 3 : 0;
  for (int k = 0; k < overrides && n > 0; ++k) {
    const index_t at = static_cast<index_t>(in.u16()) % n;
    t[at] = in.usually(128) ? in.range(-3, std::min<index_t>(vocab, 1000) + 3) : in.extreme();
  }
}

}  // namespace fuzz
