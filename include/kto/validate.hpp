// validate.hpp — host-side argument checks shared by every entry point.
//
// Each check throws kto::Error naming the argument, the expectation and what
// came. Checks that read index arrays (offsets, target ids) need them in host
// memory; the CUDA path does those on the device instead. Outputs that must
// share no byte with other buffers go through one overlap checker (ByteRange).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "error.hpp"
#include "layout.hpp"

namespace kto {
namespace detail {

/// Whether a view is only read (inputs) or also written (gradients). Rows of
/// an input may repeat (stride 0); rows of an output never share memory.
enum class Access { read, write };

/// Checks a two-level row index over rows of `width` elements of `element_bytes`
/// each and returns its extent in elements (one past the last element read),
/// overflow-checked so that every offset(r) computed later fits index_t.
inline index_t validate_row_index(const RowIndex& ix, index_t width, index_t element_bytes,
                                  Access access, const char* fn, const std::string& name) {
  require(ix.rows >= 0, fn, name + ".rows", "be >= 0", ix.rows);
  require(ix.rows_per_batch >= 1, fn, name + ".rows_per_batch", "be >= 1", ix.rows_per_batch);
  if (ix.rows == 0) return 0;
  const bool write = access == Access::write;
  const std::string repeat = write ? "" : ", or 0 to repeat one row";
  const index_t per_entry = ix.rows < ix.rows_per_batch ? ix.rows : ix.rows_per_batch;
  const index_t entries = (ix.rows - 1) / ix.rows_per_batch + 1;
  index_t span = width;  // elements one batch entry reaches
  if (per_entry > 1) {
    require(ix.row_stride >= width || (!write && ix.row_stride == 0), fn, name + ".row_stride",
            "be >= " + std::to_string(width) + " so rows do not overlap" + repeat, ix.row_stride);
    const std::string what = name + ".row_stride";
    span = checked_add(checked_mul(per_entry - 1, ix.row_stride, fn, what.c_str()), width, fn,
                       what.c_str());
  }
  index_t extent = span;
  if (entries > 1) {
    // An input's entries may interleave or repeat (a transposed [T, B, V] read
    // as [B, T, V]); an output's may not.
    if (write)
      require(ix.batch_stride >= span, fn, name + ".batch_stride",
              "be >= " + std::to_string(span) + " so batch entries do not overlap",
              ix.batch_stride);
    else
      require(ix.batch_stride >= 0, fn, name + ".batch_stride", "be >= 0", ix.batch_stride);
    const std::string what = name + ".batch_stride";
    extent = checked_add(checked_mul(entries - 1, ix.batch_stride, fn, what.c_str()), span, fn,
                         what.c_str());
  }
  checked_mul(extent, element_bytes, fn, name.c_str());  // byte offsets fit too
  return extent;
}

/// Elements from the base pointer to one past the last one a validated index reaches.
inline index_t view_extent(const RowIndex& ix, index_t width) {
  if (ix.rows == 0) return 0;
  const index_t per_entry = ix.rows < ix.rows_per_batch ? ix.rows : ix.rows_per_batch;
  const index_t entries = (ix.rows - 1) / ix.rows_per_batch + 1;
  return (entries - 1) * ix.batch_stride + (per_entry - 1) * ix.row_stride + width;
}

template <class T>
void validate_logits(const LogitsView<T>& v, const char* fn, const std::string& name,
                     Access access = Access::read) {
  require(v.vocab >= 1, fn, name + ".vocab", "be >= 1", v.vocab);
  validate_row_index(v.rows, v.vocab, static_cast<index_t>(sizeof(T)), access, fn, name);
  require(v.data != nullptr || v.rows.rows == 0, fn, name + ".data",
          "be non-null when there are rows", "nullptr");
}

inline void validate_targets(const TargetsView& t, index_t rows, const char* fn,
                             const std::string& name) {
  require(t.rows.rows == rows, fn, name + ".rows",
          "equal the number of logit rows (" + std::to_string(rows) + ")", t.rows.rows);
  validate_row_index(t.rows, 1, static_cast<index_t>(sizeof(index_t)), Access::read, fn, name);
  require(t.data != nullptr || rows == 0, fn, name + ".data", "be non-null when there are rows",
          "nullptr");
}

/// Offsets non-null, offsets[0] ≥ 0, non-decreasing, offsets[count] ≤ rows.
inline void validate_sequences(const SequencesView& s, index_t rows, const char* fn,
                               const std::string& name, bool allow_empty) {
  require(s.count >= (allow_empty ? 0 : 1), fn, name + ".count",
          allow_empty ? "be >= 0" : "be >= 1 (an empty batch has no loss)", s.count);
  require(s.offsets != nullptr, fn, name + ".offsets", "be non-null (count + 1 entries)",
          "nullptr");
  require(s.offsets[0] >= 0, fn, name + ".offsets[0]", "be >= 0", s.offsets[0]);
  for (index_t i = 0; i < s.count; ++i) {
    if (s.offsets[i + 1] < s.offsets[i]) {
      fail(fn, name + ".offsets[" + std::to_string(i + 1) + "]",
           "be >= offsets[" + std::to_string(i) + "] = " + std::to_string(s.offsets[i]) +
               " (non-decreasing)",
           s.offsets[i + 1]);
    }
  }
  require(s.offsets[s.count] <= rows, fn, name + ".offsets[" + std::to_string(s.count) + "]",
          "be <= the number of rows (" + std::to_string(rows) + ")", s.offsets[s.count]);
}

/// Every row owned by a sequence has a target in [0, vocab) or ignore_index.
inline void validate_target_ids(const TargetsView& t, const SequencesView& s, index_t vocab,
                                index_t ignore_index, const char* fn, const std::string& name) {
  const index_t first = s.count > 0 ? s.offsets[0] : 0;
  const index_t last = s.count > 0 ? s.offsets[s.count] : 0;
  for (index_t r = first; r < last; ++r) {
    const index_t id = t.at(r);
    if (id != ignore_index && (id < 0 || id >= vocab)) {
      fail(fn, name + "[" + std::to_string(r) + "]",
           "be in [0, " + std::to_string(vocab) + ") or ignore_index (" +
               std::to_string(ignore_index) + ")",
           id);
    }
  }
}

/// Rows never share memory (stride >= cols); the extent fits index_t in bytes.
template <class T>
void validate_matrix(const MatrixView<T>& m, const char* fn, const std::string& name) {
  require(m.rows >= 0, fn, name + ".rows", "be >= 0", m.rows);
  require(m.cols >= 1, fn, name + ".cols", "be >= 1", m.cols);
  require(m.stride >= m.cols || m.rows <= 1, fn, name + ".stride",
          "be >= cols (" + std::to_string(m.cols) + ") so rows do not overlap", m.stride);
  require(m.data != nullptr || m.rows == 0, fn, name + ".data", "be non-null when there are rows",
          "nullptr");
  const index_t extent = m.rows > 1
                             ? checked_add(checked_mul(m.rows - 1, m.stride, fn, name.c_str()),
                                           m.cols, fn, name.c_str())
                             : m.cols;
  checked_mul(extent, static_cast<index_t>(sizeof(T)), fn, name.c_str());
}

/// `m` is a valid rows × cols matrix; `what` names the shape it must have.
template <class T>
void validate_shape(const MatrixView<T>& m, index_t rows, index_t cols, const char* fn,
                    const std::string& name, const std::string& what) {
  validate_matrix(m, fn, name);
  require(m.rows == rows && m.cols == cols, fn, name,
          "have the shape of " + what + " (" + std::to_string(rows) + " x " + std::to_string(cols) +
              ")",
          std::to_string(m.rows) + " x " + std::to_string(m.cols));
}

template <class T>
void validate_span(const Span<T>& sp, index_t expected, const char* fn, const std::string& name) {
  require(sp.size >= 0, fn, name + ".size", "be >= 0", sp.size);
  require(sp.size == expected, fn, name + ".size", "be " + std::to_string(expected), sp.size);
  require(sp.data != nullptr || expected == 0, fn, name + ".data", "be non-null when size > 0",
          "nullptr");
}

/// Largest |log-prob| accepted, in nats: no real sequence comes near it, and
/// below it every ρ, βρ, z0 and loss term stays finite in fp32.
constexpr double kMaxLogprob = 1e15;

/// Every value finite and a log-prob in magnitude (|x| <= kMaxLogprob).
template <class T>
void validate_logprobs(const Span<T>& sp, const char* fn, const std::string& name) {
  for (index_t i = 0; i < sp.size; ++i) {
    const double x = static_cast<double>(sp.data[i]);
    if (!(std::fabs(x) <= kMaxLogprob))
      fail(fn, name + "[" + std::to_string(i) + "]", "be finite and a log-prob (|x| <= 1e15)", x);
  }
}

template <class T>
void validate_finite(const Span<T>& sp, const char* fn, const std::string& name) {
  for (index_t i = 0; i < sp.size; ++i) {
    const double x = static_cast<double>(sp.data[i]);
    if (!std::isfinite(x)) fail(fn, name + "[" + std::to_string(i) + "]", "be finite", x);
  }
}

inline void validate_labels(const Span<const std::uint8_t>& d, const char* fn,
                            const std::string& name) {
  for (index_t i = 0; i < d.size; ++i) {
    if (d.data[i] > 1) {
      fail(fn, name + "[" + std::to_string(i) + "]", "be 0 (undesirable) or 1 (desirable)",
           static_cast<int>(d.data[i]));
    }
  }
}

// ------------------------------------------------------------- overlap --
// One checker for every "these buffers share no byte" rule: a buffer is a list of
// byte spans, and two buffers overlap when any spans do. A matrix or array is the
// one span from its first byte to its last; a logits view is its rows exactly (two
// interleaved views may have their rows between each other's and share nothing).

/// The bytes a buffer covers: sorted, disjoint [begin, end) spans, and the name
/// its errors use.
struct ByteRange {
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> spans;
  std::string name;
};

/// [begin, begin + bytes), or no span when empty.
inline ByteRange byte_span(const void* begin, std::uintptr_t bytes, std::string name) {
  ByteRange out{{}, std::move(name)};
  const auto b = reinterpret_cast<std::uintptr_t>(begin);
  if (begin != nullptr && bytes > 0) out.spans.emplace_back(b, b + bytes);
  return out;
}

/// First byte to last of a validated matrix.
template <class T>
ByteRange byte_range(const MatrixView<T>& m, std::string name) {
  if (m.rows == 0) return byte_span(nullptr, 0, std::move(name));
  const auto elements = static_cast<std::uintptr_t>((m.rows - 1) * m.stride + m.cols);
  return byte_span(m.data, elements * sizeof(T), std::move(name));
}
inline ByteRange byte_range(const TargetsView& t, std::string name) {
  return byte_span(t.data, static_cast<std::uintptr_t>(view_extent(t.rows, 1)) * sizeof(index_t),
                   std::move(name));
}
template <class T>
ByteRange byte_range(const Span<T>& s, std::string name) {
  return byte_span(s.data, static_cast<std::uintptr_t>(s.size > 0 ? s.size : 0) * sizeof(T),
                   std::move(name));
}

/// Every row of a logits view exactly, sorted and merged.
template <class T>
ByteRange row_byte_ranges(const LogitsView<T>& v, std::string name = {}) {
  ByteRange out{{}, std::move(name)};
  auto& spans = out.spans;
  spans.reserve(static_cast<std::size_t>(v.rows.rows));
  const auto base = reinterpret_cast<std::uintptr_t>(v.data);
  const auto bytes = static_cast<std::uintptr_t>(sizeof(T));
  for (index_t r = 0; r < v.rows.rows; ++r) {
    const auto b = base + static_cast<std::uintptr_t>(v.rows.offset(r)) * bytes;
    spans.emplace_back(b, b + static_cast<std::uintptr_t>(v.vocab) * bytes);
  }
  std::sort(spans.begin(), spans.end());
  std::size_t n = 0;
  for (const auto& iv : spans) {
    if (n > 0 && iv.first <= spans[n - 1].second) {
      spans[n - 1].second = std::max(spans[n - 1].second, iv.second);
    } else {
      spans[n++] = iv;
    }
  }
  spans.resize(n);
  return out;
}

/// Whether two buffers have a byte in common (one walk over both span lists).
inline bool shares_memory(const ByteRange& a, const ByteRange& b) {
  std::size_t i = 0, j = 0;
  while (i < a.spans.size() && j < b.spans.size()) {
    const auto &x = a.spans[i], &y = b.spans[j];
    if (x.first < y.second && y.first < x.second) return true;
    if (x.second <= y.second) {
      ++i;
    } else {
      ++j;
    }
  }
  return false;
}

/// Whether two views have an element in common (not just overlapping bounds).
template <class T, class U>
bool views_share_memory(const LogitsView<T>& a, const LogitsView<U>& b) {
  return shares_memory(row_byte_ranges(a), row_byte_ranges(b));
}

/// Every output shares no byte with another output or with any input: the
/// gradients are written before (and while) the inputs are read.
inline void validate_disjoint(const std::vector<ByteRange>& outputs,
                              const std::vector<ByteRange>& inputs, const char* fn) {
  auto check = [&](const ByteRange& out, const ByteRange& other) {
    if (shares_memory(out, other))
      fail(fn, out.name, "share no memory with " + other.name, "an overlap");
  };
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    for (std::size_t j = i + 1; j < outputs.size(); ++j) check(outputs[i], outputs[j]);
    for (const ByteRange& in : inputs) check(outputs[i], in);
  }
}

/// A gradient view must match the logits' shape and either share no element
/// with them or be exactly the same memory (in place).
template <class T, class U>
void validate_gradient(const LogitsView<T>& grad, const LogitsView<U>& logits, const char* fn) {
  validate_logits(grad, fn, "grad", Access::write);
  require(grad.vocab == logits.vocab, fn, "grad.vocab",
          "equal logits.vocab (" + std::to_string(logits.vocab) + ")", grad.vocab);
  require(grad.rows.rows == logits.rows.rows, fn, "grad.rows",
          "equal logits.rows (" + std::to_string(logits.rows.rows) + ")", grad.rows.rows);
  if (grad.rows.rows == 0) return;
  const index_t grad_extent =
      validate_row_index(grad.rows, grad.vocab, sizeof(T), Access::write, fn, "grad");
  const index_t logits_extent =
      validate_row_index(logits.rows, logits.vocab, sizeof(U), Access::read, fn, "logits");
  const auto g0 = reinterpret_cast<std::uintptr_t>(grad.data);
  const auto l0 = reinterpret_cast<std::uintptr_t>(logits.data);
  const auto g1 = g0 + static_cast<std::uintptr_t>(grad_extent) * sizeof(T);
  const auto l1 = l0 + static_cast<std::uintptr_t>(logits_extent) * sizeof(U);
  if (!(g0 < l1 && l0 < g1)) return;
  // In place: every row at the same place, however the two views are built.
  bool same = g0 == l0 && sizeof(T) == sizeof(U);
  for (index_t r = 0; same && r < grad.rows.rows; ++r)
    same = grad.rows.offset(r) == logits.rows.offset(r);
  if (same) return;
  require(!views_share_memory(grad, logits), fn, "grad",
          "either share no element with the logits or alias them exactly (same pointer and "
          "strides)",
          "a partial overlap");
}

}  // namespace detail
}  // namespace kto
