// kto_torch_cuda.h — the CUDA half of the PyTorch bindings, behind a plain C++
// interface: no torch header reaches nvcc and no CUDA header reaches the torch
// translation unit. Every pointer is device memory; `stream` is a cudaStream_t.
// Each call returns an empty string on success, the library's message otherwise.
#pragma once

#include <cstdint>
#include <string>

#include <kto/layout.hpp>
#include <kto/options.hpp>

namespace kto_torch_cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct Logits {
  DType dtype;
  const void* data;
  kto::index_t vocab;
  kto::RowIndex rows;
};

/// Workspace bytes of forward() for this many rows.
std::size_t forward_workspace_bytes(kto::index_t rows);

/// Per-sequence logp and counts; per-row lse into row_lse (0 where not scored).
std::string forward(const Logits& logits, const kto::TargetsView& targets,
                    const kto::SequencesView& sequences, const kto::Options& o, float* logp,
                    kto::index_t* num_tokens, float* row_lse, void* workspace,
                    std::size_t workspace_bytes, void* stream);

/// (S, C) of the KL batch into partial[2] (float64).
std::string kl_partial(const float* policy_logp, const float* reference_logp,
                       const kto::index_t* num_tokens, kto::index_t count, const kto::Options& o,
                       double* partial, void* workspace, std::size_t workspace_bytes, void* stream);

/// metrics[9] (float64, TRL's order) and per_example[5, B] (logp copied in row 0).
std::string finish(const double* partial, const float* policy_logp, const float* reference_logp,
                   const std::uint8_t* desirable, kto::index_t count, const kto::Options& o,
                   double* metrics, float* per_example, void* workspace,
                   std::size_t workspace_bytes, void* stream);

/// dlogits (same dtype, `grad` layout) from row_lse and dL/dlogp.
std::string backward(const Logits& logits, const kto::TargetsView& targets,
                     const kto::SequencesView& sequences, const float* row_lse,
                     const float* grad_logp, const kto::index_t* num_tokens, const kto::Options& o,
                     void* grad, const kto::RowIndex& grad_rows, void* stream);

/// Synchronises the stream and reports errors the kernels recorded in `workspace`.
std::string read_status(const void* workspace, const kto::SequencesView& sequences, void* stream);

}  // namespace kto_torch_cuda
