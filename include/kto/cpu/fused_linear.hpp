// cpu/fused_linear.hpp — the KTO step from hidden states and the lm_head, on the CPU.
//
// Chunks of rows go through GEMMs around the row kernels of row_kernels.hpp
// (see ../fused_linear.hpp for the order of work):
//
//   keep_chunk  Z_c computed once: forward, g_s, dZ_c in place, two GEMMs.
//               3 GEMMs a row; chunks hold whole sequences.
//   recompute   forward over every chunk keeping lse_r, then the finish, then
//               Z_c recomputed for the backward (Cut Cross-Entropy's way).
//               4 GEMMs a row; chunks need not follow sequences. The
//               vocab-parallel step always runs this way: the all-gather of
//               the row partials sits between its forward and backward.
//
// Memory: one chunk of logits and hidden rows (config.chunk_bytes; the
// calling thread keeps it between calls, scratch.hpp), an fp32 copy of b, and
// of W when it is half (or bfloat16 widened), plus O(rows) scalars — never
// N × V. GEMMs: bfloat16 heads multiply their bf16 values exactly with fp32
// accumulation (gemm_bf16.hpp, AVX512-BF16; dZ split into bf16 hi + lo for
// the gradients), reading W in place; other types, or CPUs without the
// instruction, run Eigen in the accumulation type (fp32, fp64 for double) on
// exactly widened inputs. Work is split over threads in fixed tiles of output
// rows or vocab columns, so the bits do not depend on the thread count.
// Gradients are written (not accumulated) in the accumulation type: dH for
// every row (zero on unscored ones), dW and db for this rank's vocab slice.
//
// Frozen head (LoRA): an empty grads.d_weight (data == nullptr, zero rows) and
// an empty grads.d_bias skip dW and db: no GEMM for them, no V × D buffer for
// the caller to hold, and dH, the loss, the metrics and the per-example
// outputs bit for bit those of the run that asks for dW (the dH product never
// reads dW's). The step is then 2 GEMMs a row (keep_chunk) or 3 (recompute).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "../finish.hpp"
#include "../fused_linear.hpp"
#include "gemm_bf16.hpp"
#include "kto_step.hpp"
#include "parallel.hpp"
#include "row_kernels.hpp"
#include "scratch.hpp"
#include "sequence_logprobs.hpp"

