"""A drop-in for TRL's KTOTrainer whose log-prob and loss path runs on kto ops.

    -from trl import KTOTrainer
    +from kto_torch.trl import KTOTrainer

Everything else — data collation (text or vision-language), the KL dataset
(completions rotated by one), reference log-prob precomputation, the optimiser
loop and logging — stays TRL's. Every model input TRL's own step passes reaches
the model (pixel_values, image_grid_thw, token_type_ids, mm_token_type_ids, ...;
the KL batch with its KL_* entries in their place).

Fused by default: where the model's logits are lm_head(hidden), up to the
scale and soft-cap its config declares (read as TRL 1.16 reads them, applied by
the library as options), the policy, the KL batch and the reference model are
called as ``model(**inputs, kto_head=HeadRequest(...))``: the forward that
``install_kto_head`` patched in runs the backbone (``model.base_model``, vision
tower included) and the fused head on the last hidden states
(``kto_torch.fused_linear_kto_loss`` / ``fused_linear_logprobs``), so the
batch's logits never exist and the call goes through whatever wrapper
accelerate put around the model (DDP, FSDP2, ZeRO-3), as TRL's own fused head
does. ``fused_chunk_bytes`` bounds the chunk (by default the library's for the
device, chosen by measurement: docs/performance.md). Elsewhere, or with
``fused_linear=False``, the logits path: ``kto_torch.kto_loss`` on the policy
logits, ``kto_torch.sequence_logprobs`` for the KL batch and the reference.
Either way TRL's metrics are logged, ``entropy`` and ``logits/*`` included (on
the CPU), and across data-parallel ranks the KL estimate is the global (S, C)
of one all-reduce, which equals TRL's mean of per-rank means when ranks hold
equal batches; a failure on one rank raises ``PeerError`` on every rank. MoE
models add TRL's load-balancing auxiliary loss (and log ``aux_loss``). Not
covered (it falls back to TRL's own path): PEFT models without a separate
reference model.

Non-finite values (a float16 overflow, a diverged model) stop training with
``NonFiniteModelOutputError`` (a ValueError) that says what most likely happened
and what to try, where TRL's own trainer would go on with NaN parameters.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import re
import types
from typing import NamedTuple, Optional

import torch
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor, Partial, Replicate
from trl import KTOTrainer as _TRLKTOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import maybe_gather_lm_head_ctx, use_adapter

import kto_torch

logger = logging.getLogger(__name__)
_TRAINER = "kto_torch.trl.KTOTrainer"


# Collator outputs that feed the loss, not the model (TRL 1.16's collators).
_NOT_MODEL_INPUTS = frozenset({"completion_mask", "label", "ref_logps", "ref_KL_logps"})


def model_inputs(batch: dict, kl: bool = False) -> dict:
    """The keyword arguments the model is called with, as TRL 1.16's KTOTrainer calls it:
    every entry of the collated batch except the loss's own (completion masks, labels,
    precomputed reference log-probs) and the KL batch's. With ``kl=True``, the KL batch:
    each ``KL_<name>`` entry (input_ids, attention_mask, token_type_ids, mm_token_type_ids)
    replaces ``<name>``; the rest (pixel_values, image_grid_thw, ...) is shared, since the
    KL batch pairs the same prompts with rotated completions."""
    inputs = {k: v for k, v in batch.items()
              if k not in _NOT_MODEL_INPUTS and not k.startswith("KL_")}
    if kl:
        for key, value in batch.items():
            if key.startswith("KL_") and key != "KL_completion_mask":
                inputs[key[len("KL_"):]] = value
    inputs["use_cache"] = False
    return inputs


def _embedding_rows(model) -> Optional[int]:
    """The rows of the model's input embeddings, or None when it has no nn.Embedding."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)


def check_token_ids(models, batch: dict) -> None:
    """Every token id of input_ids and KL_input_ids lies in [0, the input embedding rows) of
    each of ``models`` (one model or several). Checked before any forward: there an id out
    of range is an IndexError on the CPU, a device-side assert that ends the CUDA context on
    a GPU, and under ZeRO-3 or FSDP a failure in the middle of a forward's collectives. One
    pass over each key's ids (min and max, one device sync) whatever the number of models."""
    models = models if isinstance(models, (list, tuple)) else [models]
    known = [r for r in map(_embedding_rows, models) if r is not None]
    if not known:  # no nn.Embedding: the models' own checks apply
        return
    rows = min(known)
    for key in ("input_ids", "KL_input_ids"):
        ids = batch.get(key)
        if not isinstance(ids, torch.Tensor) or ids.numel() == 0:
            continue
        low, high = torch.stack([ids.min(), ids.max()]).tolist()
        if low < 0 or high >= rows:
            raise IndexError(f"{_TRAINER}: batch['{key}'] holds token id "
                             f"{low if low < 0 else high}, outside the model's vocabulary "
                             f"[0, {rows}) (its input embedding rows): the tokenizer and the "
                             "model disagree")


def _labels(inputs: dict, completion_mask):
    """Next-token targets: completion tokens only, labels[:, 1:] (a view)."""
    return inputs["input_ids"].masked_fill(completion_mask == 0, -100)[:, 1:]


