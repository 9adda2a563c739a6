"""A drop-in for TRL's KTOTrainer whose log-prob and loss path runs on kto ops.

    -from trl import KTOTrainer
    +from kto_torch.trl import KTOTrainer

Everything else — data collation (text or vision-language), the KL dataset
(completions rotated by one), reference log-prob precomputation, the optimiser
loop and logging — stays TRL's. Per step, the subclass calls the model with
every model input TRL's own step passes (everything the collator produced but
the loss's own entries: pixel_values, image_grid_thw, token_type_ids,
mm_token_type_ids, ...; the KL batch with its KL_* entries in their place),
computes the policy logits of the target batch, forwards the KL batch and
(unless precomputed) the reference model through ``kto_torch.sequence_logprobs``,
and takes the loss, its metrics and the gradient to the logits from
``kto_torch.kto_loss``. Across data-parallel ranks the KL estimate is the global
(S, C) of one all-reduce, which equals TRL's mean of per-rank means when ranks
hold equal batches. Not covered (they fall back to TRL's own path): PEFT models
without a separate reference model and MoE auxiliary losses. TRL's `entropy`
and `logits/*` metrics are not logged: they would cost an extra pass over the
logits.

``KTOTrainer(..., fused_linear=True)`` goes one step further: the policy, the
KL batch and the reference model run their backbones only (``model.base_model``,
vision tower included, under the trainer's autocast exactly as accelerate's
forward wrapper would run them), and log-probs, loss and gradients come from the
last hidden states and the lm_head through ``kto_torch.fused_linear_kto_loss`` /
``fused_linear_logprobs`` — the logits of the batch never exist
(``fused_chunk_bytes`` bounds the chunk; the default was chosen by
bench/compare_trl.py, see docs/performance.md). Models whose logits are not
``lm_head(hidden)`` (soft-capping, logit scales) and multi-process runs (the
backbone would be called past the DDP wrapper) keep the logits path.

Non-finite values (a float16 overflow, a diverged model) stop training with
``NonFiniteModelOutputError`` (a ValueError) that says what most likely happened
and what to try, where TRL's own trainer would go on with NaN parameters.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import is_peft_model
from trl import KTOTrainer as _TRLKTOTrainer

import kto_torch

# fused_chunk_bytes default: bench/compare_trl.py, docs/performance.md ("TRL 1.16 trainer step").
DEFAULT_FUSED_CHUNK_BYTES = 64 << 20

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


def _labels(inputs: dict, completion_mask):
    """Next-token targets: completion tokens only, labels[:, 1:] (a view)."""
    return inputs["input_ids"].masked_fill(completion_mask == 0, -100)[:, 1:]


def _shifted(model, inputs, completion_mask):
    """logits[:, :-1] and labels[:, 1:] as views: no copy of the logits. Only the last T
    positions are read (prompt-learning PEFT prepends virtual tokens to the outputs)."""
    logits = model(**inputs).logits
    t = inputs["input_ids"].size(1)
    return logits[:, logits.size(1) - t:-1], _labels(inputs, completion_mask)


# Config fields of models whose logits are more than lm_head(hidden) (as TRL 1.16 reads them).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                     "lm_head_multiplier", "logits_scaling")


def _backbone(model):
    """The module whose forward takes every model input (vision tower included) and returns
    the last hidden states: what TRL's fused head calls, ``model.base_model``."""
    base = model.get_base_model() if is_peft_model(model) else model
    return getattr(base, "base_model", base)


def _fusable(model) -> bool:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (isinstance(getattr(head, "weight", None), torch.Tensor)
            and _backbone(model) is not (model.get_base_model() if is_peft_model(model) else model))


def _hidden(model, inputs, completion_mask):
    """Last hidden states [:, :-1], labels [:, 1:], and the lm_head's weight and bias in the
    hidden states' dtype (under autocast the backbone returns bf16/fp16 while the weight
    stays fp32: cast as autocast would for the lm_head's matmul; gradients flow back
    through it)."""
    hidden = _backbone(model)(**inputs).last_hidden_state
    t = inputs["input_ids"].size(1)
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    hidden = hidden[:, hidden.size(1) - t:-1].to(weight.device)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
    return hidden, _labels(inputs, completion_mask), weight, bias


class NonFiniteModelOutputError(ValueError):
    """The policy or reference model produced NaN/inf log-probs: the library's message, and
    what most likely happened and what to try."""


def _non_finite(error: ValueError) -> bool:
    text = str(error)
    return text.startswith("kto") and "finite" in text and "options." not in text


