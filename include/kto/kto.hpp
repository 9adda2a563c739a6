// kto.hpp — umbrella header: the KTO loss library on the CPU (core.hpp + cpu.hpp).
//
// KTO (Ethayarajh et al. 2024) trains a language model from binary feedback:
// each completion is desirable or undesirable, and the loss pulls the policy's
// log-ratio ρ = log π/π_ref above a batch-level reference point z0 for the
// former and below it for the latter. Start with cpu/kto_step.hpp. core.hpp is
// the framework-free part alone (no Eigen); cuda.hpp is the CUDA path (nvcc).
#pragma once

#include "core.hpp"
#include "cpu.hpp"
