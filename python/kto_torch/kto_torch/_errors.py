"""kto_torch's exception classes, all ValueError subclasses (as the library's kto::Error is
a std::invalid_argument), so that ``except ValueError`` keeps working.

The extension raises them for the library's errors (csrc/errors.hpp translates kto::Error,
kto::NonFiniteLogitsError and kto::PeerError, naming the public Python function and its
argument, with indices in the argument's own shape) and for its own argument checks;
kto_torch.distributed raises PeerError on every rank of a failed step. An argument of the
wrong kind (a module where a tensor belongs) raises KTOTypeError, also a TypeError.
"""

from __future__ import annotations

from typing import Dict, Optional


class KTOError(ValueError):
    """An argument kto refuses. ``function`` is the public function, ``argument`` the
    argument; the message says the expectation and what came."""

    function: str = ""
    argument: str = ""


class KTOTypeError(KTOError, TypeError):
    """An argument of the wrong kind: a module (``lm_head``) or another object where a tensor
    (``lm_head.weight``) belongs. A TypeError and a KTOError (``function``, ``argument``)."""


class NonFiniteLogitsError(KTOError):
    """A NaN or ±inf on a scored row, or log-probs that overflow, met in the forward:
    ``sequence`` and ``row`` say where (-1 where not known); ``row`` counts the rows of the
    logits (hidden states) flattened to [rows, V], and the message also gives the row's
    index in their own shape (``logits[1, 2]`` for [B, T, V] logits)."""

    sequence: int = -1
    row: int = -1


class PeerError(KTOError):
    """A data-parallel step failed on one or more ranks; raised on every rank.

    ``failures`` maps each failing rank (global rank) to its error message;
    ``phase`` says where: "before the KL all-reduce" or "in the target batch's step"."""

    def __init__(self, message: str, failures: Optional[Dict[int, str]] = None,
                 phase: str = ""):
        super().__init__(message)
        self.failures = failures or {}
        self.phase = phase
