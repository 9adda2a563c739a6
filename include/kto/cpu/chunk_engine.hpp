// cpu/chunk_engine.hpp — the GEMMs and row kernels of one head over a chunk of rows.
//
// ChunkEngine holds one chunk's buffers (scratch.hpp: kept by the calling
// thread between calls) and W, b in the accumulation type (or W read in place
// by gemm_bf16). For the chunk's scored rows only (compact: prompt and padding
// rows are never read, cost no GEMM work, and a NaN there reaches no gradient):
//
//   compute()    Z_c = H_c Wᵀ + b                    split over vocab columns
//   partials()   lse_r and the target logit per row  row_stats (row_kernels.hpp)
//   backward()   dZ_c in place from lse_r and g_s c_r, then
//                dW += dZ_cᵀ H_c, db += Σ_r dZ_c, dH_c = dZ_c W
//
// Work is split over threads in fixed tiles, so the bits do not depend on the
// thread count. kto::cuda::detail::ChunkEngine (cuda/detail/chunk_engine.hpp)
// is its CUDA twin.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "fused_linear_types.hpp"
#include "gemm_bf16.hpp"
#include "parallel.hpp"
#include "row_kernels.hpp"
#include "scratch.hpp"

namespace kto {
namespace cpu {
namespace detail {

template <class Acc>
using RowMajor = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Acc>
using ConstMatrixMap = Eigen::Map<const RowMajor<Acc>, 0, Eigen::OuterStride<>>;
template <class Acc>
using MatrixMap = Eigen::Map<RowMajor<Acc>, 0, Eigen::OuterStride<>>;

/// The first non-finite element of n values, or -1.
template <class T>
index_t first_non_finite(const T* x, index_t n) {
  for (index_t i = 0; i < n; ++i)
    if (!std::isfinite(static_cast<double>(x[i]))) return i;
  return -1;
}

/// Scored rows of a batch: inside a sequence and not ignored.
struct RowScorer {
  const TargetsView& targets;
  index_t first, last, ignore;
  RowScorer(const TargetsView& t, const SequencesView& s, index_t ignore_index)
      : targets(t),
        first(s.count > 0 ? s.offsets[0] : 0),
        last(s.count > 0 ? s.offsets[s.count] : 0),
        ignore(ignore_index) {}
  index_t target(index_t r) const { return r >= first && r < last ? targets.at(r) : ignore; }
};

/// body(b, e) over fixed tiles of [0, n): each GEMM sees the same sizes
/// whatever the thread count, so its blocking, and the result bits, match.
template <class Body>
void parallel_tiles(index_t n, index_t tile, const ExecutionPolicy& exec, Body&& body) {
  parallel_for((n + tile - 1) / tile, exec, [&](index_t tb, index_t te) {
    for (index_t t = tb; t < te; ++t) body(t * tile, std::min(n, (t + 1) * tile));
  });
}
constexpr index_t kVocabTile = 256;
constexpr index_t kRowTile = 32;

/// W and b in the accumulation type, and one chunk's buffers; computes Z_c
/// over the chunk's scored rows only (compact: prompt and padding rows are
/// never read, so a NaN there cannot reach a gradient, and cost no GEMM work).
template <class T>
class ChunkEngine {
 public:
  using Acc = accumulator_t<T>;

