// kto_torch_cuda.h — the CUDA half of the PyTorch bindings, behind a plain C++
// interface: no torch header reaches nvcc and no CUDA header reaches the torch
// translation unit. The calls are the binding core's (kto/bind/arguments.hpp in,
// kto/cuda/bind.hpp behind), compiled once in kto_torch_cuda.cu. Every pointer is
// device memory; `stream` is a cudaStream_t. Each call returns an empty string on
// success, the library's message otherwise; the workspace protocol is the library's
// (a null workspace sets *workspace_bytes).
#pragma once

#include <cstddef>
#include <string>

#include <kto/bind/arguments.hpp>

namespace kto_torch_cuda {

/// Workspace bytes of sequence_logprobs() for this many rows.
std::size_t sequence_logprobs_workspace_bytes(kto::index_t rows);

/// Per-sequence logp and counts; per-row lse into row_lse (0 where not scored).
std::string sequence_logprobs(const kto::bind::Logits& logits, const kto::bind::Batch& batch,
                              const kto::Options& o, float* logp, kto::index_t* num_tokens,
                              float* row_lse, void* workspace, std::size_t workspace_bytes,
                              void* stream);

/// The logits step's forward (kto::cuda::step_forward).
std::string step_forward(const kto::bind::StepForwardCall& call, void* workspace,
                         std::size_t* workspace_bytes, void* stream);

/// dlogits (the logits' dtype, call.grad_rows' layout) from row_lse and dL/dlogp.
std::string backward(const kto::bind::BackwardCall& call, void* stream);

/// The fused-linear step (kto::cuda::fused_linear_kto_step): compact scoring with the
/// batch's host copies, dW in fp32 or (vocab_blocks) the input dtype, no dW / db where
/// their pointers are null (a frozen head).
std::string fused_linear_kto_step(const kto::bind::FusedLinearCall& call, void* workspace,
                                  std::size_t* workspace_bytes, void* stream);

/// Forward only (kto::cuda::fused_linear_logprobs), compact scoring as the step's.
std::string fused_linear_logprobs(const kto::bind::FusedLogprobsCall& call, void* workspace,
                                  std::size_t* workspace_bytes, void* stream);

/// Synchronises the stream and reports errors the kernels recorded in `workspace`.
std::string read_status(const void* workspace, const kto::SequencesView& sequences, void* stream);

}  // namespace kto_torch_cuda