def _shifted(model, inputs, completion_mask, aux_loss=False):
    """(logits, targets, offsets) for the library's ops: of a padded batch logits[:, :-1]
    and labels[:, 1:] as views (no copy of the logits) and offsets None; of a packed one
    (``completion_mask`` a PackedSequences) the row's [N, V] logits, its targets and
    offsets. Only the last T positions are read (prompt-learning PEFT prepends virtual
    tokens to the outputs). With ``aux_loss``, also the MoE load-balancing loss the model's
    forward computes."""
    outputs = model(**inputs, output_router_logits=True) if aux_loss else model(**inputs)
    logits = outputs.logits
    t = inputs["input_ids"].size(1)
    if isinstance(completion_mask, PackedSequences):
        shifted = (logits[0, logits.size(1) - t:], completion_mask.targets,
                   completion_mask.offsets)
    else:
        shifted = (logits[:, logits.size(1) - t:-1], _labels(inputs, completion_mask), None)
    return shifted + (outputs.aux_loss,) if aux_loss else shifted


class PackedSequences(NamedTuple):
    """A padded batch's sequences packed into one row, as transformers' packed-sequence
    attention takes them (pack_sequences): ``inputs`` are the model's keyword arguments
    (input_ids and position_ids [1, N], no attention_mask, use_cache=False), ``targets`` [N]
    the next-token target of each row (completion tokens only; -100 at each sequence's last
    row, whose next token belongs to the next sequence), ``offsets`` [B + 1] (int64) the CSR
    rows of the sequences, as the library's ops take them."""

    inputs: dict
    targets: torch.Tensor
    offsets: torch.Tensor


# The model inputs a packed row is built from; any other key of a batch (pixel_values,
# token_type_ids, a custom collator's) is per padded sequence, so such a batch stays padded.
_PACKABLE_INPUTS = frozenset({"input_ids", "attention_mask", "use_cache"})


def unpackable_batch_reason(inputs: dict) -> Optional[str]:
    """Why the model inputs of a padded batch (model_inputs) cannot be packed into one row,
    or None when they can: inputs other than input_ids and attention_mask, or an attention
    mask that is not right padding (each sequence's tokens first, at positions 0, 1, ...,
    as TRL 1.16's text collator pads), where the padded model's positions would differ."""
    extra = sorted(set(inputs) - _PACKABLE_INPUTS)
    if extra:
        return f"the batch holds model inputs other than input_ids and attention_mask ({extra})"
    mask = inputs.get("attention_mask")
    if mask is not None:
        lengths = mask.sum(1, keepdim=True)
        prefix = torch.arange(mask.size(1), device=mask.device) < lengths
        if not bool(torch.equal(mask.bool(), prefix)):
            return "its attention mask is not right padding (each sequence's tokens first)"
    return None


