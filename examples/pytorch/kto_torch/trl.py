"""A drop-in for TRL's KTOTrainer whose log-prob and loss path runs on kto ops.

    -from trl import KTOTrainer
    +from kto_torch.trl import KTOTrainer

Everything else — data collation, the KL dataset (completions rotated by one),
reference log-prob precomputation, the optimiser loop and logging — stays
TRL's. Per step, the subclass computes the policy logits of the target batch,
forwards the KL batch and (unless precomputed) the reference model through
``kto_torch.sequence_logprobs``, and takes the loss, its metrics and the
gradient to the logits from ``kto_torch.kto_loss``. Across data-parallel ranks
the KL estimate is the global (S, C) of one all-reduce, which equals TRL's mean
of per-rank means when ranks hold equal batches. Not covered (they fall back
to TRL's own path): PEFT models without a separate reference model and MoE
auxiliary losses. TRL's `entropy` and `logits/*` metrics are not logged: they
would cost an extra pass over the logits.

``KTOTrainer(..., fused_linear=True)`` goes one step further: the policy, the
KL batch and the reference model run their decoders only, and log-probs, loss
and gradients come from the last hidden states and the lm_head through
``kto_torch.fused_linear_kto_loss`` / ``fused_linear_logprobs`` — the logits of
the batch never exist (``fused_chunk_bytes`` bounds the chunk). Models whose
logits are not ``lm_head(hidden)`` (soft-capping, logit scales) and multi-process
runs (the decoder would be called past the DDP wrapper) keep the logits path.
"""

from __future__ import annotations

import torch
from trl import KTOTrainer as _TRLKTOTrainer

import kto_torch


def _shifted(model, input_ids, attention_mask, completion_mask):
    """logits[:, :-1] and labels[:, 1:] as views: no copy of the logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    return logits[:, :-1], labels[:, 1:]


# Config fields of models whose logits are more than lm_head(hidden).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _fusable(model) -> bool:
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return False
    return hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def _hidden(model, input_ids, attention_mask, completion_mask):
    """Last hidden states [:, :-1], labels [:, 1:], and the lm_head's weight and bias in the
    hidden states' dtype (under autocast the decoder returns bf16/fp16 while the weight stays
    fp32: cast as autocast would for the lm_head's matmul; gradients flow back through it)."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    return hidden[:, :-1], labels[:, 1:], weight, bias


def _fused_logprobs(model, input_ids, attention_mask, completion_mask, chunk_bytes):
    hidden, labels, weight, bias = _hidden(model, input_ids, attention_mask, completion_mask)
    return kto_torch.fused_linear_logprobs(hidden, weight, labels, bias=bias,
                                           chunk_bytes=chunk_bytes)


class KTOTrainer(_TRLKTOTrainer):
    def __init__(self, *args, fused_linear: bool = False, fused_chunk_bytes: int = 1 << 30,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_linear = fused_linear
        self.fused_chunk_bytes = fused_chunk_bytes

    def _kto_supported(self) -> bool:
        return self.ref_model is not None or self.precompute_ref_logps

    def _fused(self, model) -> bool:
        # One process only: the decoder is called past the DDP/FSDP wrapper, whose
        # forward prepares the gradient reduction.
        return (self.fused_linear and self.accelerator.num_processes == 1
                and _fusable(self.accelerator.unwrap_model(model))
                and (self.precompute_ref_logps or _fusable(self.ref_model)))

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._kto_supported() or self.aux_loss_enabled or return_outputs:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool)
        target = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        kl_batch = (batch.get("KL_input_ids"), batch.get("KL_attention_mask"),
                    batch.get("KL_completion_mask"))

        fused = self._fused(model)
        chunk = self.fused_chunk_bytes

        def logprobs(m, ids, mask, completion):
            if not fused:
                return kto_torch.sequence_logprobs(*_shifted(m, ids, mask, completion))
            if m is model:
                return _fused_logprobs(self.accelerator.unwrap_model(m), ids, mask, completion,
                                       chunk)
            # The reference model's forward was wrapped by accelerate (autocast under mixed
            # precision); its decoder, called directly, runs in the same context this way.
            with self.accelerator.autocast():
                return _fused_logprobs(m, ids, mask, completion, chunk)

        global_kl = None
        if self.calculate_KL:
            with torch.no_grad():
                kl_logp, kl_tokens = logprobs(model, *kl_batch)
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

        options = dict(beta=self.beta, desirable_weight=self.desirable_weight,
                       undesirable_weight=self.undesirable_weight, loss_type=self.loss_type)
        if fused:
            # z0 is detached: the library's own estimate from the global (S, C).
            z0 = kto_torch.reference_point(global_kl) if global_kl is not None else 0.0
            hidden, labels, weight, bias = _hidden(self.accelerator.unwrap_model(model), *target)
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