  ChunkEngine(const LinearHead<T>& head, index_t chunk_rows, const ExecutionPolicy& exec,
              const LogitTransform& transform, bool bf16_gemm)
      : head_(head),
        vocab_(head.weight.rows),
        dim_(head.weight.cols),
        chunk_rows_(chunk_rows),
        exec_(exec),
        transform_(transform),
        bf16_gemm_(bf16_gemm) {
    const auto rows_by_dim = static_cast<size_t>(chunk_rows_ * dim_);
    if (bf16_gemm_) {  // W read in place; the chunk's hidden rows kept in bfloat16
      hidden_bf16_ = ScratchArray<Eigen::bfloat16>(Slot::hidden_bf16, rows_by_dim);
      hidden_ = ScratchArray<Acc>(Slot::hidden, rows_by_dim);  // dH of the chunk's rows
    } else if (!std::is_same<T, Acc>::value) {
      // Not kept between calls: V × D fp32 could be gigabytes held per thread.
      weight_copy_ = ScratchArray<Acc>(Slot::none, static_cast<size_t>(vocab_ * dim_));
      parallel_for(vocab_, exec_, [&](index_t b, index_t e) {
        for (index_t v = b; v < e; ++v)
          widen(head.weight.row(v), dim_, weight_copy_.data() + v * dim_);
      });
    }
    if (head.bias.size > 0) {
      bias_.resize(static_cast<size_t>(vocab_));
      widen(head.bias.data, vocab_, bias_.data());
    }
    if (!bf16_gemm_) hidden_ = ScratchArray<Acc>(Slot::hidden, rows_by_dim);
    logits_ = ScratchArray<Acc>(Slot::logits, static_cast<size_t>(chunk_rows_ * vocab_));
    rows_.reserve(static_cast<size_t>(chunk_rows_));
  }

  /// Bytes this engine holds: independent of the number of rows.
  size_t allocated_bytes() const {
    return sizeof(Acc) * (weight_copy_.size() + bias_.size() + hidden_.size() + logits_.size()) +
           sizeof(Eigen::bfloat16) * hidden_bf16_.size();
  }
  index_t chunk_rows() const { return chunk_rows_; }
  index_t vocab() const { return vocab_; }

  ConstMatrixMap<Acc> weight() const {
    if constexpr (std::is_same<T, Acc>::value) {
      return ConstMatrixMap<Acc>(head_.weight.data, vocab_, dim_,
                                 Eigen::OuterStride<>(head_.weight.stride));
    } else {
      return ConstMatrixMap<Acc>(weight_copy_.data(), vocab_, dim_, Eigen::OuterStride<>(dim_));
    }
  }
  MatrixMap<Acc> hidden_chunk(index_t n) {
    return MatrixMap<Acc>(hidden_.data(), n, dim_, Eigen::OuterStride<>(dim_));
  }
  MatrixMap<Acc> logits_chunk(index_t n) {
    return MatrixMap<Acc>(logits_.data(), n, vocab_, Eigen::OuterStride<>(vocab_));
  }
  Acc* logits_row(index_t k) { return logits_.data() + k * vocab_; }

  /// Z_c = H Wᵀ + b over the scored rows of [r0, r0 + n), split over vocab columns.
  void compute(const MatrixView<const T>& hidden, const RowScorer& scorer, index_t r0, index_t n) {
    rows_.clear();
    for (index_t r = r0; r < r0 + n; ++r)
      if (scorer.target(r) != scorer.ignore) rows_.push_back(r);
    const auto m = static_cast<index_t>(rows_.size());
    if constexpr (std::is_same<T, Eigen::bfloat16>::value) {
      if (bf16_gemm_) {
        for (index_t k = 0; k < m; ++k)
          std::copy(hidden.row(rows_[k]), hidden.row(rows_[k]) + dim_,
                    hidden_bf16_.data() + k * dim_);
        if (m == 0) return;
        auto z = logits_chunk(m);
        const MatrixView<const T>& w = head_.weight;
        parallel_tiles(vocab_, kVocabTile, exec_, [&](index_t b, index_t e) {
          // Z[:, b:e) = H · W[b:e)ᵀ: B(k = c, n = v) = W[b + v][c].
          gemm_bf16(m, e - b, dim_, GemmOperand<T>{hidden_bf16_.data(), dim_, 1},
                    GemmOperand<T>{w.row(b), 1, w.stride}, logits_.data() + b, vocab_, false);
          add_bias(z, b, e);
        });
        return;
      }
    }
    for (index_t k = 0; k < m; ++k) widen(hidden.row(rows_[k]), dim_, hidden_.data() + k * dim_);
    if (m == 0) return;
    auto h = hidden_chunk(m);
    auto z = logits_chunk(m);
    const auto w = weight();
    parallel_tiles(vocab_, kVocabTile, exec_, [&](index_t b, index_t e) {
      z.middleCols(b, e - b).noalias() = h * w.middleRows(b, e - b).transpose();
      add_bias(z, b, e);
    });
  }

