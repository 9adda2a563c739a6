// layout.hpp — where a row of logits, a target id and a sequence live in memory.
//
// Rows are addressed in two levels so that the views frameworks hand out need
// no copy: row r sits at
//
//     (r / rows_per_batch) * batch_stride + (r % rows_per_batch) * row_stride
//
// A plain (rows × V) matrix has one batch entry. The shifted view
// `logits[:, :-1]` of a [B, T, V] tensor is batch = B, rows_per_batch = T − 1,
// batch_stride = T·V, row_stride = V; its targets `labels[:, 1:]` are the same
// two-level view over the labels (data + 1, batch_stride = T, stride 1).
//
// Hidden states, weights and their gradients are plain row-major matrices
// (MatrixView): `rows` rows of `cols` elements, `stride` elements apart.
//
// Sequences are CSR offsets over the row index: sequence s owns rows
// [offsets[s], offsets[s+1]). Padded batches use offsets s·T, packed batches any
// non-decreasing offsets.
//
// Strides are taken literally. A stride of 0 on an input repeats the same
// elements (torch's `expand`); a stride on a dimension of extent 1 is never
// used. Negative strides are rejected, and so are outputs whose rows would
// share memory (validate.hpp). The builders without a stride argument give a
// contiguous view; every size product is overflow-checked.
#pragma once

#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "config.hpp"
#include "error.hpp"

