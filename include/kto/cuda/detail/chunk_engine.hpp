// cuda/detail/chunk_engine.hpp — the GEMMs and row kernels of one head over chunks of rows.
//
// ChunkEngine is what every strategy of the fused step (fused_step.hpp) drives;
// kto::cpu::detail::ChunkEngine (cpu/chunk_engine.hpp) is its CPU twin:
//
//   logits()          H_c gathered (ignored rows zero), Z_c = H_c Wᵀ   cublasGemmEx, fp32 out
//   forward()         lse_r, ℓ_r (+ token statistics)                   chunk_forward_kernel
//   partials_rows()   a vocabulary slice's (lse, target logit) per row  chunk_partials_kernel
//   sequences()       logp_s, n_s from the rows' ℓ                      sequence_logp_kernel
//   backward()        dZ_c, then dH_c = dZ_c W, dW (+)= dZ_cᵀ H_c, db   chunk_backward_kernel,
//                                                                       3 cublasGemmEx
//   backward_blocks() the same by blocks of vocabulary columns over every row (vocab_blocks)
//
// fp32 sums inside every GEMM; the bias is added by the row kernels. An empty
// d_weight (and d_weight_in_input_type) or d_bias skips its product: a frozen head's
// backward is dZ_c and dH_c alone.
#pragma once

#include <cublas_v2.h>

#include <algorithm>

#include <kto/device/fused_linear_kernels.cuh>

#include "fused_workspace.hpp"

namespace kto {
namespace cuda {
namespace detail {

inline Status cublas_check(cublasStatus_t s, const char* fn, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return Status::success();
  return Status::make(StatusCode::cuda_error, "%s: cuBLAS %s failed with status %d", fn, what,
                      static_cast<int>(s));
}

/// Points the caller's cuBLAS handle at `stream` and at its slice of the workspace.
inline Status bind_cublas(cublasHandle_t handle, cudaStream_t stream, void* workspace, size_t bytes,
                          const char* fn) {
  Status s = cublas_check(cublasSetStream(handle, stream), fn, "set stream");
  if (s) s = cublas_check(cublasSetWorkspace(handle, workspace, bytes), fn, "set workspace");
  return s;
}

/// Batch rows [first, last): by default every row.
struct RowRange {
  index_t first = 0;
  index_t last = device::ChunkView::kAnyRow;
};

/// The GEMMs and row kernels of one head over chunks of a batch's rows.
template <class T>
class ChunkEngine {
 public:
  /// `extras`: the options' transform, applied to every batch, and the target
  /// batch's statistics buffers (forward_rows() says which batch it runs).
  ChunkEngine(cublasHandle_t handle, const LinearHead<T>& head, const FusedLinearConfig& cfg,
              index_t max_rows, const FusedBuffers& b, const RowExtras& extras, cudaStream_t stream,
              const char* fn)
      : handle_(handle),
        head_(head),
        shape_(head.weight.rows, cfg.chunk_bytes, max_rows),
        b_(b),
        extras_(extras),
        stream_(stream),
        fn_(fn) {}

  index_t chunk_rows() const { return shape_.rows; }

  /// Z_c = H_c Wᵀ in fp32 for chunk rows [r0, r0 + n): batch rows, or with a
  /// compact map (`row_of`) the r0-th to (r0 + n)-th scored rows; from the
  /// chunk's hidden rows with any ignored ones zeroed (kept for the dW product
  /// of backward()).
  Status logits(const MatrixView<const T>& hidden, const device::BatchRows& batch, index_t r0,
                index_t n, const index_t* row_of) {
    gather(hidden, batch, view(r0, n, row_of));
    return logits_gemm(0, head_.weight.rows, n, shape_.ld_logits);
  }

  /// Chunk rows [r0, r0 + n) of the logits buffer: the head's columns of the whole
  /// vocabulary (all of it, or a rank's slice). chunk_forward_kernel reads z.vocab
  /// columns: whole heads only (a slice's forward is partials_rows()).
  device::ChunkView view(index_t r0, index_t n, const index_t* row_of) const {
    return device::ChunkView{b_.logits, shape_.ld_logits, head_.total_vocab(), b_.bias, r0, n,
                             row_of};
  }

  /// The extras of the batch a tag names: the KL batch has no statistics.
  RowExtras extras_of(unsigned tag) const {
    return tag == device::kKlBatchTag ? extras_.without_statistics() : extras_;
  }