  /// Z[:, b:e) += bias[b:e), when the head has a bias.
  void add_bias(MatrixMap<Acc>& z, index_t b, index_t e) const {
    if (bias_.empty()) return;
    const Eigen::Map<const Eigen::Matrix<Acc, 1, Eigen::Dynamic>> bias(bias_.data() + b, e - b);
    z.middleCols(b, e - b).rowwise() += bias;
  }

  /// The slice's partial of each row of [r0, r0 + n) (unscored rows: {0, 0}, never read);
  /// with `statistics`, each scored row's token statistics from the same read.
  void partials(const RowScorer& scorer, index_t r0, index_t n, RowPartial<Acc>* out,
                TokenStatistics<Acc>* statistics = nullptr) {
    for (index_t i = 0; i < n; ++i) out[i] = {Acc(0), Acc(0)};
    const index_t begin = head_.vocab_begin;
    parallel_for(static_cast<index_t>(rows_.size()), exec_, [&](index_t b, index_t e) {
      for (index_t k = b; k < e; ++k) {
        const index_t r = rows_[static_cast<size_t>(k)];
        const index_t t = scorer.target(r);
        const Acc* z = logits_row(k);
        const RowStats<Acc> st =
            statistics ? row_stats<Acc, Acc>(z, vocab_, 0, statistics[r - r0], transform_)
                       : row_stats<Acc, Acc>(z, vocab_, 0, transform_);
        const bool owned = t >= begin && t < begin + vocab_;
        out[r - r0] = {st.lse, owned ? transform_logit(z[t - begin], transform_) : Acc(0)};
      }
    });
  }

  /// dZ_c in place from lse_r and the row scales g_s c_r, then the gradient
  /// products of the chunk computed last: dW and db added to, dH written on
  /// the scored rows (the caller zeroed the rest).
  void backward(const RowScorer& scorer, const Acc* row_lse, const Acc* row_scale,
                const LinearGradients<Acc>& grads) {
    const index_t begin = head_.vocab_begin;
    const auto m = static_cast<index_t>(rows_.size());
    if (m == 0) return;
    parallel_for(m, exec_, [&](index_t b, index_t e) {
      for (index_t k = b; k < e; ++k) {
        const index_t r = rows_[static_cast<size_t>(k)];
        const index_t t = scorer.target(r);
        Acc* z = logits_row(k);
        if (row_scale[r] == Acc(0)) {
          zero_row(z, vocab_);
          continue;
        }
        const index_t local = t >= begin && t < begin + vocab_ ? t - begin : -1;
        row_gradient<Acc, Acc>(z, vocab_, local, row_lse[r], row_scale[r], z, transform_);
      }
    });
    const auto g = logits_chunk(m);
    auto h = hidden_chunk(m);
    // A frozen head (empty d_weight, d_bias): no dW GEMM, no db sum; dH alone.
    const bool weight_grad = grads.wants_weight(), head_grad = weight_grad || grads.wants_bias();
    MatrixMap<Acc> dw(grads.d_weight.data, weight_grad ? vocab_ : 0, dim_,
                      Eigen::OuterStride<>(std::max<index_t>(grads.d_weight.stride, 1)));
    auto add_bias_gradient = [&](index_t b, index_t e) {
      if (grads.wants_bias()) {  // row by row: no reduction whose order alignment could change
        Eigen::Map<Eigen::Matrix<Acc, 1, Eigen::Dynamic>> db(grads.d_bias.data + b, e - b);
        for (index_t i = 0; i < m; ++i) db += g.row(i).segment(b, e - b);
      }
    };
    if constexpr (std::is_same<T, Eigen::bfloat16>::value) {
      if (bf16_gemm_) {
        // G stays fp32, split hi + lo by the GEMM (gemm_bf16.hpp): ~16 mantissa bits.
        const MatrixView<const T>& w = head_.weight;
        if (head_grad)
          parallel_tiles(vocab_, kVocabTile, exec_, [&](index_t b, index_t e) {
            // dW[b:e) += G[:, b:e)ᵀ · H.
            if (weight_grad)
              gemm_bf16(e - b, dim_, m, GemmOperand<float>{logits_.data() + b, 1, vocab_},
                        GemmOperand<T>{hidden_bf16_.data(), dim_, 1}, grads.d_weight.row(b),
                        grads.d_weight.stride, true);
            add_bias_gradient(b, e);
          });
        // dH = G · W, rows split over threads: each call packs W once for all its rows.
        parallel_for(m, exec_, [&](index_t b, index_t e) {
          gemm_bf16(e - b, dim_, vocab_, GemmOperand<float>{logits_.data() + b * vocab_, vocab_, 1},
                    GemmOperand<T>{w.data, w.stride, 1}, hidden_.data() + b * dim_, dim_, false);
        });
        scatter_hidden_gradient(m, grads);
        return;
      }
    }
    const auto w = weight();
    if (head_grad)
      parallel_tiles(vocab_, kVocabTile, exec_, [&](index_t b, index_t e) {
        if (weight_grad)
          dw.middleRows(b, e - b).noalias() += g.middleCols(b, e - b).transpose() * h;
        add_bias_gradient(b, e);
      });
    // dH of the scored rows, into the hidden buffer (read for the last time above), then out.
    parallel_tiles(m, kRowTile, exec_, [&](index_t b, index_t e) {
      h.middleRows(b, e - b).noalias() = g.middleRows(b, e - b) * w;
    });
    scatter_hidden_gradient(m, grads);
  }

