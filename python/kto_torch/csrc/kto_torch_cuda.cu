// kto_torch_cuda.cu — kto_torch_cuda.h compiled once by nvcc: each call is the
// binding core's (kto/cuda/bind.hpp), which holds the dtype dispatch (float, __half,
// __nv_bfloat16) and the library calls kto_jax's CUDA handlers make too.
#include <kto/cuda/bind.hpp>

#include "kto_torch_cuda.h"

namespace kto_torch_cuda {
namespace {

cudaStream_t as_stream(void* s) {
  return static_cast<cudaStream_t>(s);
}

}  // namespace

std::size_t sequence_logprobs_workspace_bytes(kto::index_t rows) {
  return kto::bind::sequence_logprobs_workspace_bytes(rows);
}

std::string sequence_logprobs(const kto::bind::Logits& logits, const kto::bind::Batch& batch,
                              const kto::Options& o, float* logp, kto::index_t* num_tokens,
                              float* row_lse, void* workspace, std::size_t workspace_bytes,
                              void* stream) {
  return kto::bind::sequence_logprobs(logits, batch, o, logp, num_tokens, row_lse, workspace,
                                      workspace_bytes, as_stream(stream));
}

std::string step_forward(const kto::bind::StepForwardCall& call, void* workspace,
                         std::size_t* workspace_bytes, void* stream) {
  return kto::bind::step_forward(call, workspace, workspace_bytes, as_stream(stream));
}

std::string backward(const kto::bind::BackwardCall& call, void* stream) {
  return kto::bind::backward(call, as_stream(stream));
}

std::string fused_linear_kto_step(const kto::bind::FusedLinearCall& call, void* workspace,
                                  std::size_t* workspace_bytes, void* stream) {
  return kto::bind::fused_linear_kto_step(call, workspace, workspace_bytes, as_stream(stream));
}

std::string fused_linear_logprobs(const kto::bind::FusedLogprobsCall& call, void* workspace,
                                  std::size_t* workspace_bytes, void* stream) {
  return kto::bind::fused_linear_logprobs(call, workspace, workspace_bytes, as_stream(stream));
}

std::string read_status(const void* workspace, const kto::SequencesView& sequences, void* stream) {
  return kto::bind::read_status(workspace, sequences, as_stream(stream));
}

}  // namespace kto_torch_cuda
