"""kto for PyTorch: the KTO loss and its gradient from logits, or from hidden states and the
lm_head, as torch.library ops (CPU, and CUDA where built).

    import kto_torch
    with torch.no_grad():
        kl_logp, kl_n = kto_torch.sequence_logprobs(kl_logits, kl_targets)
    out = kto_torch.kto_loss(logits, targets, None, reference_logp, desirable,
                             kl_logp, kl_reference_logp, kl_n, beta=0.1)
    out.loss.backward()          # dL/dlogits from the library's one-pass backward

The functions (functional.py): ``kto_loss``, ``fused_linear_kto_loss`` (the logits never
materialised), ``sequence_logprobs``, ``fused_linear_logprobs``, ``kl_partial`` and
``reference_point`` (data parallel), ``release_scratch``. The ops behind them (namespace
``kto``, with fake kernels and autograd; ``torch.compile``-traceable) are registered in
_ops.py. The TRL drop-in is ``kto_torch.trl``, fail-together data parallel
``kto_torch.distributed``. Errors (``KTOError``, ``NonFiniteLogitsError``, ``PeerError``:
ValueErrors) name the function, the argument, the expectation and what came.
"""

from __future__ import annotations

import torch

from . import _C, _isa
from ._errors import KTOError, NonFiniteLogitsError, PeerError
from ._ops import (
    EXAMPLE_OUTPUT_NAMES,
    KL_ESTIMATORS,
    LINKS,
    LOSS_TYPES,
    METRIC_NAMES,
    OPTION_NAMES,
    REDUCTIONS,
    REFERENCE_POINTS,
    STRATEGIES,
    _options,  # noqa: F401 — the ops' options list, for callers of torch.ops.kto.* (tests)
)
from .functional import (
    KTOOutput,
    fused_linear_kto_loss,
    fused_linear_logprobs,
    kl_partial,
    kto_loss,
    reference_point,
    release_scratch,
    sequence_logprobs,
)

__all__ = ["BF16_GEMM", "EXAMPLE_OUTPUT_NAMES", "KL_ESTIMATORS", "KTOError", "KTOOutput", "LINKS",
           "LOSS_TYPES", "METRIC_NAMES", "NonFiniteLogitsError", "OPTION_NAMES", "PeerError",
           "REDUCTIONS", "REFERENCE_POINTS", "STRATEGIES", "__version__", "build_info",
           "fused_linear_kto_loss", "fused_linear_logprobs", "kl_partial", "kto_loss",
           "reference_point", "release_scratch", "sequence_logprobs"]
__version__ = _C.version()  # the library's (KTO_VERSION_* in include/kto/config.hpp)

# Whether this CPU runs the library's bf16 GEMM (AVX512-BF16): bfloat16 fused heads then
# multiply in bf16 with fp32 accumulation; otherwise they are widened to fp32.
BF16_GEMM = bool(_isa.CPU.bf16_gemm_supported())


def build_info() -> dict:
    """How this installation was built and what it runs: the x86-64 level the CPU ops
    were compiled for (``compiled_isa``) and the copy this CPU dispatched to
    (``dispatched_isa``, of ``built_isas``; kto_torch/_isa.py), the CPU's own level
    (``cpu_isa``), Eigen's version and SIMD sets, the CPU threads the ops use, and the
    CUDA runtime the CUDA ops were built against (None without them)."""
    info = dict(_C.build_info())
    info["dispatched_isa"] = _isa.CPU.compiled_isa()
    info["eigen_simd"] = _isa.CPU.build_info()["eigen_simd"]
    info["built_isas"] = list(_isa.BUILT)
    info["cpu_isa"] = _C.cpu_isa()
    info["threads"] = torch.get_num_threads()
    info["torch"] = torch.__version__
    return info