def pack_sequences(inputs: dict, completion_mask: torch.Tensor) -> PackedSequences:
    """The right-padded batch ``inputs`` (input_ids, attention_mask [B, T]) packed into one
    row of its N real tokens, sequence after sequence, with position_ids restarting at 0 for
    each: from these transformers builds the block-diagonal causal mask (SDPA, eager, flex)
    or the varlen call (flash-attention), so each sequence attends to itself only and sees
    the positions it has in the padded batch. Targets: row r of sequence s predicts token
    r + 1 where that token is a completion token of s, so the pairs (context, target) scored
    are exactly those of the padded batch's logits[:, :-1] against labels[:, 1:]."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    lengths = mask.sum(1)
    offsets = torch.zeros(ids.size(0) + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = lengths.cumsum(0)
    flat = ids[mask]
    positions = (mask.cumsum(1) - 1)[mask]
    scored = completion_mask.bool()[mask]
    targets = torch.full_like(flat, -100)
    targets[:-1] = flat[1:].masked_fill(~scored[1:], -100)
    if offsets.numel() > 2:  # a sequence's last row must not predict the next one's first token
        ends = offsets[1:-1] - 1
        targets[ends[ends >= 0]] = -100
    return PackedSequences(dict(input_ids=flat[None], position_ids=positions[None],
                                use_cache=False), targets, offsets)


# Attention implementations that read packed sequences from position_ids in transformers
# 5.x: the causal-mask builders (masking_utils: find_packed_sequence_indices, a
# block-diagonal mask) and flash-attention's varlen path (_is_packed_sequence, batch 1).
_PACKED_ATTENTION = frozenset({"eager", "sdpa", "flex_attention", "flash_attention_2",
                               "flash_attention_3", "flash_attention_4"})
_ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# Token mixers with state along the sequence (SSM, linear attention, recurrences, short
# convolutions): across a packed row that state would flow from one sequence into the next.
_RECURRENT_MIXER = re.compile(r"Mamba|Mixer|DeltaNet|ShortConv|Recurrent|Rglru|Rwkv|"
                              r"LinearAttention|LightningAttention|SSM|Ssm")


def _takes_position_ids(module) -> bool:
    try:
        parameters = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in parameters


def unpackable_model_reason(model, name: str) -> Optional[str]:
    """Why ``model`` cannot take packed sequences (padding_free), or None when it can: a
    prompt-learning PEFT model, an encoder-decoder, an attention implementation that does
    not read packed sequences from position_ids, layers other than (full, sliding, chunked)
    attention, a token mixer with state along the sequence, or a forward without
    position_ids (positions taken from the attention mask, as ALiBi models do)."""
    if is_peft_model(model) and any(getattr(c, "is_prompt_learning", False)
                                    for c in model.peft_config.values()):
        return (f"{name} is a prompt-learning PEFT model (its virtual tokens would be prepended "
                "to the packed row once, not to each sequence)")
    base = model.get_base_model() if is_peft_model(model) else model
    config = _text_config(model)
    if config is None:
        return f"{name} has no transformers config"
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in _PACKED_ATTENTION:
        return (f"{name}'s attention implementation {attention!r} does not read packed "
                f"sequences from position_ids (transformers does for {sorted(_PACKED_ATTENTION)})")
    kinds = sorted(set(getattr(config, "layer_types", None) or ()) - _ATTENTION_LAYERS)
    if kinds:
        return (f"{name} has {kinds} layers, which carry state along the whole packed row "
                "from one sequence into the next")
    for module in base.modules():
        if _RECURRENT_MIXER.search(type(module).__name__):
            return (f"{name} has {type(module).__name__} layers (a token mixer with state along "
                    "the sequence, which would carry from one packed sequence into the next)")
    for module in dict.fromkeys((base, _backbone(model))):
        if not _takes_position_ids(module):
            return (f"{name}'s forward ({type(module).__name__}) takes no position_ids: its "
                    "positions come from the attention mask")
    return None


@contextlib.contextmanager
def _lm_head_in_fp32(model):
    """The model's lm_head multiplies in fp32, outside autocast, for the calls inside.

    On a CPU without bf16 GEMM units (no AVX512-BF16 or AMX: kto_torch.BF16_GEMM is False),
    torch's bf16 GEMM runs at a fraction of fp32's speed (14.8 against 80 GFLOP/s on an AVX2
    EPYC), and the logits path forms all [B, T, V] logits with it. The logits then come out
    in fp32, the exact product rather than its bf16 rounding."""
    base = model.get_base_model() if is_peft_model(model) else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:  # a wrapped or custom head: left as it is
        yield
        return

    def forward(hidden):
        with torch.autocast("cpu", enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def _load_balancing_loss(model, router_logits, attention_mask):
    """The MoE auxiliary loss as TRL 1.16's fused head computes it (Mixtral's
    load-balancing loss, which every MoE family in transformers shares)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config = _text_config(model)
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    return load_balancing_loss_func(router_logits, experts, config.num_experts_per_tok,
                                    attention_mask)


def _text_config(model):
    base = model.get_base_model() if is_peft_model(model) else model
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def logit_transform(model) -> dict:
    """What the model does to lm_head(hidden) before its softmax, read from its (text) config
    as TRL 1.16's fused head reads it: the scale from ``logit_scale``, else
    ``output_multiplier``, else ``lm_head_multiplier``, else 1 / ``logits_scaling``
    (HyperCLOVA X multiplies by it); the soft-cap from ``final_logit_softcapping``. As the
    library's options (kto_torch.fused_linear_kto_loss's logit_scale, logit_softcap)."""
    config = _text_config(model)
    scale = None
    for field in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(config, field, None)
    scaling = getattr(config, "logits_scaling", None)
    if scale is None and scaling is not None:
        hyperclovax = getattr(config, "model_type", None) == "hyperclovax"
        scale = scaling if hyperclovax else 1.0 / scaling
    # c·tanh(z / c) is the same function for −c: the library takes |c|.
    softcap = abs(getattr(config, "final_logit_softcapping", None) or 0.0)
    return dict(logit_scale=float(1.0 if scale is None else scale),
                logit_softcap=float(softcap or 0.0))


def _backbone(model):
    """The module whose forward takes every model input (vision tower included) and returns
    the last hidden states: what TRL's fused head calls, ``model.base_model``."""
    base = model.get_base_model() if is_peft_model(model) else model
    return getattr(base, "base_model", base)


def _unfusable_reason(model, name: str) -> Optional[str]:
    """Why the fused head cannot stand in for `model`'s logits, or None when it can."""
    base = model.get_base_model() if is_peft_model(model) else model
    transform = logit_transform(model)
    if transform["logit_scale"] == 0.0:
        return f"{name}'s config scales its logits by 0"
    if is_peft_model(model) and any(getattr(c, "is_prompt_learning", False)
                                    for c in model.peft_config.values()):
        return (f"{name} is a prompt-learning PEFT model (its forward passes inputs_embeds "
                "with virtual tokens, not input_ids)")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        return f"{name} has no output embedding (lm_head) with a weight"
    if not isinstance(head, torch.nn.Linear):
        return f"{name}'s lm_head is a {type(head).__name__}, not one linear layer"
    if _backbone(model) is base:
        return f"{name} has no backbone module (model.base_model) returning the hidden states"
    return None


