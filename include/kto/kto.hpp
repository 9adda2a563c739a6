// kto.hpp — umbrella header: the framework-free KTO loss library.
//
// KTO (Ethayarajh et al. 2024) trains a language model from binary feedback:
// each completion is desirable or undesirable, and the loss pulls the policy's
// log-ratio ρ = log π/π_ref above a batch-level reference point z0 for the
// former and below it for the latter. Start with cpu/kto_step.hpp.
#pragma once

#include "config.hpp"
#include "error.hpp"
#include "example_loss.hpp"
#include "finish.hpp"
#include "fused_linear.hpp"
#include "layout.hpp"
#include "metrics.hpp"
#include "options.hpp"
#include "reference_point.hpp"
#include "sigmoid.hpp"
#include "validate.hpp"
#include "weights.hpp"

#include "cpu.hpp"