class KTOTrainer(_TRLKTOTrainer):
    def __init__(self, *args, fused_linear: bool = False,
                 fused_chunk_bytes: int = DEFAULT_FUSED_CHUNK_BYTES, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_linear = fused_linear
        self.fused_chunk_bytes = fused_chunk_bytes
        self._stage = "the KTO step"

    def _kto_supported(self) -> bool:
        return self.ref_model is not None or self.precompute_ref_logps

    def _fused(self, model) -> bool:
        # One process only: the backbone is called past the DDP/FSDP wrapper, whose
        # forward prepares the gradient reduction.
        return (self.fused_linear and self.accelerator.num_processes == 1
                and _fusable(self.accelerator.unwrap_model(model))
                and (self.precompute_ref_logps or _fusable(self.ref_model)))

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._kto_supported() or self.aux_loss_enabled or return_outputs:
            return super()._compute_loss(model, inputs, return_outputs)
        try:
            return self._kto_loss(model, inputs)
        except ValueError as error:
            if not _non_finite(error):
                raise
            raise NonFiniteModelOutputError(self._non_finite_message(model, error)) from error

    def _kto_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool)
        target = (model_inputs(batch), batch["completion_mask"])
        kl_batch = (model_inputs(batch, kl=True), batch.get("KL_completion_mask"))

        fused = self._fused(model)
        chunk = self.fused_chunk_bytes
        policy = self.accelerator.unwrap_model(model) if fused else model
        # The fused path calls backbones directly, past the forward that accelerate wrapped in
        # autocast under mixed precision: run the policy and the reference model in that same
        # context, so that at step 1 (policy = reference) their log-probs agree bit for bit.
        # The logits path calls the models' own forwards, as TRL does.
        context = self.accelerator.autocast if fused else contextlib.nullcontext

        def logprobs(m, inputs, completion_mask):
            self._stage = (("the policy's" if m is policy else "the reference model's")
                           + (" forward on the KL batch" if inputs is kl_batch[0]
                              else " forward"))
            with context():
                if not fused:
                    return kto_torch.sequence_logprobs(*_shifted(m, inputs, completion_mask))
                hidden, labels, weight, bias = _hidden(m, inputs, completion_mask)
                return kto_torch.fused_linear_logprobs(hidden, weight, labels, bias=bias,
                                                       chunk_bytes=chunk)

        global_kl = None
        if self.calculate_KL:
            with torch.no_grad():
                kl_logp, kl_tokens = logprobs(policy, *kl_batch)
        if self.precompute_ref_logps:
            ref_logp = batch["ref_logps"]
            ref_kl_logp = batch.get("ref_KL_logps")
        else:
            with torch.no_grad():
                ref_logp, _ = logprobs(self.ref_model, *target)
                ref_kl_logp = None
                if self.calculate_KL:
                    ref_kl_logp, _ = logprobs(self.ref_model, *kl_batch)
        if self.calculate_KL:
            partial = kto_torch.kl_partial(kl_logp, ref_kl_logp, kl_tokens)
            if self.accelerator.num_processes > 1:  # one all-reduce of (S, C)
                partial = self.accelerator.reduce(partial.to(device), reduction="sum").cpu()
            global_kl = partial

        self._stage = "the policy's forward or the loss"
        options = dict(beta=self.beta, desirable_weight=self.desirable_weight,
                       undesirable_weight=self.undesirable_weight, loss_type=self.loss_type)
        if fused:
            # z0 is detached: the library's own estimate from the global (S, C).
            z0 = kto_torch.reference_point(global_kl) if global_kl is not None else 0.0
            with context():
                hidden, labels, weight, bias = _hidden(policy, *target)
                out = kto_torch.fused_linear_kto_loss(
                    hidden, weight, labels, None, ref_logp, desirable, bias=bias,
                    reference_point="fixed" if self.calculate_KL else "zero", fixed_z0=z0,
                    chunk_bytes=chunk, **options)
        else:
            logits, labels = _shifted(model, *target)
            out = kto_torch.kto_loss(
                logits, labels, None, ref_logp, desirable,
                reference_point="kl_batch" if self.calculate_KL else "zero",
                global_kl=global_kl, **options)
        self._log_kto_metrics(mode, out, desirable, batch)
        return out.loss

    def _non_finite_message(self, model, error) -> str:
        args = self.args
        unwrapped = self.accelerator.unwrap_model(model)
        params = list(unwrapped.parameters())
        bad = sum(1 for p in params if not bool(torch.isfinite(p.detach()).all()))
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

    def _log_kto_metrics(self, mode, out, desirable, batch):
        m = self._metrics[mode]
        m["kl"].append(out.metrics["kl"].item())
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