def _gathered(param):
    """The whole tensor of an FSDP2-sharded (DTensor) parameter, for a forward that reads it
    without calling its module (whose hooks would gather it). Its gradient is this rank's
    share of the batch's: averaged over the ranks on the way back (Partial("avg") to the
    parameter's sharding, a reduce-scatter), as FSDP2 averages the gradients it gathers
    itself. (``full_tensor()`` would slice the gradient without that reduction, leaving each
    rank's shard with its own batch's gradient only.)"""
    if param is None:
        return None
    whole = param.redistribute(param.device_mesh, [Replicate()] * param.device_mesh.ndim)
    return whole.to_local(grad_placements=[Partial("avg")] * param.device_mesh.ndim)


class HeadRequest:
    """What the patched forward computes from the last hidden states instead of the logits:
    ``model(**inputs, kto_head=HeadRequest(completion_mask, context, chunk_bytes[, loss]))``.
    ``completion_mask``: the padded batch's [B, T], or for a packed row (padding_free) its
    PackedSequences, called as ``model(**packed.inputs, kto_head=HeadRequest(packed, ...))``.

    Without ``loss``: (logp [B], num_tokens [B]) of the completion tokens
    (kto_torch.fused_linear_logprobs). With ``loss`` (the keyword arguments of
    kto_torch.fused_linear_kto_loss past the hidden states, weight and targets): its
    KTOOutput, differentiable w.r.t. the hidden states and the lm_head. ``context`` (the
    trainer's autocast) is entered around the backbone and the head."""

    def __init__(self, completion_mask, context, chunk_bytes: Optional[int],
                 loss: Optional[dict] = None, aux_loss: bool = False):
        self.completion_mask = completion_mask
        self.context = context
        self.chunk_bytes = chunk_bytes
        self.loss = loss
        self.aux_loss = aux_loss  # MoE: also return the load-balancing loss

    def __call__(self, model, **inputs):
        with self.context():
            if self.aux_loss:
                inputs["output_router_logits"] = True
            backbone = _backbone(model)(**inputs)
            head = model.get_output_embeddings()
            weight, bias = head.weight, head.bias
            if isinstance(weight, DTensor):  # an lm_head FSDP2 has not gathered (sharded alone)
                weight, bias = _gathered(weight), _gathered(bias)
            with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3: gathered for the call
                out = self._head(inputs, backbone.last_hidden_state, weight, bias,
                                 logit_transform(model))
            if not self.aux_loss:
                return out
            return out, _load_balancing_loss(model, backbone.router_logits,
                                             inputs.get("attention_mask"))

    def _head(self, inputs, hidden, weight, bias, transform):
        # Only the last T positions are read (prompt-learning PEFT prepends virtual tokens).
        # The head multiplies in the dtype autocast would give the lm_head's matmul, as TRL's
        # head does (its compute dtype): the autocast dtype when autocast is on, else the
        # hidden states' (gradients flow back through the casts). The library accumulates
        # in fp32 either way and keeps the logits in fp32. An fp32 head under half-precision
        # autocast goes to the op as it is: the op multiplies a half copy and returns the fp32
        # sums as its gradients, where a cast here would round them to half on the way back.
        t = inputs["input_ids"].size(1)
        packed = self.completion_mask if isinstance(self.completion_mask, PackedSequences) \
            else None
        if packed is not None:  # one row: every position, the targets say which are scored
            hidden = hidden[0, hidden.size(1) - t:].to(weight.device)
        else:
            hidden = hidden[:, hidden.size(1) - t:-1].to(weight.device)
        device = weight.device.type
        dtype = hidden.dtype
        if torch.is_autocast_enabled(device):
            autocast_dtype = torch.get_autocast_dtype(device)
            # On the CPU only where the library multiplies bf16 natively
            # (kto_torch.BF16_GEMM); otherwise it would widen back to fp32.
            if device != "cpu" or (autocast_dtype == torch.bfloat16 and kto_torch.BF16_GEMM):
                dtype = autocast_dtype
        hidden = hidden.to(dtype)
        if not (weight.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)):
            weight = weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        elif bias is not None:
            bias = bias.float()
        if packed is not None:
            labels, offsets = packed.targets.to(weight.device), packed.offsets
        else:
            labels, offsets = _labels(inputs, self.completion_mask).to(weight.device), None
        if self.loss is None:
            return kto_torch.fused_linear_logprobs(hidden, weight, labels, offsets, bias=bias,
                                                   chunk_bytes=self.chunk_bytes, **transform)
        return kto_torch.fused_linear_kto_loss(hidden, weight, labels, offsets, bias=bias,
                                               chunk_bytes=self.chunk_bytes, **transform,
                                               **self.loss)


