"""kto for JAX: the KTO loss and its gradients through XLA FFI (CPU; CUDA where built).

    import kto_jax
    opts = kto_jax.KTOOptions(beta=0.1)
    # from logits [rows, V] (or [B, T, V]):
    loss, metrics = kto_jax.kto_loss(logits, targets, offsets, reference_logp, desirable,
                                     kl_policy_logp, kl_reference_logp, kl_num_tokens, opts)
    # from hidden states [N, D] (or [B, T, D]) and the lm_head weight [V, D], logits never
    # materialised:
    # (the KL batch as its log-probs: fused_linear_logprobs of its hidden states)
    kl_logp, kl_n = kto_jax.fused_linear_logprobs(kl_hidden, weight, kl_targets, kl_offsets)
    loss, metrics = kto_jax.fused_linear_kto_loss(hidden, weight, targets, offsets,
                                                  reference_logp, desirable, bias=None,
                                                  options=opts, kl_policy_logp=kl_logp,
                                                  kl_reference_logp=kl_reference_logp,
                                                  kl_num_tokens=kl_n)

Both are jax.custom_vjp functions (jit, grad): the gradient flows from the loss to the
logits, or to hidden, weight and bias, scaled by the loss's cotangent; the metrics carry
no gradient. Inside jax.shard_map, ``kl_axis_name`` all-reduces the KL estimate's (S, C)
between the two phases (data parallel) and, for the fused ops, ``vocab_axis_name`` runs
the lm_head sharded over the vocabulary (the per-row partials all-gathered and merged by
the library). See docs/jax.md.

The shared libraries are built by ``pip install --no-build-isolation ./python/kto_jax``;
importing only loads them. Run from the source tree without installing, the CPU library
is compiled on first use into $KTO_JAX_BUILD (default build/jax of the repository).
"""

from __future__ import annotations

from . import _build
from ._library import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CUDA_CHUNK_BYTES,
    KL_ESTIMATORS,
    LINKS,
    LOSS_TYPES,
    METRIC_NAMES,
    OPTION_CHOICES,
    OPTION_NAMES,
    PER_EXAMPLE_NAMES,
    REDUCTIONS,
    REFERENCE_POINTS,
    build_info,
    cpu_library,
    cuda_library,
    has_cuda,
)
from ._options import STRATEGIES, KTOOptions
from .functional import (
    fused_linear_kl_partial,
    fused_linear_kto_loss,
    fused_linear_logprobs,
    kl_partial,
    kto_loss,
    sequence_logprobs,
)

try:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _dist_version

    __version__ = _dist_version("kto_jax")
except PackageNotFoundError:  # the source tree
    __version__ = _build.library_version()

__all__ = [
    "DEFAULT_CHUNK_BYTES", "DEFAULT_CUDA_CHUNK_BYTES", "KL_ESTIMATORS", "KTOOptions", "LINKS",
    "LOSS_TYPES", "METRIC_NAMES", "OPTION_CHOICES", "OPTION_NAMES", "PER_EXAMPLE_NAMES",
    "REDUCTIONS", "REFERENCE_POINTS", "STRATEGIES", "__version__", "build_info", "cpu_library",
    "cuda_library", "fused_linear_kl_partial", "fused_linear_kto_loss", "fused_linear_logprobs",
    "has_cuda", "kl_partial", "kto_loss", "sequence_logprobs",
]
