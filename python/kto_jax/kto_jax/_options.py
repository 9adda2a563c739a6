"""KTOOptions: every option of the library's loss, by TRL's names where TRL has one, and
their encoding as the binding contract's options array (kto/options.hpp)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ._library import OPTION_CHOICES, OPTION_NAMES, STRATEGIES

# STRATEGIES: the fused step's strategies from the library (kto::kFusedStrategyNames), as
# kto_torch's: keep_chunk and recompute on every platform, vocab_blocks on CUDA only (the
# CPU step refuses it).
__all__ = ["KTOOptions", "STRATEGIES"]


@dataclasses.dataclass(frozen=True)
class KTOOptions:
    """Every option of kto::Options, by TRL's names where TRL has one.

    ``mean_denominator``: divisor of the mean reduction, 0 = the call's number of target
    examples. Under data parallel with losses summed across devices, set it to the global
    batch size: the summed loss and gradients then equal one device on the whole batch."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"
    link: str = "one_minus_sigmoid"
    reference_point: str = "kl_batch"
    kl_estimator: str = "mean"
    clamp_kl: bool = True
    fixed_z0: float = 0.0
    average_logprob: bool = False
    reduction: str = "mean"
    mean_denominator: int = 0
    ignore_index: int = -100
    # Also each example's sums over its scored tokens of the token's entropy and of its mean
    # logit (metrics "per_example/entropy_sum", "per_example/mean_logit_sum"), from the pass
    # that computes the log-softmax: TRL's `entropy` and `logits/*` metrics.
    token_statistics: bool = False
    # The model's logit transform, applied to the logits (or hidden @ W.T + b) before the
    # softmax: z' = c·tanh(a·z / c) / τ (a·z / τ when c = 0); gradients are to the raw logits.
    logit_scale: float = 1.0    # a (Cohere's logit_scale)
    logit_softcap: float = 0.0  # c (Gemma-2's final_logit_softcapping; 0: none)
    temperature: float = 1.0    # τ

    @property
    def uses_kl_batch(self) -> bool:
        """True when z0 is estimated from a KL batch (kto::uses_kl_batch)."""
        return self.loss_type == "kto" and self.reference_point == "kl_batch"

    def values(self) -> np.ndarray:
        """The options as the binding contract's array (kto/options.hpp: OPTION_NAMES'
        order, named values as their codes, flags as 0/1), the "options" attribute of
        every op. Raises ValueError naming an unknown value of a named option."""
        values = []
        for name in OPTION_NAMES:
            value = getattr(self, name)
            if name in OPTION_CHOICES:
                table = OPTION_CHOICES[name]
                if value not in table:
                    raise ValueError(f"kto: argument 'options.{name}' must be one of "
                                     f"{sorted(table)}; got {value!r}")
                value = table[value]
            values.append(float(value))
        return np.asarray(values, np.float64)
