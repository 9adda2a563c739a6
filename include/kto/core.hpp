// core.hpp — the framework-free part of kto: the C++17 standard library and nothing else.
//
// What every path shares, host and device alike: the loss of one example
// (sigmoid, example_loss), the reference point z0 and its all-reduce
// (reference_point, kl_all_reduce), the finish from log-probs (finish), the
// memory views every path reads (layout, fused_linear), options, metrics and the
// argument checks. No Eigen, no CUDA header: a trainer that only finishes the
// loss from its own log-probs needs nothing else. cpu.hpp adds the Eigen CPU
// path, cuda.hpp the CUDA one; kto.hpp is core.hpp + cpu.hpp.
#pragma once

#include "config.hpp"
#include "error.hpp"
#include "example_loss.hpp"
#include "finish.hpp"
#include "fused_linear.hpp"
#include "kl_all_reduce.hpp"
#include "layout.hpp"
#include "logit_transform.hpp"
#include "metrics.hpp"
#include "model_logp.hpp"
#include "options.hpp"
#include "reference_point.hpp"
#include "sigmoid.hpp"
#include "token_statistics.hpp"
#include "validate.hpp"
#include "weights.hpp"