namespace kto {
namespace cpu {

using kto::FusedStrategy;

struct FusedLinearConfig {
  /// Budget for one chunk: its logits and hidden rows in the accumulation type.
  size_t chunk_bytes = kDefaultCpuChunkBytes;
  FusedStrategy strategy = FusedStrategy::keep_chunk;
  /// bfloat16 heads: multiply in bfloat16 with fp32 accumulation (gemm_bf16.hpp)
  /// where the CPU has AVX512-BF16; false widens H and W to fp32 first.
  bool bf16_gemm = true;
};

/// Whether a step over T multiplies with gemm_bf16 (else: Eigen, in fp32).
template <class T>
bool uses_bf16_gemm(const FusedLinearConfig& cfg) {
  return std::is_same<T, Eigen::bfloat16>::value && cfg.bf16_gemm && bf16_gemm_supported();
}

template <class Acc>
struct LinearGradients {
  MatrixView<Acc> d_hidden;  ///< rows × D (a partial sum over slices when sharded)
  /// V_local × D, or empty (data == nullptr, 0 rows: a frozen head) to skip dW.
  MatrixView<Acc> d_weight;
  Span<Acc> d_bias;  ///< V_local entries, or empty to skip
  bool wants_weight() const { return d_weight.rows > 0; }
  bool wants_bias() const { return d_bias.size > 0; }
};

template <class T>
struct FusedLinearInputs {
  using Acc = accumulator_t<T>;
  MatrixView<const T> hidden;         ///< N × D, policy model, target batch
  TargetsView targets;                ///< N global token ids (or ignore_index)
  SequencesView sequences;            ///< B ≥ 1 examples over the N rows (host offsets)
  ReferenceLogp<Acc> reference_logp;  ///< B, kto::reference_logp(...)
  Span<const std::uint8_t> desirable;
  /// KL batch, forward only; used when options.reference_point is kl_batch.
  struct Kl {
    MatrixView<const T> hidden;
    TargetsView targets;
    SequencesView sequences;
    ReferenceLogp<Acc> reference_logp;
  } kl;
};

/// Gathers every rank's row partials, rank-major (rank k's row r at k·n + r).
template <class Acc>
using RowPartialsAllGather = std::function<void(const std::vector<RowPartial<Acc>>& local,
                                                std::vector<RowPartial<Acc>>& all)>;

template <class Acc>
struct FusedLinearHooks {
  KlAllReduce kl_all_reduce;                  ///< data parallel: sums (S, C) over ranks
  RowPartialsAllGather<Acc> gather_partials;  ///< vocab parallel: set when W is sharded
};

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

/// Names the input that made row r of `hidden` non-finite: the hidden row, a
/// weight or bias element, or finite inputs whose logits overflow; throws.
template <class T>
[[noreturn]] void throw_non_finite_row(const char* fn, const std::string& hidden_name,
                                       const MatrixView<const T>& hidden, const LinearHead<T>& head,
                                       index_t s, index_t r, double lse, double target_logit,
                                       index_t target) {
  std::string argument = hidden_name;
  std::ostringstream cause;
  const index_t D = head.weight.cols;
  if (const index_t c = first_non_finite(hidden.row(r), D); c >= 0) {
    cause << hidden_name << "[" << r << ", " << c << "] is "
          << static_cast<double>(hidden.row(r)[c]);
  } else {
    index_t v = 0, c2 = -1;
    for (; v < head.weight.rows && c2 < 0; ++v) c2 = first_non_finite(head.weight.row(v), D);
    const index_t b = first_non_finite(head.bias.data, head.bias.size);
    if (c2 >= 0) {
      argument = "head.weight";
      cause << "head.weight[" << v - 1 << ", " << c2 << "] is "
            << static_cast<double>(head.weight.row(v - 1)[c2]);
    } else if (b >= 0) {
      argument = "head.bias";
      cause << "head.bias[" << b << "] is " << static_cast<double>(head.bias.data[b]);
    } else {
      cause << "every input is finite, but the logits overflow the accumulation type";
    }
  }
  std::ostringstream os;
  os << fn << ": argument '" << argument
     << "' must give finite logits on scored rows; got lse = " << lse
     << ", target logit = " << target_logit << " (target " << target << ") in sequence " << s
     << ", row " << r << " of " << hidden_name << ": " << cause.str();
  throw NonFiniteLogitsError(fn, argument, s, r, os.str());
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

/// One batch of hidden states, and the name its errors use.
template <class T>
struct HiddenBatch {
  const MatrixView<const T>& hidden;
  const TargetsView& targets;
  const SequencesView& sequences;
  const char* name;  ///< "hidden" or "kl.hidden"
};

/// logp_s and n_s from the merged partials of its rows (row order, double);
/// notes lse_r for the backward. Non-finite rows raise NonFiniteLogitsError
/// naming the input that caused them.
template <class T, class Acc = accumulator_t<T>>
void sequence_from_partials(const RowPartial<Acc>* rows, const RowScorer& scorer,
                            const HiddenBatch<T>& batch, const LinearHead<T>& head, index_t s,
                            const Options& o, const char* fn, Acc* row_lse, Acc& logp,
                            index_t& count) {
  double sum = 0.0;
  count = 0;
  for (index_t r = batch.sequences.begin(s); r < batch.sequences.end(s); ++r) {
    const index_t t = scorer.target(r);
    if (t == o.ignore_index) continue;
    const RowPartial<Acc> p = rows[r];
    const Acc lp = p.target_logit - p.lse;
    if (!(std::isfinite(p.lse) && std::isfinite(lp)))
      throw_non_finite_row(fn, batch.name, batch.hidden, head, s, r, p.lse, p.target_logit, t);
    row_lse[r] = p.lse;
    sum += static_cast<double>(lp);
    ++count;
  }
  if (o.average_logprob && count > 0) sum /= static_cast<double>(count);
  logp = static_cast<Acc>(sum);
  if (!(std::fabs(static_cast<double>(logp)) <= kto::detail::kMaxLogprob))
    throw_sequence_overflow(fn, batch.name, s, batch.sequences.begin(s), sum);
}

/// Per-sequence forward of a whole batch from its merged row partials.
template <class T, class Acc = accumulator_t<T>>
SequenceForward<Acc> sequences_from_partials(const std::vector<RowPartial<Acc>>& rows,
                                             const HiddenBatch<T>& batch, const LinearHead<T>& head,
                                             const Options& o, const char* fn) {
  SequenceForward<Acc> out;
  const RowScorer scorer(batch.targets, batch.sequences, o.ignore_index);
  out.row_lse.assign(rows.size(), Acc(0));
  out.logp.assign(static_cast<size_t>(batch.sequences.count), Acc(0));
  out.num_tokens.assign(static_cast<size_t>(batch.sequences.count), 0);
  for (index_t s = 0; s < batch.sequences.count; ++s)
    sequence_from_partials(rows.data(), scorer, batch, head, s, o, fn, out.row_lse.data(),
                           out.logp[static_cast<size_t>(s)],
                           out.num_tokens[static_cast<size_t>(s)]);
  return out;
}

template <class T>
void validate_hidden_batch(const HiddenBatch<T>& batch, const LinearHead<T>& head, const Options& o,
                           const char* fn, const std::string& prefix, bool allow_empty) {
  // An absent batch (default-constructed views: no rows, no offsets) is an empty one.
  if (allow_empty && batch.hidden.rows == 0 && batch.targets.rows.rows == 0 &&
      batch.sequences.count == 0 && batch.sequences.offsets == nullptr)
    return;
  kto::detail::validate_matrix(batch.hidden, fn, prefix + "hidden");
  kto::detail::require(
      batch.hidden.cols == head.weight.cols || batch.hidden.rows == 0, fn, prefix + "hidden.cols",
      "equal head.weight.cols (" + std::to_string(head.weight.cols) + ")", batch.hidden.cols);
  validate_options(o, fn);
  kto::detail::validate_targets(batch.targets, batch.hidden.rows, fn, prefix + "targets");
  kto::detail::validate_sequences(batch.sequences, batch.hidden.rows, fn, prefix + "sequences",
                                  allow_empty);
  kto::detail::validate_target_ids(batch.targets, batch.sequences, head.total_vocab(),
                                   o.ignore_index, fn, prefix + "targets");
  // Scored rows must be finite: found here, before anything is written (and,
  // in data parallel, before the collective), never as a NaN gradient.
  const RowScorer scorer(batch.targets, batch.sequences, o.ignore_index);
  for (index_t r = scorer.first; r < scorer.last; ++r) {
    if (scorer.target(r) == o.ignore_index) continue;
    const index_t c = first_non_finite(batch.hidden.row(r), batch.hidden.cols);
    if (c < 0) continue;
    const index_t s = sequence_of_row(batch.sequences, r);
    std::ostringstream os;
    os << fn << ": argument '" << batch.name << "' must be finite on scored rows; got "
       << static_cast<double>(batch.hidden.row(r)[c]) << " at " << batch.name << "[" << r << ", "
       << c << "] in sequence " << s << ", row " << r;
    throw NonFiniteLogitsError(fn, batch.name, s, r, os.str());
  }
}

/// Row partials of every row of a batch, chunk by chunk (forward only); with
/// `statistics` (one per row), the scored rows' token statistics too.
template <class T>
std::vector<RowPartial<accumulator_t<T>>> batch_partials(
    ChunkEngine<T>& engine, const MatrixView<const T>& hidden, const RowScorer& scorer,
    TokenStatistics<accumulator_t<T>>* statistics = nullptr) {
  std::vector<RowPartial<accumulator_t<T>>> out(static_cast<size_t>(hidden.rows),
                                                {accumulator_t<T>(0), accumulator_t<T>(0)});
  for (index_t r0 = scorer.first; r0 < scorer.last; r0 += engine.chunk_rows()) {
    const index_t n = std::min(engine.chunk_rows(), scorer.last - r0);
    engine.compute(hidden, scorer, r0, n);
    engine.partials(scorer, r0, n, out.data() + r0, statistics ? statistics + r0 : nullptr);
  }
  return out;
}

/// g_s c_r on the scored rows of sequences [first, last).
template <class Acc>
void set_row_scales(const RowScorer& scorer, const SequencesView& seqs, index_t first, index_t last,
                    const std::vector<Acc>& grad_logp, const std::vector<index_t>& tokens,
                    const Options& o, std::vector<Acc>& scale) {
  for (index_t s = first; s < last; ++s) {
    const Acc v =
        static_cast<Acc>(token_scale(static_cast<double>(grad_logp[static_cast<size_t>(s)]),
                                     tokens[static_cast<size_t>(s)], o.average_logprob));
    for (index_t r = seqs.begin(s); r < seqs.end(s); ++r)
      if (scorer.target(r) != o.ignore_index) scale[static_cast<size_t>(r)] = v;
  }
}

/// Per-row token statistics of a batch (Options::token_statistics), or none.
template <class Acc>
std::vector<TokenStatistics<Acc>> row_statistics_of(const Options& o, index_t rows) {
  return o.token_statistics
             ? std::vector<TokenStatistics<Acc>>(static_cast<size_t>(rows), {Acc(0), Acc(0)})
             : std::vector<TokenStatistics<Acc>>();
}

template <class Acc>
SequenceTokenStatistics sequence_statistics_of(const std::vector<TokenStatistics<Acc>>& rows,
                                               const RowScorer& scorer,
                                               const SequencesView& sequences) {
  if (rows.empty()) return {};
  return kto::detail::sum_token_statistics(
      rows, sequences, [&](index_t r) { return scorer.target(r) != scorer.ignore; });
}

/// Finite inputs can still overflow a gradient product (hidden states or
/// weights near the accumulation type's largest value): raised, never returned.
template <class Acc>
void require_finite_gradients(const LinearGradients<Acc>& g, index_t rows, const char* fn) {
  auto check = [&](const MatrixView<Acc>& m, index_t n, const char* name) {
    for (index_t r = 0; r < n; ++r) {
      const index_t c = first_non_finite(m.row(r), m.cols);
      if (c >= 0)
        kto::detail::fail(fn, name,
                          "come out finite (hidden states and weights small enough for the "
                          "accumulation type)",
                          std::to_string(static_cast<double>(m.row(r)[c])) + " at [" +
                              std::to_string(r) + ", " + std::to_string(c) + "]");
    }
  };
  check(g.d_weight, g.d_weight.rows, "grads.d_weight");  // none for a frozen head
  check(g.d_hidden, rows, "grads.d_hidden");
  const index_t b = first_non_finite(g.d_bias.data, g.d_bias.size);
  if (b >= 0)
    kto::detail::fail(fn, "grads.d_bias", "come out finite", static_cast<double>(g.d_bias.data[b]));
}

/// The largest |x| over the finite values of n elements (a non-finite one is the
/// forward's to report, with its row), 0 for none.
template <class T>
double finite_abs_max(const T* x, index_t n) {
  double m = 0.0;
  for (index_t i = 0; i < n; ++i) {
    const double a = std::fabs(static_cast<double>(x[i]));
    if (a > m && std::isfinite(a)) m = a;
  }
  return m;
}

/// Refuses, before the collective, a step whose gradients could overflow the
/// accumulation type for some z0 (they are computed after it, once z0 is known).
/// With G_r = max|g_s| c_r |a| / τ on the scored rows of sequence s
/// (grad_logp_bound(): any z0), every element of dZ is at most G_r and a row of dZ
/// sums to at most 2 G_r in magnitude, so
///   |dW[v, k]| <= Σ_r G_r |H[r, k]|,  |dH[r, k]| <= 2 G_r max_v |W[v, k]|,
///   |db[v]| <= Σ_r G_r.
/// Each bound must stay under a quarter of the type's largest value (room for the
/// rounding of fp32 sums). W is read only when its type's range could break the
/// bound (never for half; for fp32 and bfloat16 only with a large G_r). Only the
/// gradients the caller asks for are bounded (a frozen head: dH alone, and every
/// G_r, an element of dZ, under the limit).
template <class T>
void check_gradient_bounds(const HiddenBatch<T>& batch, const LinearHead<T>& head,
                           Span<const std::uint8_t> desirable, const Options& o,
                           const ExecutionPolicy& exec, const char* fn, bool weight_grad = true,
                           bool bias_grad = true) {
  using Acc = accumulator_t<T>;
  const double limit = static_cast<double>(std::numeric_limits<Acc>::max()) / 4;
  const index_t B = batch.sequences.count;
  const RowScorer scorer(batch.targets, batch.sequences, o.ignore_index);
  const double reduction = reduction_scale(o, B);
  const double derivative = logit_transform(o).max_derivative();
  std::vector<double> row_bound(static_cast<size_t>(batch.hidden.rows), 0.0);  // G_r
  double largest = 0.0, bias_sum = 0.0;
  for (index_t s = 0; s < B; ++s) {
    index_t n = 0;
    for (index_t r = batch.sequences.begin(s); r < batch.sequences.end(s); ++r)
      n += scorer.target(r) != o.ignore_index;
    if (n == 0) continue;
    const double g =
        token_scale(grad_logp_bound(desirable[s] != 0, o, reduction), n, o.average_logprob) *
        derivative;
    for (index_t r = batch.sequences.begin(s); r < batch.sequences.end(s); ++r)
      if (scorer.target(r) != o.ignore_index) row_bound[static_cast<size_t>(r)] = g;
    largest = std::max(largest, g);
    bias_sum += g * static_cast<double>(n);
  }
  // |g_s c_r| |a| / τ is at most G_r = λβ max|f'| c_r |a| / (τ B) for any z0.
  auto refuse = [&](const char* argument, const char* gradient, const char* bound_text,
                    double bound, const std::string& got, const char* lower) {
    std::ostringstream expectation;
    expectation << "keep " << gradient << " within " << logit_type_name<Acc>()
                << " whatever z0: its bound, " << bound_text
                << " with G_r = lambda*beta*max|f'|*c_r*|a|/tau/B, is " << bound << ", past "
                << limit << " (lower options.beta or the weights, or " << lower << ")";
    kto::detail::fail(fn, argument, expectation.str(), got);
  };
  if (bias_grad && bias_sum > limit) {
    std::ostringstream got;
    got << o.beta;
    refuse("options.beta", "grads.d_bias", "the sum over scored rows of G_r", bias_sum, got.str(),
           "give fewer rows");
  }
  if (!bias_grad && largest > limit) {  // with db, implied by the bound above
    std::ostringstream got;
    got << o.beta;
    refuse("options.beta", "dL/dlogits", "max_r G_r", largest, got.str(), "the logit scale");
  }
  // dW: Σ_r G_r max_k |H[r, k]| (the scored rows are finite: validate_hidden_batch).
  if (weight_grad && bias_sum * static_cast<double>(std::numeric_limits<T>::max()) > limit) {
    std::vector<double> row_max(static_cast<size_t>(batch.hidden.rows), 0.0);
    parallel_for(scorer.last - scorer.first, exec, [&](index_t b, index_t e) {
      for (index_t r = scorer.first + b; r < scorer.first + e; ++r)
        if (row_bound[static_cast<size_t>(r)] > 0.0)
          row_max[static_cast<size_t>(r)] = finite_abs_max(batch.hidden.row(r), batch.hidden.cols);
    });
    double sum = 0.0, hidden_max = 0.0;
    for (index_t r = scorer.first; r < scorer.last; ++r) {
      sum += row_bound[static_cast<size_t>(r)] * row_max[static_cast<size_t>(r)];
      hidden_max = std::max(hidden_max, row_max[static_cast<size_t>(r)]);
    }
    if (sum > limit) {
      std::ostringstream got;
      got << "scored hidden states up to " << hidden_max << " in magnitude";
      refuse(batch.name, "grads.d_weight", "the sum over scored rows r of G_r max|hidden[r, :]|",
             sum, got.str(), "the scale of the hidden states");
    }
  }
  // dH: 2 max_r G_r max |W|.
  if (2.0 * largest * static_cast<double>(std::numeric_limits<T>::max()) > limit) {
    const index_t V = head.weight.rows;
    std::vector<double> row_max(static_cast<size_t>(V), 0.0);
    parallel_for(V, exec, [&](index_t b, index_t e) {
      for (index_t v = b; v < e; ++v)
        row_max[static_cast<size_t>(v)] = finite_abs_max(head.weight.row(v), head.weight.cols);
    });
    const double weight_max =
        row_max.empty() ? 0.0 : *std::max_element(row_max.begin(), row_max.end());
    if (2.0 * largest * weight_max > limit) {
      std::ostringstream got;
      got << "weights up to " << weight_max << " in magnitude";
      refuse("head.weight", "grads.d_hidden", "2 max_r G_r max|head.weight|",
             2.0 * largest * weight_max, got.str(), "the scale of the weight");
    }
  }
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

/// Bytes the step allocates besides O(rows) scalars: the chunk buffers (at
/// most `max_rows` rows; the default is the budget alone) and, for
/// half/bfloat16 widened to fp32, the fp32 copy of W and b (none with
/// gemm_bf16: W is read in place). Independent of the row count.
template <class T>
size_t fused_linear_workspace_bytes(const LinearHead<T>& head, const FusedLinearConfig& cfg,
                                    index_t max_rows = std::numeric_limits<index_t>::max()) {
  using Acc = accumulator_t<T>;
  const auto rows = static_cast<size_t>(detail::chunk_rows_of(head, cfg, max_rows));
  const auto v = static_cast<size_t>(head.weight.rows), d = static_cast<size_t>(head.weight.cols);
  size_t bytes = sizeof(Acc) * rows * (v + d);
  if (uses_bf16_gemm<T>(cfg))
    bytes += sizeof(Eigen::bfloat16) * rows * d;
  else if (!std::is_same<T, Acc>::value)
    bytes += sizeof(Acc) * v * d;
  if (head.bias.size > 0) bytes += sizeof(Acc) * v;
  return bytes;
}

/// Forward only: logp_s and n_s of a batch from its hidden states (the
/// reference model's log-probs, or a KL batch's), chunk by chunk. Unsharded heads.
template <class T>
SequenceForward<accumulator_t<T>> fused_linear_logprobs(const MatrixView<const T>& hidden,
                                                        const TargetsView& targets,
                                                        const SequencesView& sequences,
                                                        const LinearHead<T>& head, const Options& o,
                                                        const FusedLinearConfig& cfg = {},
                                                        const ExecutionPolicy& exec = {}) {
  const char* fn = "kto::cpu::fused_linear_logprobs";
  validate_options(o, fn);
  kto::detail::validate_head(head, fn);
  kto::detail::require(!head.sharded(), fn, "head.vocab_total",
                       "equal head.weight.rows (merge slices with fused_linear_kto_step)",
                       head.vocab_total);
  const detail::HiddenBatch<T> batch{hidden, targets, sequences, "hidden"};
  detail::validate_hidden_batch(batch, head, o, fn, "", true);
  detail::ChunkEngine<T> engine = detail::make_engine(head, cfg, hidden.rows, exec, o, fn);
  const detail::RowScorer scorer(targets, sequences, o.ignore_index);
  auto statistics = detail::row_statistics_of<accumulator_t<T>>(o, hidden.rows);
  auto out = detail::sequences_from_partials(
      detail::batch_partials(engine, hidden, scorer,
                             statistics.empty() ? nullptr : statistics.data()),
      batch, head, o, fn);
  out.token_statistics = detail::sequence_statistics_of(statistics, scorer, sequences);
  return out;
}

namespace detail {

/// fused_linear_row_partials() as called by the public entry point `fn`.
template <class T>
std::vector<RowPartial<accumulator_t<T>>> row_partials_impl(
    const FusedLinearInputs<T>& in, const LinearHead<T>& head, const Options& o,
    const FusedLinearConfig& cfg, const ExecutionPolicy& exec, const char* fn) {
  validate_options(o, fn);
  kto::detail::validate_head(head, fn);
  kto::detail::require(cfg.chunk_bytes > 0, fn, "config.chunk_bytes", "be > 0",
                       static_cast<index_t>(cfg.chunk_bytes));
  kto::detail::require(!o.token_statistics, fn, "options.token_statistics",
                       "be false for row partials (they carry no entropy)", "true");
  const HiddenBatch<T> target{in.hidden, in.targets, in.sequences, "hidden"};
  const HiddenBatch<T> kl{in.kl.hidden, in.kl.targets, in.kl.sequences, "kl.hidden"};
  validate_hidden_batch(target, head, o, fn, "", true);
  validate_hidden_batch(kl, head, o, fn, "kl.", true);
  ChunkEngine<T> engine =
      make_engine(head, cfg, std::max(in.hidden.rows, in.kl.hidden.rows), exec, o, fn);
  auto rows = batch_partials(engine, in.kl.hidden,
                             RowScorer(in.kl.targets, in.kl.sequences, o.ignore_index));
  const auto t =
      batch_partials(engine, in.hidden, RowScorer(in.targets, in.sequences, o.ignore_index));
  rows.insert(rows.end(), t.begin(), t.end());
  return rows;
}

}  // namespace detail

/// Vocab parallel, for a caller that gathers the slices' partials itself (a JAX
/// all_gather, MPI_Allgather): this slice's RowPartial of every row of the KL
/// batch, then of the target batch ({0, 0} on unscored rows: never read), forward only —
/// what fused_linear_kto_step hands its hooks.gather_partials. Absent KL views
/// mean no KL rows. Only the batches, the head and the options are read.
template <class T>
std::vector<RowPartial<accumulator_t<T>>> fused_linear_row_partials(
    const FusedLinearInputs<T>& in, const LinearHead<T>& head, const Options& o,
    const FusedLinearConfig& cfg = {}, const ExecutionPolicy& exec = {}) {
  return detail::row_partials_impl(in, head, o, cfg, exec, "kto::cpu::fused_linear_row_partials");
}

/// The whole KTO step from hidden states. Gradients are overwritten. Every
/// argument (and every scored hidden row) is checked before anything is
/// written; with hooks.kl_all_reduce, a failure up to the collective raises
/// on every rank (kl_all_reduce.hpp).
template <class T>
StepResult<accumulator_t<T>> fused_linear_kto_step(
    const FusedLinearInputs<T>& in, const LinearHead<T>& head, const Options& o,
    const LinearGradients<accumulator_t<T>>& grads, const FusedLinearConfig& cfg = {},
    const ExecutionPolicy& exec = {}, const FusedLinearHooks<accumulator_t<T>>& hooks = {}) {
  using Acc = accumulator_t<T>;
  const char* fn = "kto::cpu::fused_linear_kto_step";
  const index_t B = in.sequences.count;
  const bool kl = uses_kl_batch(o);
  const bool sharded = head.sharded();
  const bool recompute_all = sharded || cfg.strategy == FusedStrategy::recompute;
  const detail::HiddenBatch<T> target_batch{in.hidden, in.targets, in.sequences, "hidden"};
  const detail::HiddenBatch<T> kl_batch{in.kl.hidden, in.kl.targets, in.kl.sequences, "kl.hidden"};
  std::unique_ptr<detail::ChunkEngine<T>> engine;
  std::unique_ptr<detail::RowScorer> target_scorer;  // built once the offsets are checked
  std::vector<RowPartial<Acc>> partials;             // KL rows, then (recompute_all) target rows
  index_t kl_rows = 0;
  SequenceForward<Acc> target_fwd;               // recompute_all: found before the collective
  std::vector<TokenStatistics<Acc>> statistics;  // target rows, with options.token_statistics

  auto validate = [&] {
    validate_options(o, fn);
    kto::detail::validate_head(head, fn);
    kto::detail::validate_strategy(cfg.strategy, fn, false);
    kto::detail::require(cfg.chunk_bytes > 0, fn, "config.chunk_bytes", "be > 0",
                         static_cast<index_t>(cfg.chunk_bytes));
    detail::validate_hidden_batch(target_batch, head, o, fn, "", false);
    kto::detail::validate_finish_inputs(B, in.reference_logp, in.desirable, o, fn,
                                        "sequences.count");
    if (kl) {
      detail::validate_hidden_batch(kl_batch, head, o, fn, "kl.", true);
      kto::detail::validate_span(in.kl.reference_logp, in.kl.sequences.count, fn,
                                 "kl.reference_logp");
      kto::detail::validate_finite(in.kl.reference_logp, fn, "kl.reference_logp");
    }
    kto::detail::validate_shape(grads.d_hidden, in.hidden.rows, in.hidden.cols, fn,
                                "grads.d_hidden", "hidden");
    // Empty (data == nullptr, 0 rows): a frozen head, no dW. Any other shape but W's is refused.
    if (grads.d_weight.data != nullptr || grads.d_weight.rows != 0)
      kto::detail::validate_shape(grads.d_weight, head.weight.rows, head.weight.cols, fn,
                                  "grads.d_weight", "head.weight");
    kto::detail::require(
        grads.d_bias.size == 0 || grads.d_bias.size == head.weight.rows, fn, "grads.d_bias.size",
        "be 0 (skipped) or head.weight.rows (" + std::to_string(head.weight.rows) + ")",
        grads.d_bias.size);
    kto::detail::require(grads.d_bias.data != nullptr || grads.d_bias.size == 0, fn,
                         "grads.d_bias.data", "be non-null when size > 0", "nullptr");
    using kto::detail::byte_range;
    const auto offsets_of = [](const SequencesView& s) {
      return Span<const index_t>{s.offsets, s.offsets ? s.count + 1 : 0};
    };
    kto::detail::validate_disjoint(
        {byte_range(grads.d_hidden, "grads.d_hidden"), byte_range(grads.d_weight, "grads.d_weight"),
         byte_range(grads.d_bias, "grads.d_bias")},
        {byte_range(in.hidden, "hidden"), byte_range(head.weight, "head.weight"),
         byte_range(head.bias, "head.bias"), kto::detail::byte_range(in.targets, "targets"),
         byte_range(offsets_of(in.sequences), "sequences.offsets"),
         byte_range(in.reference_logp, "reference_logp"), byte_range(in.desirable, "desirable"),
         byte_range(kl ? in.kl.hidden : MatrixView<const T>{}, "kl.hidden"),
         byte_range(kl ? in.kl.targets : TargetsView{}, "kl.targets"),
         byte_range(kl ? offsets_of(in.kl.sequences) : Span<const index_t>{},
                    "kl.sequences.offsets"),
         byte_range(kl ? Span<const Acc>(in.kl.reference_logp) : Span<const Acc>{},
                    "kl.reference_logp")},
        fn);
    kto::detail::require(!sharded || !o.token_statistics, fn, "options.token_statistics",
                         "be false with a vocabulary slice (the row partials carry no entropy)",
                         "true");
    kto::detail::require(
        !sharded || static_cast<bool>(hooks.gather_partials), fn, "hooks.gather_partials",
        "be set when head.weight holds a vocabulary slice (" + std::to_string(head.weight.rows) +
            " of " + std::to_string(head.total_vocab()) + " rows)",
        "an empty function");
  };

  // Forward-only partials of the KL batch, and, when the vocab is sharded or the
  // strategy is recompute, of the target batch too: one gather serves both.
  auto local_partials = [&] {
    engine = std::make_unique<detail::ChunkEngine<T>>(detail::make_engine(
        head, cfg, std::max(in.hidden.rows, kl ? in.kl.hidden.rows : index_t{0}), exec, o, fn));
    if (kl) {
      const detail::RowScorer kl_scorer(in.kl.targets, in.kl.sequences, o.ignore_index);
      partials = detail::batch_partials(*engine, in.kl.hidden, kl_scorer);
      kl_rows = in.kl.hidden.rows;
    }
    target_scorer = std::make_unique<detail::RowScorer>(in.targets, in.sequences, o.ignore_index);
    statistics = detail::row_statistics_of<Acc>(o, in.hidden.rows);
    if (recompute_all) {
      auto target = detail::batch_partials(*engine, in.hidden, *target_scorer,
                                           statistics.empty() ? nullptr : statistics.data());
      partials.insert(partials.end(), target.begin(), target.end());
    }
  };
  auto merge_gathered = [&] {
    std::vector<RowPartial<Acc>> all;
    hooks.gather_partials(partials, all);
    kto::detail::require(!partials.empty() || all.empty(), fn, "hooks.gather_partials",
                         "return nothing for an empty input", static_cast<index_t>(all.size()));
    const index_t n = static_cast<index_t>(partials.size());
    kto::detail::require(n == 0 || (static_cast<index_t>(all.size()) % n == 0 && !all.empty()), fn,
                         "hooks.gather_partials",
                         "return ranks x " + std::to_string(n) + " partials",
                         static_cast<index_t>(all.size()));
    partials = merge_row_partials(all, n > 0 ? static_cast<index_t>(all.size()) / n : 1);
  };
  // The (merged) partials to sequences; what can still fail here (a non-finite
  // row or sequence log-prob) fails before the collective.
  auto kl_sum_of_partials = [&] {
    if (recompute_all) {
      std::vector<RowPartial<Acc>> target(partials.begin() + kl_rows, partials.end());
      target_fwd = detail::sequences_from_partials(target, target_batch, head, o, fn);
    }
    KlPartial local;
    if (!kl) return local;
    std::vector<RowPartial<Acc>> kl_part(partials.begin(), partials.begin() + kl_rows);
    const SequenceForward<Acc> kl_fwd =
        detail::sequences_from_partials(kl_part, kl_batch, head, o, fn);
    return kto::detail::kl_partial_impl<Acc>(make_span(kl_fwd.logp), in.kl.reference_logp,
                                             make_span(kl_fwd.num_tokens), o, fn);
  };

  // The gradients are computed after the collective (they need z0): whether they can
  // overflow is decided before it, for any z0, after the forward has had its say on
  // non-finite inputs.
  auto checked_kl_sum = [&] {
    const KlPartial local = kl_sum_of_partials();
    detail::check_gradient_bounds(target_batch, head, in.desirable, o, exec, fn,
                                  grads.wants_weight(), grads.wants_bias());
    return local;
  };
  KlPartial kl_sum;
  if (sharded) {
    // The gather is a collective of its own: checks and the local forward run
    // before it (a failure there is not yet carried to the other slices).
    validate();
    local_partials();
    merge_gathered();
    kl_sum = kto::detail::reduce_kl_or_fail(hooks.kl_all_reduce, fn, checked_kl_sum);
  } else {
    kl_sum = kto::detail::reduce_kl_or_fail(hooks.kl_all_reduce, fn, [&] {
      validate();
      local_partials();
      return checked_kl_sum();
    });
  }
  kto::detail::validate_kl_partial(kl_sum, fn, &o);
  detail::ChunkEngine<T>& eng = *engine;
  const detail::RowScorer& scorer = *target_scorer;

  const index_t D = head.weight.cols;
  for (index_t r = 0; r < in.hidden.rows; ++r)
    std::fill(grads.d_hidden.row(r), grads.d_hidden.row(r) + D, Acc(0));
  for (index_t v = 0; v < grads.d_weight.rows; ++v)  // none when empty (a frozen head)
    std::fill(grads.d_weight.row(v), grads.d_weight.row(v) + D, Acc(0));
  std::fill(grads.d_bias.data, grads.d_bias.data + grads.d_bias.size, Acc(0));

  const double z0 = reference_point(kl_sum, o);
  const double scale = reduction_scale(o, B);

  StepResult<Acc> out;
  std::vector<Acc> row_lse(static_cast<size_t>(in.hidden.rows), Acc(0));
  out.logp.assign(static_cast<size_t>(B), Acc(0));
  out.num_tokens.assign(static_cast<size_t>(B), 0);
  std::vector<Acc> grad_logp(static_cast<size_t>(B), Acc(0));
  auto sequence_grad = [&](index_t s) {
    const double rho = static_cast<double>(out.logp[static_cast<size_t>(s)]) -
                       static_cast<double>(in.reference_logp[s]);
    return static_cast<Acc>(example_terms(rho, in.desirable[s] != 0, z0, o, scale).grad_logp);
  };

  if (recompute_all) {
    out.logp = std::move(target_fwd.logp);
    out.num_tokens = std::move(target_fwd.num_tokens);
    row_lse = std::move(target_fwd.row_lse);
    for (index_t s = 0; s < B; ++s) grad_logp[static_cast<size_t>(s)] = sequence_grad(s);
    std::vector<Acc> row_scale(static_cast<size_t>(in.hidden.rows), Acc(0));
    detail::set_row_scales(scorer, in.sequences, 0, B, grad_logp, out.num_tokens, o, row_scale);
    for (index_t r0 = scorer.first; r0 < scorer.last; r0 += eng.chunk_rows()) {
      const index_t n = std::min(eng.chunk_rows(), scorer.last - r0);
      eng.compute(in.hidden, scorer, r0, n);
      eng.backward(scorer, row_lse.data(), row_scale.data(), grads);
    }
  } else {
    std::vector<RowPartial<Acc>> part(static_cast<size_t>(in.hidden.rows));
    std::vector<Acc> row_scale(static_cast<size_t>(in.hidden.rows), Acc(0));
    for (const ChunkGroup& g : plan_chunks(in.sequences, eng.chunk_rows())) {
      // Forward over the group (one chunk, or the pieces of one long sequence).
      for (index_t r0 = g.first_row; r0 < g.last_row; r0 += eng.chunk_rows()) {
        const index_t n = std::min(eng.chunk_rows(), g.last_row - r0);
        eng.compute(in.hidden, scorer, r0, n);
        eng.partials(scorer, r0, n, part.data() + r0,
                     statistics.empty() ? nullptr : statistics.data() + r0);
      }
      for (index_t s = g.first_seq; s < g.last_seq; ++s) {
        detail::sequence_from_partials(part.data(), scorer, target_batch, head, s, o, fn,
                                       row_lse.data(), out.logp[static_cast<size_t>(s)],
                                       out.num_tokens[static_cast<size_t>(s)]);
        grad_logp[static_cast<size_t>(s)] = sequence_grad(s);
      }
      detail::set_row_scales(scorer, in.sequences, g.first_seq, g.last_seq, grad_logp,
                             out.num_tokens, o, row_scale);
      // Backward: the chunk still holds Z of a whole group; a split group recomputes.
      for (index_t r0 = g.first_row; r0 < g.last_row; r0 += eng.chunk_rows()) {
        const index_t n = std::min(eng.chunk_rows(), g.last_row - r0);
        if (g.split) eng.compute(in.hidden, scorer, r0, n);
        eng.backward(scorer, row_lse.data(), row_scale.data(), grads);
      }
    }
  }

  FinishResult<Acc> fin = kto::detail::finish_impl<Acc>(
      kl_sum, make_span(out.logp), in.reference_logp, in.desirable, o, fn, "sequences.count");
  detail::require_finite_gradients(grads, in.hidden.rows, fn);
  out.metrics = fin.metrics;
  out.examples = std::move(fin.examples);
  out.row_lse = std::move(row_lse);
  out.token_statistics = detail::sequence_statistics_of(statistics, scorer, in.sequences);
  return out;
}

}  // namespace cpu
}  // namespace kto
