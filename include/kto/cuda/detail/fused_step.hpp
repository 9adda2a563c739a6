// cuda/detail/fused_step.hpp — the phases of one fused-linear step, and one runner per strategy.
//
//   prepare()        errors reset, dH zeroed, the bias in fp32, offsets checked, compact maps
//   gather_slices()  vocab parallel: both batches' row partials, one all-gather, merged in
//                    rank order into each row's lse and ℓ (the same bits on every rank)
//   kl_forward()     the KL batch, forward only → (S, C)
//   all_reduce()     the caller's sum of (S, C) over ranks; a failure travels with it
//   a strategy       the target batch: forward → g_s → backward with its GEMMs
//     run_keep_chunk    chunks of whole sequences (host offsets): Z_c computed once
//     run_recompute     forward over every chunk, then Z_c recomputed for the backward
//     run_vocab_blocks  forward over row chunks, backward by blocks of vocabulary columns
//     run_vocab_slice   rows already merged by gather_slices(): the slice's backward
//   finish()         the weight gradients asked for zeroed if no row ran, then loss and metrics
//
// g_s needs the whole sequence's logp and z0, so a chunk's backward waits for its
// sequences' forward (../../fused_linear.hpp). Arguments are checked before any of this.
#pragma once

#include <algorithm>

#include "chunk_engine.hpp"

namespace kto {
namespace cuda {
namespace detail {

/// With compact scoring on, row_of = the batch's scored rows (compact_rows_kernel),
/// checked against the host plan's count.
inline void launch_compact_rows(const CompactPlan& plan, const device::BatchRows& batch,
                                index_t* row_of, device::DeviceErrors* errors, unsigned tag,
                                cudaStream_t stream) {
  if (!plan.on) return;
  device::compact_rows_kernel<<<1, device::kCompactThreads, 0, stream>>>(batch, row_of, plan.rows(),
                                                                         errors, tag);
}

/// The state the phases of one step share: checked arguments, the carved workspace,
/// the chunk engine, each batch's rows and compact plan.
template <class T>
struct FusedStep {
  const FusedLinearArguments<T>& a;
  const FusedBuffers& b;
  cudaStream_t stream;
  const char* fn;
  ChunkEngine<T> engine;
  float* logp;  ///< the caller's arrays, or the workspace's where it gave none
  index_t* num_tokens;
  ExampleOutputs ex;
  device::BatchRows rows, kl_rows;
  CompactPlan compact, kl_compact;
  index_t chunked_rows;     ///< chunk rows: batch rows, or the scored rows with compact scoring
  index_t kl_chunked_rows;  ///< the same for the KL batch
  bool kl_used;
  bool first_chunk = true;  ///< no backward has written dW and db yet

  FusedStep(cublasHandle_t handle, const FusedLinearArguments<T>& args, const FusedBuffers& buffers,
            cudaStream_t s, const char* name)
      : a(args),
        b(buffers),
        stream(s),
        fn(name),
        engine(handle, args.head, args.config,
               std::max(args.inputs.hidden.rows, args.inputs.kl.hidden.rows), buffers,
               row_extras(args.options, buffers.row_entropy, buffers.row_mean_logit,
                          args.outputs.token_statistics),
               s, name),
        logp(args.outputs.logp ? args.outputs.logp : buffers.logp),
        num_tokens(args.outputs.num_tokens ? args.outputs.num_tokens : buffers.num_tokens),
        ex{pick(args.outputs.examples.ratio, buffers.ratio),
           pick(args.outputs.examples.reward, buffers.reward),
           pick(args.outputs.examples.loss, buffers.loss),
           pick(args.outputs.examples.grad_logp, buffers.grad_logp)},
        rows{args.inputs.targets, args.inputs.sequences, args.inputs.hidden.rows,
             args.options.ignore_index},
        kl_rows{args.inputs.kl.targets, args.inputs.kl.sequences, args.inputs.kl.hidden.rows,
                args.options.ignore_index},
        compact(compact_plan(args.inputs.host_targets, args.inputs.targets.rows,
                             args.inputs.host_offsets, args.inputs.sequences.count,
                             args.options.ignore_index)),
        chunked_rows(compact.on ? compact.rows() : args.inputs.hidden.rows),
        kl_used(uses_kl_batch(args.options) && args.inputs.kl.sequences.count > 0) {
    if (kl_used)
      kl_compact =
          compact_plan(a.inputs.kl.host_targets, a.inputs.kl.targets.rows, a.inputs.kl.host_offsets,
                       a.inputs.kl.sequences.count, a.options.ignore_index);
    kl_chunked_rows = kl_compact.on ? kl_compact.rows() : a.inputs.kl.hidden.rows;
  }