def install_kto_head(model) -> None:
    """Patch ``model.forward`` (the transformers model; under PEFT its base model) so that
    ``model(**inputs, kto_head=request)`` runs the backbone and the fused head, the way TRL
    1.16's add_fused_lm_head enters its own head: the call goes through whatever wrapper
    accelerate put around the model (DDP, FSDP2, ZeRO-3), whose forward hooks prepare the
    gradient reduction and gather parameters. Without ``kto_head`` the forward is the one
    the model had (TRL's fused-head forward included), so generation is unchanged."""
    target = model.get_base_model() if is_peft_model(model) else model
    if getattr(target, "_kto_head_installed", False):
        return
    original = target.forward

    # The original signature: generate() validates its model kwargs against it.
    @functools.wraps(type(target).forward)
    def forward(self, *args, kto_head=None, **kwargs):
        if kto_head is None:
            return original(*args, **kwargs)
        if args:
            raise TypeError("kto_torch.trl: a forward with kto_head takes keyword inputs only")
        kwargs["use_cache"] = False
        return kto_head(self, **kwargs)

    target.forward = types.MethodType(forward, target)
    target._kto_head_installed = True


class NonFiniteModelOutputError(ValueError):
    """The policy or reference model produced NaN/inf log-probs: the library's message, and
    what most likely happened and what to try."""


def _non_finite(error: ValueError) -> bool:
    text = str(error)
    return text.startswith("kto") and "finite" in text and "options." not in text


def _without_liger(args: tuple, kwargs: dict) -> tuple:
    """The trainer's arguments with ``use_liger_kernel`` off (a copy; the caller's config is
    left as it is), logging why. The drop-in's own head (fused, or kto's lse kernel on the
    logits) computes what Liger's fused linear KTO loss would; TRL 1.16 would still patch
    the model's layers with Liger's Triton kernels under that head, a combination neither
    project tests, and one that needs a GPU."""
    positional = len(args) > 2
    config = args[2] if positional else kwargs.get("args")
    if config is None or not getattr(config, "use_liger_kernel", False):
        return args, kwargs
    config = copy.copy(config)
    config.use_liger_kernel = False
    logger.warning("kto_torch.trl.KTOTrainer: use_liger_kernel=True is ignored: Liger's kernels "
                   "are not used; kto's own head computes the log-probs and the loss")
    if positional:
        return args[:2] + (config,) + args[3:], kwargs
    return args, {**kwargs, "args": config}


