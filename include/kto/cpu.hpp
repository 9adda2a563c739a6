// cpu.hpp — the Eigen CPU path: forward, backward and the whole step.
#pragma once

#include "cpu/backward.hpp"
#include "cpu/context_parallel.hpp"
#include "cpu/fused_linear.hpp"
#include "cpu/kto_step.hpp"
#include "cpu/parallel.hpp"
#include "cpu/row_kernels.hpp"
#include "cpu/sequence_logprobs.hpp"