  static float* pick(float* given, float* workspace) { return given ? given : workspace; }
  index_t count() const { return a.inputs.sequences.count; }
  bool average() const { return a.options.average_logprob; }

  void prepare() {
    const index_t N = a.inputs.hidden.rows, V = a.head.weight.rows;
    const LinearGradients& out = a.outputs;
    reset_errors(b.errors, stream);
    cudaMemsetAsync(b.partial, 0, sizeof(KlPartial), stream);
    cudaMemsetAsync(b.row_scale, 0, sizeof(float) * static_cast<size_t>(N), stream);
    if (N > 0)  // rows no chunk writes (outside every sequence) stay zero
      cudaMemset2DAsync(out.d_hidden.data, sizeof(float) * out.d_hidden.stride, 0,
                        sizeof(float) * out.d_hidden.cols, static_cast<size_t>(N), stream);
    if (a.head.bias.size)
      device::convert_kernel<T, float><<<256, 256, 0, stream>>>(a.head.bias.data, b.bias, V);
    if (b.ones)  // the db GEMV's operand, carved only when db is asked for
      device::convert_kernel<T, T>
          <<<64, 256, 0, stream>>>(nullptr, static_cast<T*>(b.ones), b.ones_count);
    launch_validate_offsets(a.inputs.sequences, N, b.errors, 0u, stream);
    launch_compact_rows(compact, rows, b.row_of, b.errors, 0u, stream);
    if (kl_used) {
      launch_validate_offsets(a.inputs.kl.sequences, a.inputs.kl.hidden.rows, b.errors,
                              device::kKlBatchTag, stream);
      launch_compact_rows(kl_compact, kl_rows, b.kl_row_of, b.errors, device::kKlBatchTag, stream);
    }
  }

  /// Vocab parallel: both batches' row partials in one all-gather (the KL batch's rows,
  /// when it is used, then the target batch's), merged in rank order into each row's
  /// lse and ℓ.
  Status gather_slices() {
    const FusedLinearInputs<T>& in = a.inputs;
    const RowPartialsAllGather& gather = a.hooks.gather_partials;
    const index_t N = in.hidden.rows, NK = in.kl.hidden.rows;
    const index_t kl_gathered = kl_used ? NK : 0, gathered_rows = kl_gathered + N;
    const RowPartial<float>* all = gather.gathered.data;  // given: no partials of our own
    if (all == nullptr) {
      cudaMemsetAsync(b.partials, 0, sizeof(RowPartial<float>) * static_cast<size_t>(gathered_rows),
                      stream);  // rows no chunk visits: defined bytes for the collective
      Status status;
      if (kl_used) {
        status = engine.partials_rows(in.kl.hidden, kl_rows, 0, kl_chunked_rows, b.kl_row_of,
                                      b.partials, device::kKlBatchTag);
        if (!status) return status;
      }
      status = engine.partials_rows(in.hidden, rows, 0, chunked_rows, b.row_of,
                                    b.partials + kl_gathered, 0u);
      if (!status) return status;
      status = gather.gather(b.partials, b.gathered, gathered_rows, stream);
      if (!status) return status;
      all = b.gathered;
    }
    const index_t ranks = gather.ranks, V_all = a.head.total_vocab();
    if (kl_used) {
      device::MergePartialsParams mk{
          all,   ranks,        gathered_rows,   0,        kl_rows,
          V_all, b.kl_row_lse, b.kl_token_logp, b.errors, device::kKlBatchTag};
      device::merge_partials_kernel<<<256, 256, 0, stream>>>(mk);
    }
    device::MergePartialsParams mt{all,   ranks,     gathered_rows, kl_gathered, rows,
                                   V_all, b.row_lse, b.token_logp,  b.errors,    0u};
    device::merge_partials_kernel<<<256, 256, 0, stream>>>(mt);
    return last_launch(fn);
  }