class KTOTrainer(_TRLKTOTrainer):
    """TRL 1.16's KTOTrainer with its log-prob and loss path on kto ops.

    ``fused_linear``: None (default) runs the fused head wherever the policy's (and the
    reference model's) logits are ``lm_head(hidden)`` and the logits path elsewhere, logging
    why; True insists on the fused head (a ValueError names what prevents it); False always
    forms the logits. ``fused_chunk_bytes`` bounds the fused head's chunk of logits; None
    (the default) is the library's default for the device (64 MiB on the CPU, 1 GiB on CUDA,
    each measured: kto::kDefaultCpuChunkBytes, kDefaultCudaChunkBytes). ``fused_strategy``:
    the policy step's (kto_torch.fused_linear_kto_loss's ``strategy``): "keep_chunk" (the
    default), "recompute", or on CUDA "vocab_blocks" (a bf16/fp16 lm_head's gradient
    written once in its dtype, no fp32 [V, D] array). ``autocast_lm_head`` (logits path):
    None (default) multiplies the lm_head in fp32 under bf16 autocast on a CPU without bf16
    GEMM units (kto_torch.BF16_GEMM False; there torch's bf16 GEMM is several times slower
    than fp32), logging it, and in the autocast dtype elsewhere; True always in the autocast
    dtype (TRL's logits bit for bit); False always in fp32. ``padding_free``: None packs
    each batch's sequences (and the KL batch's) into one row with position_ids, the library's
    ops taking the CSR offsets, wherever the policy and the reference model can take packed
    input (unpackable_model_reason) and the batch is TRL's right-padded text batch
    (unpackable_batch_reason), padding elsewhere with the reason logged; True insists (a
    ValueError names what prevents it); False (the default) keeps TRL's padded batches."""

    def __init__(self, *args, fused_linear: Optional[bool] = None,
                 fused_chunk_bytes: Optional[int] = None, fused_strategy: str = "keep_chunk",
                 autocast_lm_head: Optional[bool] = None, padding_free: Optional[bool] = False,
                 **kwargs):
        if fused_strategy not in kto_torch.STRATEGIES:
            raise ValueError(f"kto_torch.trl.KTOTrainer: argument 'fused_strategy' must be one of "
                             f"{sorted(kto_torch.STRATEGIES)}; got {fused_strategy!r}")
        args, kwargs = _without_liger(args, kwargs)
        super().__init__(*args, **kwargs)
        if fused_strategy == "vocab_blocks" and self.accelerator.device.type != "cuda":
            raise ValueError("kto_torch.trl.KTOTrainer: argument 'fused_strategy' must be "
                             "'keep_chunk' or 'recompute' on "
                             f"{self.accelerator.device.type} ('vocab_blocks' runs on CUDA "
                             "only); got 'vocab_blocks'")
        self.fused_chunk_bytes = fused_chunk_bytes
        self.fused_strategy = fused_strategy
        self._stage = "the KTO step"
        reason = None
        if fused_linear is False:
            reason = "fused_linear=False was passed"
        else:
            reason = _unfusable_reason(self.model, "the policy")
            if reason is None and not self.precompute_ref_logps and self.ref_model is not None:
                reason = _unfusable_reason(self.ref_model, "the reference model")
            if reason is not None and fused_linear:
                raise ValueError(f"kto_torch.trl.KTOTrainer: fused_linear=True cannot be honoured: "
                                 f"{reason}; pass fused_linear=None (the default) to fall back to "
                                 "the logits path, or False")
        self.fused_linear = reason is None
        self.fused_linear_reason = reason
        if self.fused_linear:
            install_kto_head(self.model)
            if self.ref_model is not None:
                install_kto_head(self.ref_model)
            logger.info("kto_torch.trl.KTOTrainer: fused head (no logits formed), chunk %s",
                        "the library's default" if fused_chunk_bytes is None
                        else f"{fused_chunk_bytes} bytes")
        elif fused_linear is None:
            logger.warning("kto_torch.trl.KTOTrainer: the logits path, because %s", reason)
        self._init_padding_free(padding_free)
        slow_bf16 = (self.accelerator.device.type == "cpu" and self.args.bf16
                     and not kto_torch.BF16_GEMM)
        self.lm_head_in_fp32 = (not self.fused_linear and autocast_lm_head is not True
                                and (autocast_lm_head is False or slow_bf16))
        if self.lm_head_in_fp32 and autocast_lm_head is None:
            logger.info("kto_torch.trl.KTOTrainer: the lm_head multiplies in fp32, not under bf16 "
                        "autocast: this CPU has no bf16 GEMM units (AVX512-BF16/AMX), where "
                        "torch's bf16 GEMM is several times slower (autocast_lm_head=True "
                        "keeps TRL's bf16 logits)")

    def _init_padding_free(self, padding_free: Optional[bool]) -> None:
        """Whether batches are packed (self.padding_free), and if not, why
        (self.padding_free_reason)."""
        reason = None
        if padding_free is False:
            reason = "padding_free=False was passed"
        elif self._is_vision_dataset or self._is_vlm:
            reason = ("a vision-language model or dataset (TRL's vision collator left-pads the "
                      "prompts, and images are per sequence)")
        else:
            reason = unpackable_model_reason(self.model, "the policy")
            if reason is None and not self.precompute_ref_logps and self.ref_model is not None:
                reason = unpackable_model_reason(self.ref_model, "the reference model")
        if reason is not None and padding_free:
            raise ValueError(f"{_TRAINER}: padding_free=True cannot be honoured: {reason}; pass "
                             "padding_free=None to fall back to padded batches, or False")
        self.padding_free = reason is None
        self.padding_free_reason = reason
        self._padding_free_required = bool(padding_free)
        self._padding_free_fallbacks = set()
        if self.padding_free:
            logger.info("%s: padding-free (each batch packed into one row)", _TRAINER)
        elif padding_free is None:
            logger.warning("%s: padded batches, not padding-free, because %s", _TRAINER, reason)

    def _rows(self, inputs: dict, completion_mask):
        """(model inputs, completion mask) of one batch as the step runs it: packed into one
        row (PackedSequences in place of the mask) where self.padding_free and the batch
        allows it; otherwise as given. A batch that cannot be packed raises with
        padding_free=True and is padded, logged once per reason, with None."""
        if not self.padding_free:
            return inputs, completion_mask
        reason = unpackable_batch_reason(inputs)
        if reason is None:
            packed = pack_sequences(inputs, completion_mask)
            return packed.inputs, packed
        if self._padding_free_required:
            raise ValueError(f"{_TRAINER}: padding_free=True cannot pack this batch: {reason}")
        if reason not in self._padding_free_fallbacks:
            self._padding_free_fallbacks.add(reason)
            logger.warning("%s: a padded batch, not padding-free, because %s", _TRAINER, reason)
        return inputs, completion_mask

    def _shifted(self, model, inputs, completion_mask, aux_loss=False):
        """The logits path's shifted logits and labels (_shifted), the lm_head in fp32 where
        self.lm_head_in_fp32 says so."""
        with (_lm_head_in_fp32(self.accelerator.unwrap_model(model)) if self.lm_head_in_fp32
              else contextlib.nullcontext()):
            return _shifted(model, inputs, completion_mask, aux_loss)

    def _kto_supported(self) -> bool:
        return (self.ref_model is not None or self.precompute_ref_logps
                or self._reference_is_base_model())

    def _reference_is_base_model(self) -> bool:
        """PEFT without a ref_model: as TRL, the reference is the policy with its adapter
        disabled (or switched to an adapter named "ref")."""
        return self.ref_model is None and is_peft_model(self.model)

    def _reference(self, model):
        """(the reference model, the context it runs in)."""
        if self._reference_is_base_model():
            unwrapped = self.accelerator.unwrap_model(self.model)
            name = "ref" if "ref" in unwrapped.peft_config else None
            return model, use_adapter(unwrapped, adapter_name=name)
        return self.ref_model, contextlib.nullcontext()

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._kto_supported() or return_outputs:
            return super()._compute_loss(model, inputs, return_outputs)
        return self._kto_loss(model, inputs)

    def _attempt(self, model, step):
        """step() → (result, None), or (None, the error): a rank that fails still joins the
        collective that follows. A non-finite model output becomes NonFiniteModelOutputError
        here, on the rank that saw it, so the message names the cause."""
        try:
            return step(), None
        except ValueError as error:
            if not _non_finite(error):
                error.add_note(f"(in {self._stage})")
                return None, error
            converted = NonFiniteModelOutputError(self._non_finite_message(model, error))
            converted.__cause__ = error
            return None, converted
        except Exception as error:  # noqa: BLE001 — carried to every rank
            error.add_note(f"(in {self._stage})")
            return None, error

    def _sum_or_fail(self, values, error, phase: str, size: int):
        """One process: raise the error. Several: all-reduce (SUM) values with a failure flag;
        every rank raises PeerError if any failed (kto_torch.distributed)."""
        if self.accelerator.num_processes == 1:
            if error is not None:
                raise error
            return values
        import kto_torch.distributed as kto_dist

        return kto_dist.sum_or_fail(values, error, phase, size=size,
                                    device=self.accelerator.device, fn=_TRAINER)

    def _kto_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool)
        target = self._rows(model_inputs(batch), batch["completion_mask"])
        kl_batch = (self._rows(model_inputs(batch, kl=True), batch.get("KL_completion_mask"))
                    if self.calculate_KL else None)
        fused = self.fused_linear
        # The fused head runs inside each model's own forward (model(..., kto_head=request)):
        # through the DDP/FSDP wrapper accelerate put around the policy, under the same
        # autocast for the policy and the reference model, so that at step 1 (policy =
        # reference) their log-probs agree bit for bit.
        autocast = self.accelerator.autocast

        def logprobs(m, inputs, completion_mask):
            if fused:
                return m(**inputs, kto_head=HeadRequest(completion_mask, autocast,
                                                        self.fused_chunk_bytes))
            return kto_torch.sequence_logprobs(*self._shifted(m, inputs, completion_mask))

        def stage(name, step):
            """One stage before the KL all-reduce. With several processes every rank learns
            after each stage whether any failed: under ZeRO-3 or FSDP the next forward
            all-gathers parameters, a collective that a failed rank would never join."""
            self._stage = name
            done, error = self._attempt(model, step)
            self._sum_or_fail(None, error, "before the KL all-reduce", size=0)
            return done

        stage("the batch check", lambda: self._check_token_ids(model, batch))
        with torch.no_grad():
            if self.calculate_KL:
                kl_logp, kl_tokens = stage("the policy's forward on the KL batch",
                                           lambda: logprobs(model, *kl_batch))
            if self.precompute_ref_logps:
                ref_logp, ref_kl_logp = batch["ref_logps"], batch.get("ref_KL_logps")
            else:
                reference, context = self._reference(model)
                # As TRL: no checkpointing for a forward without gradients.
                with context, disable_gradient_checkpointing(
                        self.model, self.args.gradient_checkpointing_kwargs):
                    ref_logp, _ = stage("the reference model's forward",
                                        lambda: logprobs(reference, *target))
                    if self.calculate_KL:
                        ref_kl_logp, _ = stage("the reference model's forward on the KL batch",
                                               lambda: logprobs(reference, *kl_batch))
        global_kl = None
        if self.calculate_KL:  # the local (S, C) of the KL batch, summed over the ranks
            # It can fail on one rank alone (a non-finite precomputed ref_KL_logps): that rank
            # still joins the all-reduce, with its error.
            local, error = None, None
            try:
                local = kto_torch.kl_partial(kl_logp, ref_kl_logp, kl_tokens)
            except Exception as failure:  # noqa: BLE001 — carried to every rank
                failure.add_note("(in the KL estimate)")
                error = failure
            global_kl = self._sum_or_fail(local, error, "before the KL all-reduce", size=2).cpu()

        # TRL's entropy and logits/* metrics, from the pass that computes each token's
        # log-softmax.
        options = dict(beta=self.beta, desirable_weight=self.desirable_weight,
                       undesirable_weight=self.undesirable_weight, loss_type=self.loss_type,
                       token_statistics=True)

        def policy_step():
            self._stage = "the policy's forward or the loss"
            if fused:
                # z0 is detached: the library's own estimate from the global (S, C).
                z0 = kto_torch.reference_point(global_kl) if global_kl is not None else 0.0
                loss = dict(reference_logp=ref_logp, desirable=desirable,
                            reference_point="fixed" if self.calculate_KL else "zero",
                            fixed_z0=z0, strategy=self.fused_strategy, **options)
                request = HeadRequest(target[1], autocast, self.fused_chunk_bytes, loss,
                                      aux_loss=self.aux_loss_enabled)
                out = model(**target[0], kto_head=request)
                return out if self.aux_loss_enabled else (out, None)
            logits, labels, offsets, *aux = self._shifted(model, *target,
                                                          aux_loss=self.aux_loss_enabled)
            out = kto_torch.kto_loss(
                logits, labels, offsets, ref_logp, desirable,
                reference_point="kl_batch" if self.calculate_KL else "zero",
                global_kl=global_kl, **options)
            return out, (aux[0] if aux else None)

        done, error = self._attempt(model, policy_step)
        self._sum_or_fail(None, error,
                          "in the target batch's step", size=0)
        out, aux_loss = done
        self._log_kto_metrics(mode, out, desirable, batch)
        if aux_loss is None:
            return out.loss
        # MoE: as TRL 1.16, the architecture's coefficient times the load-balancing loss.
        self._metrics[mode]["aux_loss"].append(
            self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        return out.loss + self.router_aux_loss_coef * aux_loss

    def _check_token_ids(self, model, batch) -> None:
        """check_token_ids against the policy and, where it is a model of its own, the
        reference model."""
        models = [self.accelerator.unwrap_model(model)]
        if self.ref_model is not None and not self.precompute_ref_logps:
            models.append(self.accelerator.unwrap_model(self.ref_model))
        check_token_ids(models, batch)

    def _non_finite_message(self, model, error) -> str:
        args = self.args
        unwrapped = self.accelerator.unwrap_model(model)
        # This rank's own shards only (FSDP2's DTensors: to_local(); ZeRO-3's partitions): a
        # check of the whole tensors would start collectives that the other ranks, already
        # waiting in the failure all-reduce, never join.
        params = list(unwrapped.parameters())
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        bad = sum(1 for p in local if p.numel() and not bool(torch.isfinite(p.detach()).all()))
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
        precision = ("fp16 autocast" if args.fp16 else "bf16 autocast" if args.bf16
                     else "no mixed precision")
        if bad:
            cause = (f"the policy diverged: {bad} of its {len(params)} parameter tensors already "
                     f"hold NaN/inf after {self.state.global_step} optimizer step(s), so every "
                     "output is non-finite")
        elif "float16" in dtypes or args.fp16:
            cause = ("a float16 overflow: the parameters are still finite, but an activation or "
                     "logit exceeded float16's range (|x| > 65504) in the forward, typically "
                     "after updates too large for the model (a diverging run)")
        else:
            cause = ("the model diverged or overflowed: its parameters are finite but its "
                     "forward produced NaN/inf")
        clip = (f"tighter gradient clipping (max_grad_norm, now {args.max_grad_norm:g})"
                if args.max_grad_norm and args.max_grad_norm > 0
                else "gradient clipping (max_grad_norm=1.0; now off)")
        return (
            f"kto_torch.trl.KTOTrainer: non-finite values (NaN/inf) in {self._stage} at step "
            f"{self.state.global_step + 1} (parameters {'/'.join(dtypes)}, {precision}). "
            f"Most likely cause: {cause}. Try: bf16 (bf16=True with fp32 weights, or load the "
            f"model in bfloat16) or fp32 instead of float16; a lower learning rate (now "
            f"{args.learning_rate:g}; TRL's default is 1e-6); {clip}. kto stops here where "
            f"TRL's own trainer would go on training into NaN parameters. Library error: {error}")

    def _log_token_statistics(self, m, out, desirable):
        """TRL's entropy (mean over the completion tokens of the batch, all ranks) and
        logits/chosen, logits/rejected (mean per-token mean logit over each side's completion
        tokens), gathered sum by sum as TRL gathers them (gather_for_metrics)."""
        n = out.num_tokens.to(torch.float64).cpu()
        entropy, mean_logit = out.entropy_sum.cpu(), out.mean_logit_sum.cpu()
        desirable = desirable.cpu()
        sums = (entropy.sum(), n.sum(), mean_logit[desirable].sum(), n[desirable].sum(),
                mean_logit[~desirable].sum(), n[~desirable].sum())
        device = self.accelerator.device
        h, tokens, zc, nc, zr, nr = (
            self.accelerator.gather_for_metrics(x.to(device)).sum().item() for x in sums)
        m["entropy"].append(h / tokens if tokens > 0 else 0.0)
        if nc > 0:
            m["logits/chosen"].append(zc / nc)
        if nr > 0:
            m["logits/rejected"].append(zr / nr)

    def _log_kto_metrics(self, mode, out, desirable, batch):
        m = self._metrics[mode]
        m["kl"].append(out.metrics["kl"].item())
        if out.entropy_sum is not None:
            self._log_token_statistics(m, out, desirable)
        gather = self.accelerator.gather_for_metrics
        num_chosen = gather(desirable.sum().to(self.accelerator.device)).sum().item()
        num_rejected = gather((~desirable).sum().to(self.accelerator.device)).sum().item()
        if mode == "train":
            tokens = gather(batch["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        reward, logp = out.reward, out.logp
        if num_chosen > 0:
            m["rewards/chosen"].append(gather(reward[desirable].sum().to(self.accelerator.device))
                                       .sum().item() / num_chosen)
            m["logps/chosen"].append(gather(logp[desirable].sum().to(self.accelerator.device))
                                     .sum().item() / num_chosen)
        if num_rejected > 0:
            m["rewards/rejected"].append(gather(reward[~desirable].sum().to(self.accelerator.device))
                                         .sum().item() / num_rejected)
            m["logps/rejected"].append(gather(logp[~desirable].sum().to(self.accelerator.device))
                                       .sum().item() / num_rejected)
        if num_chosen > 0 and num_rejected > 0:
            m["rewards/margins"].append(m["rewards/chosen"][-1] - m["rewards/rejected"][-1])