  void forward(const device::BatchRows& batch, index_t r0, index_t n, const index_t* row_of,
               float* row_lse, float* token_logp, unsigned tag, const RowRange& group) {
    const RowExtras e = extras_of(tag);
    device::ChunkView chunk = view(r0, n, row_of);
    chunk.group_first = group.first;
    chunk.group_last = group.last;
    device::ChunkForwardParams p{chunk, batch,       row_lse,       token_logp,      b_.errors,
                                 tag,   e.transform, e.row_entropy, e.row_mean_logit};
    launch_rows(head_.weight.rows, n, e.extended(),
                [&](auto threads, auto per_block, auto ext, dim3 grid, dim3 block) {
                  device::chunk_forward_kernel<decltype(threads)::value, decltype(per_block)::value,
                                               decltype(ext)::value>
                      <<<grid, block, 0, stream_>>>(p);
                });
  }

  /// Forward over chunk rows [first, last) of a batch (batch rows, or scored rows
  /// through `row_of`), chunk by chunk. `group`: the batch rows the host planned
  /// them over (compact scoring checks each mapped row falls inside).
  Status forward_rows(const MatrixView<const T>& hidden, const device::BatchRows& batch,
                      index_t first, index_t last, const index_t* row_of, float* row_lse,
                      float* token_logp, unsigned tag, const RowRange& group = {}) {
    for (index_t r0 = first; r0 < last; r0 += shape_.rows) {
      const index_t n = std::min(shape_.rows, last - r0);
      Status s = logits(hidden, batch, r0, n, row_of);
      if (!s) return s;
      forward(batch, r0, n, row_of, row_lse, token_logp, tag, group);
    }
    return last_launch(fn_);
  }

  /// Vocab parallel: this rank's row partials of chunk rows [first, last) of a batch
  /// (batch rows, or scored rows through `row_of`) into `partials` (batch rows).
  Status partials_rows(const MatrixView<const T>& hidden, const device::BatchRows& batch,
                       index_t first, index_t last, const index_t* row_of,
                       RowPartial<float>* partials, unsigned tag) {
    for (index_t r0 = first; r0 < last; r0 += shape_.rows) {
      const index_t n = std::min(shape_.rows, last - r0);
      Status s = logits(hidden, batch, r0, n, row_of);
      if (!s) return s;
      device::ChunkPartialsParams p{view(r0, n, row_of),
                                    head_.vocab_begin,
                                    head_.weight.rows,
                                    batch,
                                    partials,
                                    b_.errors,
                                    tag,
                                    extras_.transform};
      launch_rows(head_.weight.rows, n, extras_.transformed,
                  [&](auto threads, auto per_block, auto ext, dim3 grid, dim3 block) {
                    device::chunk_partials_kernel<decltype(threads)::value,
                                                  decltype(per_block)::value, decltype(ext)::value>
                        <<<grid, block, 0, stream_>>>(p);
                  });
    }
    return last_launch(fn_);
  }

  /// logp_s and n_s of sequences [first_seq, last_seq) from their rows' ℓ (and
  /// their token statistics, for the target batch when requested).
  void sequences(const device::BatchRows& batch, index_t first_seq, index_t last_seq, bool average,
                 const float* token_logp, float* logp, index_t* num_tokens, unsigned tag) const {
    const index_t count = last_seq - first_seq;
    if (count <= 0) return;
    const RowExtras e = extras_of(tag);
    const bool statistics = e.row_entropy != nullptr;
    device::SequenceParams sp{batch.targets,
                              SequencesView{batch.sequences.offsets + first_seq, count},
                              batch.rows,
                              batch.ignore_index,
                              average,
                              token_logp,
                              logp + first_seq,
                              num_tokens + first_seq,
                              e.row_entropy,
                              e.row_mean_logit,
                              statistics ? e.statistics.entropy_sum + first_seq : nullptr,
                              statistics ? e.statistics.mean_logit_sum + first_seq : nullptr};
    device::sequence_logp_kernel<<<static_cast<unsigned>((count + 7) / 8), 256, 0, stream_>>>(sp);
  }

