// cuda.hpp — the CUDA path (requires nvcc): forward, finish and backward
// kernels launched on a stream, the fused-linear step (cuBLAS around the row
// kernels), CUB-style workspaces and status codes. Link CUDA::cudart and
// CUDA::cublas (kto::cuda).
#pragma once

#include "core.hpp"
#include "cuda/blas_handle.hpp"
#include "cuda/fused_linear.hpp"
#include "cuda/phases.hpp"
#include "cuda/status.hpp"
#include "cuda/step.hpp"
