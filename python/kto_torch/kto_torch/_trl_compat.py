"""Every TRL-internal name the drop-in (kto_torch.trl, kto_torch.hf) relies on, and the
transformers internals it hooks, in one module: what to check when the pinned TRL (1.16)
or transformers (5.24) moves. Nothing else in kto_torch imports from trl or from a private
transformers module."""

from __future__ import annotations

import contextlib

from trl import KTOTrainer as TRLKTOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import maybe_gather_lm_head_ctx, use_adapter

__all__ = ["TRLKTOTrainer", "disable_gradient_checkpointing", "load_balancing_loss_func",
           "maybe_gather_lm_head_ctx", "packing_seen", "use_adapter"]


def load_balancing_loss_func(*args, **kwargs):
    """transformers' Mixtral load-balancing loss, which every MoE family in transformers
    shares and TRL 1.16's fused head adds (imported on first use)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as loss

    return loss(*args, **kwargs)


@contextlib.contextmanager
def packing_seen():
    """A list that records, for the forwards inside, whether transformers recognised packed
    sequences in position_ids: masking_utils.find_packed_sequence_indices (the causal-mask
    builders of SDPA, eager, flex) and modeling_flash_attention_utils._is_packed_sequence
    (flash-attention's varlen path). None where this transformers has neither function."""
    import transformers.masking_utils as masks
    import transformers.modeling_flash_attention_utils as flash

    find = getattr(masks, "find_packed_sequence_indices", None)
    is_packed = getattr(flash, "_is_packed_sequence", None)
    if find is None or is_packed is None:
        yield None
        return
    seen = []

    def find_(position_ids, *args, **kwargs):
        found = find(position_ids, *args, **kwargs)
        seen.append(found is not None)
        return found

    def is_packed_(*args, **kwargs):
        found = is_packed(*args, **kwargs)
        seen.append(bool(found))
        return found

    masks.find_packed_sequence_indices, flash._is_packed_sequence = find_, is_packed_
    try:
        yield seen
    finally:
        masks.find_packed_sequence_indices, flash._is_packed_sequence = find, is_packed
