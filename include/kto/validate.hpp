// validate.hpp — host-side argument checks shared by every entry point.
//
// Each check throws kto::Error naming the argument, the expectation and what
// came. Checks that read index arrays (offsets, target ids) need them in host
// memory; the CUDA path does those on the device instead.
#pragma once

#include <cmath>
#include <string>

#include "error.hpp"
#include "layout.hpp"

namespace kto {
namespace detail {

inline void validate_row_index(const RowIndex& ix, index_t width, const char* fn,
                               const std::string& name) {
  require(ix.rows >= 0, fn, name + ".rows", "be >= 0", ix.rows);
  require(ix.rows_per_batch >= 1, fn, name + ".rows_per_batch", "be >= 1", ix.rows_per_batch);
  require(ix.row_stride >= width, fn, name + ".row_stride",
          "be >= " + std::to_string(width) + " so rows do not overlap", ix.row_stride);
  if (ix.rows > ix.rows_per_batch) {
    const index_t span = (ix.rows_per_batch - 1) * ix.row_stride + width;
    require(ix.batch_stride >= span, fn, name + ".batch_stride",
            "be >= " + std::to_string(span) + " so batch entries do not overlap", ix.batch_stride);
  }
}

/// Element count from the base pointer to one past the last element.
inline index_t extent(const RowIndex& ix, index_t width) {
  return ix.rows == 0 ? 0 : ix.offset(ix.rows - 1) + width;
}

template <class T>
void validate_logits(const LogitsView<T>& v, const char* fn, const std::string& name) {
  require(v.vocab >= 1, fn, name + ".vocab", "be >= 1", v.vocab);
  validate_row_index(v.rows, v.vocab, fn, name);
  require(v.data != nullptr || v.rows.rows == 0, fn, name + ".data",
          "be non-null when there are rows", "nullptr");
}

inline void validate_targets(const TargetsView& t, index_t rows, const char* fn,
                             const std::string& name) {
  require(t.rows.rows == rows, fn, name + ".rows",
          "equal the number of logit rows (" + std::to_string(rows) + ")", t.rows.rows);
  validate_row_index(t.rows, 1, fn, name);
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

template <class T>
void validate_span(const Span<T>& sp, index_t expected, const char* fn, const std::string& name) {
  require(sp.size == expected, fn, name + ".size", "be " + std::to_string(expected), sp.size);
  require(sp.data != nullptr || expected == 0, fn, name + ".data", "be non-null when size > 0",
          "nullptr");
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

/// A gradient view must match the logits' shape and either not overlap them
/// or be exactly the same memory (in place).
template <class T, class U>
void validate_gradient(const LogitsView<T>& grad, const LogitsView<U>& logits, const char* fn) {
  validate_logits(grad, fn, "grad");
  require(grad.vocab == logits.vocab, fn, "grad.vocab",
          "equal logits.vocab (" + std::to_string(logits.vocab) + ")", grad.vocab);
  require(grad.rows.rows == logits.rows.rows, fn, "grad.rows",
          "equal logits.rows (" + std::to_string(logits.rows.rows) + ")", grad.rows.rows);
  const auto* g0 = reinterpret_cast<const char*>(grad.data);
  const auto* l0 = reinterpret_cast<const char*>(logits.data);
  const auto* g1 = g0 + extent(grad.rows, grad.vocab) * static_cast<index_t>(sizeof(T));
  const auto* l1 = l0 + extent(logits.rows, logits.vocab) * static_cast<index_t>(sizeof(U));
  const bool overlap = g0 < l1 && l0 < g1;
  if (overlap) {
    const bool same = g0 == l0 && grad.rows.rows_per_batch == logits.rows.rows_per_batch &&
                      grad.rows.batch_stride == logits.rows.batch_stride &&
                      grad.rows.row_stride == logits.rows.row_stride;
    require(same, fn, "grad",
            "either not overlap the logits or alias them exactly (same pointer and strides)",
            "a partial overlap");
  }
}

}  // namespace detail
}  // namespace kto