  /// dH of the chunk's scored rows (in the hidden buffer) to their rows of d_hidden.
  void scatter_hidden_gradient(index_t m, const LinearGradients<Acc>& grads) {
    for (index_t k = 0; k < m; ++k)
      std::copy(hidden_.data() + k * dim_, hidden_.data() + (k + 1) * dim_,
                grads.d_hidden.row(rows_[static_cast<size_t>(k)]));
  }

 private:
  const LinearHead<T>& head_;
  index_t vocab_, dim_, chunk_rows_;
  ExecutionPolicy exec_;
  LogitTransform transform_;
  bool bf16_gemm_;
  // The large buffers: this thread's, kept between calls (scratch.hpp); 64-byte aligned, the
  // same alignment every run, so the same Eigen code paths and bits.
  ScratchArray<Acc> weight_copy_, hidden_, logits_;
  ScratchArray<Eigen::bfloat16> hidden_bf16_;  ///< with bf16_gemm_: the chunk's scored rows
  std::vector<Acc, Eigen::aligned_allocator<Acc>> bias_;
  std::vector<index_t> rows_;  ///< the chunk's scored rows, in order
};

/// Rows of one chunk: what chunk_bytes holds, at most the larger batch.
template <class T>
index_t chunk_rows_of(const LinearHead<T>& head, const FusedLinearConfig& cfg, index_t max_rows) {
  // A row's logits and hidden state in the accumulation type (with gemm_bf16: its dH in
  // fp32 and its hidden state in bfloat16).
  size_t per_row =
      sizeof(accumulator_t<T>) * static_cast<size_t>(head.weight.rows + head.weight.cols);
  if (uses_bf16_gemm<T>(cfg)) per_row += sizeof(Eigen::bfloat16) * head.weight.cols;
  return chunk_rows_for_budget(cfg.chunk_bytes, per_row, max_rows);
}

/// The engine of a call, or kto::Error when its buffers do not fit in memory.
template <class T>
ChunkEngine<T> make_engine(const LinearHead<T>& head, const FusedLinearConfig& cfg,
                           index_t max_rows, const ExecutionPolicy& exec, const Options& o,
                           const char* fn) {
  const index_t rows = chunk_rows_of(head, cfg, max_rows);
  try {
    return ChunkEngine<T>(head, rows, exec, logit_transform(o), uses_bf16_gemm<T>(cfg));
  } catch (const std::bad_alloc&) {
    kto::detail::fail(fn, "config.chunk_bytes",
                      "leave room for the chunk buffers (" + std::to_string(rows) +
                          " rows of logits and hidden states) and the weight copy",
                      "an allocation failure");
  } catch (const std::length_error&) {
    kto::detail::fail(fn, "config.chunk_bytes", "give buffers a std::vector can hold",
                      "a length error");
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace kto
