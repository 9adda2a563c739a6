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

Padding-free batches: each batch's sequences, and the KL batch's, run as one packed row
(input_ids and position_ids [1, N], from which transformers builds the block-diagonal
causal mask, or flash-attention's varlen call), the ops taking the sequences' CSR offsets;
the (context, target) pairs scored are exactly the padded batch's (pack_sequences). By
default a batch is packed where that costs fewer estimated FLOPs than padding it
(packing_pays). Models that cannot keep packed sequences apart (VLMs, recurrent or
convolutional token mixers, attention without position_ids, a mask built without them)
and batches with other model inputs are padded, the reason logged (``padding_free=True``
refuses them, by name).

The modules: this one holds the trainer (and re-exports kto_torch.hf's names),
kto_torch.hf the transformers side (the fused head patched into the model, the logits
path's views, packing), kto_torch._trl_compat every TRL-internal import.

Non-finite values (a float16 overflow, a diverged model) stop training with
``NonFiniteModelOutputError`` (a ValueError) that says what most likely happened
and what to try, where TRL's own trainer would go on with NaN parameters.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from typing import Optional

import torch
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor

import kto_torch

from ._trl_compat import TRLKTOTrainer as _TRLKTOTrainer
from ._trl_compat import disable_gradient_checkpointing, use_adapter
from .hf import (
    HeadRequest,
    LayoutCosts,
    PackedSequences,
    _lm_head_in_fp32,
    _shifted,
    _unfusable_reason,
    install_kto_head,
    layout_costs,
    logit_transform,
    pack_sequences,
    packed_attention_reason,
    packing_pays,
    unpackable_batch_reason,
    unpackable_model_reason,
)

__all__ = ["HeadRequest", "KTOTrainer", "LayoutCosts", "NonFiniteModelOutputError",
           "PackedSequences", "check_token_ids", "install_kto_head", "layout_costs",
           "logit_transform", "model_inputs", "pack_sequences", "packed_attention_reason",
           "packing_pays", "unpackable_batch_reason", "unpackable_model_reason"]

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


class NonFiniteModelOutputError(ValueError):
    """The policy or reference model produced NaN/inf log-probs: the library's message, and
    what most likely happened and what to try."""


def _non_finite(error: ValueError) -> bool:
    """A non-finite value the model produced, not a bad option (an option's error names it)."""
    text = str(error)
    return (text.startswith("kto") and "finite" in text
            and getattr(error, "argument", "") not in kto_torch.OPTION_NAMES)


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
    dtype (TRL's logits bit for bit); False always in fp32. ``padding_free``: None (default)
    packs a batch's sequences (and the KL batch's) into one row with position_ids, the
    library's ops taking the CSR offsets, where the policy and the reference model can take
    packed input (unpackable_model_reason at construction, packed_attention_reason at the
    first step), the batch is TRL's right-padded text batch (unpackable_batch_reason) and
    the packed row costs fewer estimated FLOPs than the padded batch (packing_pays; on the
    CPU eager and SDPA attention compute the packed row's whole N × N mask), padding
    elsewhere, with the reason logged where the model or the batch cannot be packed; True
    packs every batch (a ValueError names what prevents it); False keeps TRL's padded
    batches."""

    def __init__(self, *args, fused_linear: Optional[bool] = None,
                 fused_chunk_bytes: Optional[int] = None, fused_strategy: str = "keep_chunk",
                 autocast_lm_head: Optional[bool] = None, padding_free: Optional[bool] = None,
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
        self._packing_verified = False
        self._layout_costs: Optional[LayoutCosts] = None
        if self.padding_free:
            logger.info("%s: padding-free, %s", _TRAINER,
                        "every batch packed into one row" if padding_free else
                        "each batch packed into one row where that costs fewer estimated FLOPs "
                        "than padding it")
        elif padding_free is None:
            logger.warning("%s: padded batches, not padding-free, because %s", _TRAINER, reason)

    def _verify_packing(self, model, batch) -> None:
        """At the first packed step: packed_attention_reason for the policy and a separate
        reference model (every rank alike, so a sharded forward's collectives match). A
        model that would let packed sequences attend to each other turns padding_free off
        (None, logged) or raises (True)."""
        inputs = model_inputs(batch)
        if unpackable_batch_reason(inputs) is not None:
            return  # this batch stays padded; a later one is checked
        models = [(model, "the policy")]
        if self.ref_model is not None and not self.precompute_ref_logps:
            models.append((self.ref_model, "the reference model"))
        for m, name in models:
            reason = packed_attention_reason(m, inputs, name,
                                             functools.partial(self._forward_context, m))
            if reason is not None:
                if self._padding_free_required:
                    raise ValueError(f"{_TRAINER}: padding_free=True cannot be honoured: {reason}")
                logger.warning("%s: padded batches, not padding-free, because %s", _TRAINER,
                               reason)
                self.padding_free, self.padding_free_reason = False, reason
                break
        self._packing_verified = True

    def _rows(self, inputs: dict, completion_mask):
        """(model inputs, completion mask) of one batch as the step runs it: packed into one
        row (PackedSequences in place of the mask) where self.padding_free and the batch
        allows it, with padding_free=None only where the packed row costs fewer FLOPs
        (packing_pays); otherwise as given. A batch that cannot be packed raises with
        padding_free=True and is padded, logged once per reason, with None. The policy and
        the reference model run each batch in the same layout."""
        if not self.padding_free:
            return inputs, completion_mask
        reason = unpackable_batch_reason(inputs)
        if reason is None:
            if not (self._padding_free_required or self._packing_pays(inputs)):
                return inputs, completion_mask
            packed = pack_sequences(inputs, completion_mask)
            return packed.inputs, packed
        if self._padding_free_required:
            raise ValueError(f"{_TRAINER}: padding_free=True cannot pack this batch: {reason}")
        if reason not in self._padding_free_fallbacks:
            self._padding_free_fallbacks.add(reason)
            logger.warning("%s: a padded batch, not padding-free, because %s", _TRAINER, reason)
        return inputs, completion_mask

    def _packing_pays(self, inputs: dict) -> bool:
        """packing_pays for this batch, with the policy's layout_costs (computed once)."""
        if self._layout_costs is None:
            self._layout_costs = layout_costs(self.accelerator.unwrap_model(self.model),
                                              logits=not self.fused_linear)
        mask = inputs.get("attention_mask")
        if mask is None:
            return False  # no padding to save
        return packing_pays(self._layout_costs, mask.sum(1).tolist(), mask.size(1))

    @contextlib.contextmanager
    def _forward_context(self, model):
        """A whole forward of ``model`` as a step runs it (the padding-free probe's): inside
        the trainer's autocast, the lm_head in fp32 where self.lm_head_in_fp32 says so."""
        with self.accelerator.autocast(), (
                _lm_head_in_fp32(self.accelerator.unwrap_model(model)) if self.lm_head_in_fp32
                else contextlib.nullcontext()):
            yield

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
        if self.padding_free and not self._packing_verified:
            stage("the padding-free check", lambda: self._verify_packing(model, batch))
        target = self._rows(model_inputs(batch), batch["completion_mask"])
        kl_batch = (self._rows(model_inputs(batch, kl=True), batch.get("KL_completion_mask"))
                    if self.calculate_KL else None)
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