  /// The KL batch, forward only (its rows already merged when `sharded`) → (S, C).
  Status kl_forward(bool sharded) {
    if (!kl_used) return Status::success();
    const FusedLinearInputs<T>& in = a.inputs;
    const index_t K = in.kl.sequences.count;
    if (!sharded) {
      Status status = engine.forward_rows(in.kl.hidden, kl_rows, 0, kl_chunked_rows, b.kl_row_of,
                                          b.kl_row_lse, b.kl_token_logp, device::kKlBatchTag);
      if (!status) return status;
    }
    engine.sequences(kl_rows, 0, K, average(), b.kl_token_logp, b.kl_logp, b.kl_num_tokens,
                     device::kKlBatchTag);
    device::KlParams kp{b.kl_logp, in.kl.reference_logp.data, b.kl_num_tokens,
                        K,         a.options.kl_estimator,    b.partial,
                        b.errors};
    device::kl_partial_kernel<<<1, device::kFinishThreads, 0, stream>>>(kp);
    return last_launch(fn);
  }

  /// Data parallel: this rank's failures noted in the partial, then the caller's sum.
  Status all_reduce() {
    const KlAllReduce& reduce = a.hooks.kl_all_reduce;
    if (!reduce) return Status::success();
    device::PreCollectiveParams pc{a.inputs.reference_logp.data, a.inputs.desirable, count(),
                                   b.partial, b.errors};
    device::note_failures_kernel<<<1, device::kFinishThreads, 0, stream>>>(pc);
    return reduce(b.partial, stream);
  }

  /// Forward over chunk rows [first, last) of the target batch into row_lse and ℓ.
  Status forward_rows(index_t first, index_t last, const RowRange& group = {}) {
    return engine.forward_rows(a.inputs.hidden, rows, first, last, b.row_of, b.row_lse,
                               b.token_logp, 0u, group);
  }

  /// logp_s, n_s, then g_s and the row scales g_s c_r of sequences [s0, s1).
  void sequences_and_grads(index_t s0, index_t s1) {
    engine.sequences(rows, s0, s1, average(), b.token_logp, logp, num_tokens, 0u);
    device::SequenceGradParams gp{b.partial,
                                  logp,
                                  a.inputs.reference_logp.data,
                                  a.inputs.desirable,
                                  num_tokens,
                                  rows,
                                  s0,
                                  s1,
                                  count(),
                                  a.options,
                                  ex.grad_logp,
                                  b.row_scale};
    device::sequence_grad_kernel<<<static_cast<unsigned>((s1 - s0 + 7) / 8), 256, 0, stream>>>(gp);
  }

  /// The backward over chunk rows [first, last), recomputing each chunk's logits or
  /// (`recompute` false) using the ones its forward left.
  Status backward_rows(index_t first, index_t last, bool recompute) {
    for (index_t r0 = first; r0 < last; r0 += engine.chunk_rows()) {
      const index_t n = std::min(engine.chunk_rows(), last - r0);
      if (recompute) {
        Status s = engine.logits(a.inputs.hidden, rows, r0, n, b.row_of);
        if (!s) return s;
      }
      Status s = engine.backward(rows, r0, n, b.row_of, a.outputs, first_chunk);
      if (!s) return s;
      first_chunk = false;
    }
    return Status::success();
  }