  /// dZ_c from the chunk's logits, then dH_c, dW and db (dW from the hidden
  /// rows the last logits() call gathered: the same chunk; each skipped when its
  /// output is empty). With a compact map, dH_c goes to the workspace first, then to
  /// its batch rows of out.d_hidden.
  Status backward(const device::BatchRows& batch, index_t r0, index_t n, const index_t* row_of,
                  const LinearGradients& out, bool first_chunk) {
    const device::ChunkView chunk = view(r0, n, row_of);
    Status s = logit_gradients(chunk, batch, shape_.ld_grad, 0, head_.weight.rows);
    if (!s) return s;
    const index_t D = head_.weight.cols;
    Products p;
    p.dh = row_of ? b_.d_hidden : out.d_hidden.row(r0);
    p.lddh = row_of ? D : out.d_hidden.stride;
    p.dw = out.d_weight.data;  // null: a frozen head
    p.lddw = out.d_weight.stride;
    p.db = out.d_bias.size ? out.d_bias.data : nullptr;
    p.beta_w = first_chunk ? 0.0f : 1.0f;  // dW and db sum over the chunks
    s = products(0, head_.weight.rows, n, shape_.ld_grad, p);
    if (s && row_of) s = scatter_d_hidden(chunk, out);
    return s;
  }

  /// Strategy vocab_blocks: the backward over chunk rows [0, rows) at once (batch rows,
  /// or scored rows through `row_of`), block by block of vocabulary columns:
  /// Z_b = H W_bᵀ, dZ_b, dH (+)= dZ_b W_b, dW_b = dZ_bᵀ H in the output's type, db_b.
  /// Each dW and db entry is one GEMM's fp32 sum over every row, stored once.
  Status backward_blocks(const MatrixView<const T>& hidden, const device::BatchRows& batch,
                         index_t rows, const index_t* row_of, const LinearGradients& out) {
    const index_t V = head_.weight.rows, D = head_.weight.cols;
    const VocabBlockShape blocks(V, b_.chunk_elements, rows);
    const device::ChunkView all = view(0, rows, row_of);
    gather(hidden, batch, all);
    const bool typed_dw = out.d_weight_in_input_type.data != nullptr;
    const bool weight_grad = typed_dw || out.d_weight.data != nullptr;  // else a frozen head
    Products p;
    p.dh = row_of ? b_.d_hidden : out.d_hidden.data;
    p.lddh = row_of ? D : out.d_hidden.stride;
    p.dw_type = typed_dw ? cuda_data_type<T>() : CUDA_R_32F;
    p.lddw = typed_dw ? out.d_weight_in_input_type.stride : out.d_weight.stride;
    for (index_t v0 = 0; v0 < V; v0 += blocks.cols) {
      const index_t w = std::min(blocks.cols, V - v0);
      Status s = logits_gemm(v0, w, rows, blocks.cols);
      if (!s) return s;
      device::ChunkView z = all;
      z.ld = blocks.cols;
      z.bias = b_.bias ? b_.bias + v0 : nullptr;
      s = logit_gradients(z, batch, blocks.cols, v0, w);
      if (!s) return s;
      p.dw = !weight_grad ? nullptr
             : typed_dw   ? static_cast<void*>(typed<T>(out.d_weight_in_input_type).row(v0))
                          : static_cast<void*>(out.d_weight.row(v0));
      p.db = out.d_bias.size ? out.d_bias.data + v0 : nullptr;
      p.beta_h = v0 == 0 ? 0.0f : 1.0f;  // dH sums over the blocks
      s = products(v0, w, rows, blocks.cols, p);
      if (!s) return s;
    }
    return row_of ? scatter_d_hidden(all, out) : Status::success();
  }

 private:
  /// Where the gradient products go: dH (fp32, beta_h), dW (dw_type, beta_w; null: none),
  /// db (fp32, beta_w; null: none), leading dimensions in elements.
  struct Products {
    float* dh = nullptr;
    index_t lddh = 0;
    float beta_h = 0.0f;
    void* dw = nullptr;
    cudaDataType_t dw_type = CUDA_R_32F;
    index_t lddw = 0;
    float beta_w = 0.0f;
    float* db = nullptr;
  };

  /// The chunk's hidden rows into b_.hidden: view.rows rows, D apart, unscored ones zero.
  void gather(const MatrixView<const T>& hidden, const device::BatchRows& batch,
              const device::ChunkView& view) {
    device::gather_scored_rows_kernel<T>
        <<<static_cast<unsigned>(std::min<index_t>(view.rows, 65535)), 128, 0, stream_>>>(
            hidden.data, hidden.stride, head_.weight.cols, batch, view, static_cast<T*>(b_.hidden));
  }