namespace kto {

/// A pointer with its element count, so sizes can be checked.
template <class T>
struct Span {
  T* data = nullptr;
  index_t size = 0;
  Span() = default;
  KTO_HOST_DEVICE Span(T* d, index_t n) : data(d), size(n) {}
  /// Span<T> converts to Span<const T>.
  template <class U, class = std::enable_if_t<std::is_convertible<U (*)[], T (*)[]>::value>>
  KTO_HOST_DEVICE Span(const Span<U>& other) : data(other.data), size(other.size) {}
  KTO_HOST_DEVICE T& operator[](index_t i) const { return data[i]; }
};
template <class T>
Span<T> make_span(T* data, index_t size) {
  return Span<T>{data, size};
}
template <class T, class A>
Span<const T> make_span(const std::vector<T, A>& v) {
  return Span<const T>{v.data(), static_cast<index_t>(v.size())};
}

namespace detail {

/// a·b, or kto::Error naming `fn` and `argument` when it does not fit index_t.
inline index_t checked_mul(index_t a, index_t b, const char* fn, const char* argument) {
  index_t out = 0;
  if (__builtin_mul_overflow(a, b, &out))
    fail(fn, argument, "give a size that fits in 64 bits",
         std::to_string(a) + " x " + std::to_string(b));
  return out;
}
inline index_t checked_add(index_t a, index_t b, const char* fn, const char* argument) {
  index_t out = 0;
  if (__builtin_add_overflow(a, b, &out))
    fail(fn, argument, "give a size that fits in 64 bits",
         std::to_string(a) + " + " + std::to_string(b));
  return out;
}

}  // namespace detail

struct RowIndex {
  index_t rows = 0;
  index_t rows_per_batch = 1;
  index_t batch_stride = 0;
  index_t row_stride = 0;
  /// Element offset of row r from the base pointer.
  KTO_HOST_DEVICE index_t offset(index_t r) const {
    return (r / rows_per_batch) * batch_stride + (r % rows_per_batch) * row_stride;
  }
};

/// Logits (or their gradient): `rows.rows` rows of `vocab` contiguous elements.
template <class T>
struct LogitsView {
  T* data = nullptr;
  index_t vocab = 0;
  RowIndex rows;
  LogitsView() = default;
  KTO_HOST_DEVICE LogitsView(T* d, index_t v, RowIndex r) : data(d), vocab(v), rows(r) {}
  /// LogitsView<T> converts to LogitsView<const T>, as Span does.
  template <class U, class = std::enable_if_t<std::is_convertible<U (*)[], T (*)[]>::value>>
  KTO_HOST_DEVICE LogitsView(const LogitsView<U>& other)
      : data(other.data), vocab(other.vocab), rows(other.rows) {}
  KTO_HOST_DEVICE T* row(index_t r) const { return data + rows.offset(r); }
  KTO_HOST_DEVICE index_t num_rows() const { return rows.rows; }
};

/// One target id per row; `ignore_index` marks rows that are not scored.
struct TargetsView {
  const index_t* data = nullptr;
  RowIndex rows;
  KTO_HOST_DEVICE index_t at(index_t r) const { return data[rows.offset(r)]; }
};

struct SequencesView {
  const index_t* offsets = nullptr;  ///< count + 1 entries
  index_t count = 0;
  KTO_HOST_DEVICE index_t begin(index_t s) const { return offsets[s]; }
  KTO_HOST_DEVICE index_t end(index_t s) const { return offsets[s + 1]; }
};

/// Sequence owning row r: the last s with offsets[s] <= r (offsets valid, r
/// inside [offsets[0], offsets[count])). Empty sequences own no row.
KTO_HOST_DEVICE inline index_t sequence_of_row(const SequencesView& seqs, index_t r) {
  index_t lo = 0, hi = seqs.count;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const index_t mid = lo + (hi - lo) / 2;
    if (seqs.offsets[mid] <= r)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

/// A row-major matrix (hidden states, a weight, their gradients): `rows` rows of
/// `cols` elements, `stride` elements apart.
template <class T>
struct MatrixView {
  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  index_t stride = 0;
  KTO_HOST_DEVICE T* row(index_t r) const { return data + r * stride; }
};

/// A contiguous rows × cols matrix.
template <class T>
MatrixView<T> matrix_view(T* data, index_t rows, index_t cols) {
  return MatrixView<T>{data, rows, cols, cols};
}

/// A rows × cols matrix whose rows are `stride` elements apart (taken literally).
template <class T>
MatrixView<T> matrix_view(T* data, index_t rows, index_t cols, index_t stride) {
  return MatrixView<T>{data, rows, cols, stride};
}

/// A contiguous (rows × vocab) matrix.
template <class T>
LogitsView<T> logits_matrix(T* data, index_t rows, index_t vocab) {
  return LogitsView<T>{data, vocab, RowIndex{rows, rows > 0 ? rows : 1, 0, vocab}};
}

/// A (rows × vocab) matrix whose rows are `row_stride` elements apart (0: one
/// row repeated, as torch's expand gives).
template <class T>
LogitsView<T> logits_matrix(T* data, index_t rows, index_t vocab, index_t row_stride) {
  return LogitsView<T>{data, vocab, RowIndex{rows, rows > 0 ? rows : 1, 0, row_stride}};
}

/// A [batch, seq_len, vocab] view with element strides (batch_stride, row_stride, 1).
template <class T>
LogitsView<T> logits_batched(T* data, index_t batch, index_t seq_len, index_t vocab,
                             index_t batch_stride, index_t row_stride) {
  detail::require(batch >= 0, "kto::logits_batched", "batch", "be >= 0", batch);
  detail::require(seq_len >= 0, "kto::logits_batched", "seq_len", "be >= 0", seq_len);
  const index_t rows =
      detail::checked_mul(batch, seq_len, "kto::logits_batched", "batch x seq_len");
  return LogitsView<T>{data, vocab,
                       RowIndex{rows, seq_len > 0 ? seq_len : 1, batch_stride, row_stride}};
}

/// `rows` target ids, `stride` elements apart (0: one id repeated).
inline TargetsView targets_vector(const index_t* data, index_t rows, index_t stride = 1) {
  return TargetsView{data, RowIndex{rows, rows > 0 ? rows : 1, 0, stride}};
}

/// A [batch, seq_len] view of target ids with element strides (batch_stride, stride).
inline TargetsView targets_batched(const index_t* data, index_t batch, index_t seq_len,
                                   index_t batch_stride, index_t stride = 1) {
  detail::require(batch >= 0, "kto::targets_batched", "batch", "be >= 0", batch);
  detail::require(seq_len >= 0, "kto::targets_batched", "seq_len", "be >= 0", seq_len);
  const index_t rows =
      detail::checked_mul(batch, seq_len, "kto::targets_batched", "batch x seq_len");
  return TargetsView{data, RowIndex{rows, seq_len > 0 ? seq_len : 1, batch_stride, stride}};
}

inline SequencesView sequences(const index_t* offsets, index_t count) {
  return SequencesView{offsets, count};
}

/// Offsets of a padded batch: sequence s owns rows [s·seq_len, (s+1)·seq_len).
inline std::vector<index_t> padded_offsets(index_t batch, index_t seq_len) {
  const char* fn = "kto::padded_offsets";
  detail::require(batch >= 0, fn, "batch", "be >= 0", batch);
  detail::require(seq_len >= 0, fn, "seq_len", "be >= 0", seq_len);
  detail::checked_mul(batch, seq_len, fn, "batch x seq_len");
  std::vector<index_t> off(static_cast<std::size_t>(batch) + 1);
  for (index_t s = 0; s <= batch; ++s) off[static_cast<std::size_t>(s)] = s * seq_len;
  return off;
}

}  // namespace kto