  /// dW and db (those asked for) are zero when no row ran a backward; then the loss and
  /// the metrics.
  Status finish() {
    const LinearGradients& out = a.outputs;
    const index_t V = a.head.weight.rows;
    if (first_chunk) {
      if (out.d_weight_in_input_type.data)
        cudaMemset2DAsync(
            out.d_weight_in_input_type.data, sizeof(T) * out.d_weight_in_input_type.stride, 0,
            sizeof(T) * out.d_weight_in_input_type.cols, static_cast<size_t>(V), stream);
      else if (out.d_weight.data)  // none for a frozen head
        cudaMemset2DAsync(out.d_weight.data, sizeof(float) * out.d_weight.stride, 0,
                          sizeof(float) * out.d_weight.cols, static_cast<size_t>(V), stream);
      if (out.d_bias.size)
        cudaMemsetAsync(out.d_bias.data, 0, sizeof(float) * static_cast<size_t>(V), stream);
    }
    device::FinishParams fp{b.partial,
                            logp,
                            a.inputs.reference_logp.data,
                            a.inputs.desirable,
                            count(),
                            a.options,
                            ex.ratio,
                            ex.reward,
                            ex.loss,
                            ex.grad_logp,
                            a.outputs.metrics,
                            b.errors};
    device::finish_kernel<<<1, device::kFinishThreads, 0, stream>>>(fp);
    return last_launch(fn);
  }
};

/// keep_chunk with host offsets: each group of whole sequences is one chunk (or one
/// long sequence in pieces): forward, g_s, then the backward on the logits still held
/// (a split group recomputes them).
template <class T>
Status run_keep_chunk(FusedStep<T>& st) {
  const index_t* host_offsets = st.a.inputs.host_offsets;
  const SequencesView host =
      st.compact.on ? st.compact.sequences() : SequencesView{host_offsets, st.count()};
  for (const ChunkGroup& g : plan_chunks(host, st.engine.chunk_rows())) {
    const RowRange group{host_offsets[g.first_seq], host_offsets[g.last_seq]};
    Status status = st.forward_rows(g.first_row, g.last_row, group);
    if (!status) return status;
    st.sequences_and_grads(g.first_seq, g.last_seq);
    status = st.backward_rows(g.first_row, g.last_row, g.split);
    if (!status) return status;
  }
  return Status::success();
}

/// recompute (and keep_chunk without host offsets): forward over every chunk, g_s of
/// every sequence, then the backward with each chunk's logits recomputed.
template <class T>
Status run_recompute(FusedStep<T>& st) {
  Status status = st.forward_rows(0, st.chunked_rows);
  if (!status) return status;
  st.sequences_and_grads(0, st.count());
  return st.backward_rows(0, st.chunked_rows, true);
}

/// vocab_blocks: forward over row chunks, g_s, then the backward over every row at
/// once by blocks of vocabulary columns (each dW block one GEMM, written once).
template <class T>
Status run_vocab_blocks(FusedStep<T>& st) {
  Status status = st.forward_rows(0, st.chunked_rows);
  if (!status) return status;
  st.sequences_and_grads(0, st.count());
  if (st.chunked_rows > 0) {
    status = st.engine.backward_blocks(st.a.inputs.hidden, st.rows, st.chunked_rows, st.b.row_of,
                                       st.a.outputs);
    if (!status) return status;
    st.first_chunk = false;
  }
  return Status::success();
}

/// A vocabulary slice: the rows' lse and ℓ were merged across slices (gather_slices),
/// so sequences and g_s, then the slice's backward with the logits recomputed.
template <class T>
Status run_vocab_slice(FusedStep<T>& st) {
  st.sequences_and_grads(0, st.count());
  return st.backward_rows(0, st.chunked_rows, true);
}

/// The whole step over checked arguments and a carved, bound workspace.
template <class T>
Status run_fused_step(cublasHandle_t handle, const FusedLinearArguments<T>& a,
                      const FusedBuffers& b, cudaStream_t stream, const char* fn) {
  FusedStep<T> st(handle, a, b, stream, fn);
  st.prepare();
  const bool sharded = a.head.sharded();
  Status status;
  if (sharded) {
    status = st.gather_slices();
    if (!status) return status;
  }
  status = st.kl_forward(sharded);
  if (!status) return status;
  status = st.all_reduce();
  if (!status) return status;
  const FusedStrategy strategy = a.config.strategy;
  if (sharded)
    status = run_vocab_slice(st);
  else if (strategy == FusedStrategy::vocab_blocks)
    status = run_vocab_blocks(st);
  else if (a.inputs.host_offsets && strategy == FusedStrategy::keep_chunk)
    status = run_keep_chunk(st);
  else
    status = run_recompute(st);
  if (!status) return status;
  return st.finish();
}

}  // namespace detail
}  // namespace cuda
}  // namespace kto
