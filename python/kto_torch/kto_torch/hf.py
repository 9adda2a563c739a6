"""The transformers side of the TRL drop-in (kto_torch.trl): the fused head patched into a
model's forward (install_kto_head, HeadRequest), what the model's config says about its
logits (logit_transform) and whether the fused head can stand in for them, the logits
path's shifted views, and padding-free batches: packing a right-padded batch into one row
(pack_sequences) and whether a model keeps packed sequences apart
(unpackable_model_reason, packed_attention_reason). kto_torch.trl re-exports each public
name, so ``from kto_torch.trl import HeadRequest`` and the like keep working."""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import types
from typing import NamedTuple, Optional

import torch
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor, Partial, Replicate

import kto_torch

from ._trl_compat import load_balancing_loss_func, maybe_gather_lm_head_ctx, packing_seen

__all__ = ["HeadRequest", "LayoutCosts", "PackedSequences", "install_kto_head",
           "layout_costs", "logit_transform", "pack_sequences", "packed_attention_reason",
           "packing_pays", "unpackable_batch_reason", "unpackable_model_reason"]


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


class LayoutCosts(NamedTuple):
    """What one forward of a model costs per position and per attended (query, key) pair,
    in FLOPs, estimated from its size (layout_costs); ``dense``: whether its attention
    computes every pair of a packed row (a dense block-diagonal mask) rather than each
    sequence's own."""

    per_position: float
    per_pair: float
    dense: bool


def _numel(param) -> int:
    return getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3: the whole tensor's


def layout_costs(model, logits: bool) -> LayoutCosts:
    """The forward FLOPs of ``model`` per position: 2 per backbone parameter (input
    embeddings excluded; an MoE's idle experts included), plus 2 V D for the lm_head on the
    logits path (the fused head computes the scored rows only, the same in either layout);
    per (query, key) pair: 4 · hidden_size per layer (QKᵀ and the weighted sum). Eager and
    SDPA attention compute every pair of a packed row under its dense block-diagonal mask;
    flash-attention's varlen kernels and flex attention's block mask only each sequence's."""
    backbone = _backbone(model)
    embedded = {id(p) for m in backbone.modules() if isinstance(m, torch.nn.Embedding)
                for p in m.parameters(recurse=False)}
    params = sum(_numel(p) for p in backbone.parameters() if id(p) not in embedded)
    per_position = 2.0 * params
    if logits:
        base = model.get_base_model() if is_peft_model(model) else model
        per_position += 2.0 * _numel(base.get_output_embeddings().weight)
    config = _text_config(model)
    hidden = getattr(config, "hidden_size", None) or 0
    layers = getattr(config, "num_hidden_layers", None) or 0
    attention = getattr(config, "_attn_implementation", None)
    return LayoutCosts(per_position, 4.0 * hidden * layers, attention in ("eager", "sdpa"))


def packing_pays(costs: LayoutCosts, lengths, padded_length: int) -> bool:
    """Whether one forward of sequences of ``lengths`` tokens costs fewer FLOPs packed into
    one row (N = Σ L positions; N² pairs under a dense mask, else Σ L²) than padded to
    ``padded_length`` = T (B·T positions; B·T² pairs under a mask, else Σ L²). Backward and
    recomputation scale both alike. Without padding the packed row never pays."""
    lengths = [int(n) for n in lengths]
    n, b = sum(lengths), len(lengths)
    own = sum(n_i * n_i for n_i in lengths)
    packed = n * costs.per_position + (n * n if costs.dense else own) * costs.per_pair
    padded = (b * padded_length * costs.per_position
              + (b * padded_length ** 2 if costs.dense else own) * costs.per_pair)
    return packed < padded


def _prompt_learning(model) -> bool:
    """A PEFT model with a prompt-learning adapter (prefix or prompt tuning): its forward
    prepends virtual tokens."""
    return is_peft_model(model) and any(getattr(c, "is_prompt_learning", False)
                                        for c in model.peft_config.values())


def unpackable_model_reason(model, name: str) -> Optional[str]:
    """Why ``model`` cannot take packed sequences (padding_free), or None when it can: a
    prompt-learning PEFT model, an encoder-decoder, an attention implementation that does
    not read packed sequences from position_ids, layers other than (full, sliding, chunked)
    attention, a token mixer with state along the sequence, or a forward without
    position_ids (positions taken from the attention mask, as ALiBi models do). The model
    is named with its class. What this cannot see (a model that takes position_ids but
    builds its mask without them) packed_attention_reason finds at the first step."""
    base = model.get_base_model() if is_peft_model(model) else model
    who = f"{name} ({type(base).__name__})"
    if _prompt_learning(model):
        return (f"{who} is a prompt-learning PEFT model (its virtual tokens would be prepended "
                "to the packed row once, not to each sequence)")
    config = _text_config(model)
    if config is None:
        return f"{who} has no transformers config"
    if getattr(config, "is_encoder_decoder", False):
        return f"{who} is an encoder-decoder model"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in _PACKED_ATTENTION:
        return (f"{who} uses the attention implementation {attention!r}, which does not read "
                f"packed sequences from position_ids (transformers' {sorted(_PACKED_ATTENTION)} "
                "do)")
    kinds = sorted(set(getattr(config, "layer_types", None) or ()) - _ATTENTION_LAYERS)
    if kinds:
        return (f"{who} has {kinds} layers, which carry state along the whole packed row from "
                "one sequence into the next")
    for module in base.modules():
        if _RECURRENT_MIXER.search(type(module).__name__):
            return (f"{who} has {type(module).__name__} layers (a token mixer with state along "
                    "the sequence, which would carry from one packed sequence into the next)")
    for module in dict.fromkeys((base, _backbone(model))):
        if not _takes_position_ids(module):
            return (f"{who}: {type(module).__name__}.forward takes no position_ids (its "
                    "positions come from the attention mask)")
    return None


def packed_attention_reason(model, inputs: dict, name: str, context=contextlib.nullcontext):
    """Why ``model`` does not keep packed sequences apart, found by one forward (no gradient,
    inside ``context``) of a row packing two short sequences (the first tokens of the first
    two sequences of ``inputs``, a padded batch's model inputs), or None when transformers
    built its attention from their position_ids. A model can take position_ids and still
    build its causal mask without them (OPT in transformers 5.24): its sequences would
    attend to each other. Also None for a batch of fewer than two sequences (nothing to
    tell apart)."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    lengths = (mask.sum(1) if mask is not None
               else torch.full((ids.size(0),), ids.size(1), device=ids.device))
    rows = [i for i in range(ids.size(0)) if int(lengths[i]) > 0][:2]
    if len(rows) < 2:
        return None
    probe = torch.stack([ids[i, :2] if int(lengths[i]) >= 2 else ids[i, :1].repeat(2)
                         for i in rows])
    packed = pack_sequences(dict(input_ids=probe), torch.zeros_like(probe))
    with packing_seen() as seen, torch.no_grad(), context():
        model(**packed.inputs)
    unwrapped = getattr(model, "module", model)  # DDP, DeepSpeed
    base = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
    name = f"{name} ({type(base).__name__})"
    if seen is None:
        return ("this transformers has neither masking_utils.find_packed_sequence_indices nor "
                "modeling_flash_attention_utils._is_packed_sequence, by which the drop-in "
                f"checks that {name} keeps packed sequences apart")
    if not any(seen):
        return (f"{name} does not build its attention mask from position_ids (a forward of two "
                "packed sequences did not reach transformers' packed-sequence detection), so "
                "packed sequences would attend to each other")
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
    if _prompt_learning(model):
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