  /// b_.logits = the gathered rows' logits of vocabulary columns [v0, v0 + w), `ld` apart.
  Status logits_gemm(index_t v0, index_t w, index_t n, index_t ld) {
    const float one = 1.0f, zero = 0.0f;
    const cudaDataType_t t = cuda_data_type<T>();
    const int d = static_cast<int>(head_.weight.cols);
    return cublas_check(
        cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(w), static_cast<int>(n), d,
                     &one, head_.weight.row(v0), t, static_cast<int>(head_.weight.stride),
                     b_.hidden, t, d, &zero, b_.logits, CUDA_R_32F, static_cast<int>(ld),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        fn_, "logits GEMM");
  }

  /// dZ into b_.grad (`ld_grad` apart) from the logits of `z`: columns [v0, v0 + w).
  Status logit_gradients(const device::ChunkView& z, const device::BatchRows& batch,
                         index_t ld_grad, index_t v0, index_t w) {
    // The one-hot's column: the head's first row is global column vocab_begin.
    device::ChunkBackwardParams<T> p{z,
                                     batch,
                                     b_.row_lse,
                                     b_.row_scale,
                                     static_cast<T*>(b_.grad),
                                     ld_grad,
                                     extras_.transform,
                                     head_.vocab_begin + v0,
                                     w};
    launch_rows(w, z.rows, extras_.transformed,
                [&](auto threads, auto per_block, auto ext, dim3 grid, dim3 block) {
                  device::chunk_backward_kernel<T, decltype(threads)::value,
                                                decltype(per_block)::value, decltype(ext)::value>
                      <<<grid, block, 0, stream_>>>(p);
                });
    return last_launch(fn_);
  }

  /// dH, dW and db from dZ (b_.grad, `n` rows of `w` columns from column v0, `ldg` apart)
  /// and the gathered hidden rows; fp32 sums inside each GEMM. No dW GEMM without p.dw,
  /// no db GEMV without p.db.
  Status products(index_t v0, index_t w, index_t n, index_t ldg, const Products& p) {
    const float one = 1.0f;
    const cudaDataType_t t = cuda_data_type<T>();
    const int d = static_cast<int>(head_.weight.cols), wi = static_cast<int>(w);
    const int ni = static_cast<int>(n), lg = static_cast<int>(ldg);
    Status s = cublas_check(
        cublasGemmEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, d, ni, wi, &one, head_.weight.row(v0), t,
                     static_cast<int>(head_.weight.stride), b_.grad, t, lg, &p.beta_h, p.dh,
                     CUDA_R_32F, static_cast<int>(p.lddh), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        fn_, "dH GEMM");
    if (!s) return s;
    if (p.dw != nullptr)
      s = cublas_check(
          cublasGemmEx(handle_, CUBLAS_OP_N, CUBLAS_OP_T, d, wi, ni, &one, b_.hidden, t, d, b_.grad,
                       t, lg, &p.beta_w, p.dw, p.dw_type, static_cast<int>(p.lddw),
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          fn_, "dW GEMM");
    if (!s || p.db == nullptr) return s;
    return cublas_check(
        cublasGemmEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, wi, 1, ni, &one, b_.grad, t, lg, b_.ones, t,
                     ni, &p.beta_w, p.db, CUDA_R_32F, wi, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        fn_, "db GEMM");
  }

  /// Compact scoring: the dH rows in b_.d_hidden to their batch rows of out.d_hidden.
  Status scatter_d_hidden(const device::ChunkView& chunk, const LinearGradients& out) {
    device::scatter_rows_kernel<<<static_cast<unsigned>(std::min<index_t>(chunk.rows, 65535)), 128,
                                  0, stream_>>>(b_.d_hidden, head_.weight.cols, chunk,
                                                out.d_hidden.data, out.d_hidden.stride);
    return last_launch(fn_);
  }

  cublasHandle_t handle_;
  const LinearHead<T>& head_;
  ChunkShape<T> shape_;
  FusedBuffers b_;
  RowExtras extras_;
  cudaStream_t stream_;
  const char* fn_;
};
}  // namespace detail
}  // namespace cuda
}  // namespace kto
