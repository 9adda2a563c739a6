// cuda.hpp — the CUDA path (requires nvcc): forward, finish and backward
// kernels launched on a stream, CUB-style workspaces and status codes.
#pragma once

#include "cuda/blas_handle.hpp"
#include "cuda/status.hpp"
#include "cuda/step.hpp"
