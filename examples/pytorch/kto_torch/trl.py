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


class KTOTrainer(_TRLKTOTrainer):
    def _kto_supported(self) -> bool:
        return self.ref_model is not None or self.precompute_ref_logps

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

        global_kl = None
        if self.calculate_KL:
            with torch.no_grad():
                kl_logp, kl_tokens = kto_torch.sequence_logprobs(*_shifted(model, *kl_batch))
        if self.precompute_ref_logps:
            ref_logp = batch["ref_logps"]
            ref_kl_logp = batch.get("ref_KL_logps")
        else:
            with torch.no_grad():
                ref_logp, _ = kto_torch.sequence_logprobs(*_shifted(self.ref_model, *target))
                ref_kl_logp = None
                if self.calculate_KL:
                    ref_kl_logp, _ = kto_torch.sequence_logprobs(
                        *_shifted(self.ref_model, *kl_batch))
        if self.calculate_KL:
            partial = kto_torch.kl_partial(kl_logp, ref_kl_logp, kl_tokens)
            if self.accelerator.num_processes > 1:  # one all-reduce of (S, C)
                partial = self.accelerator.reduce(partial.to(device), reduction="sum").cpu()
            global_kl = partial

        logits, labels = _shifted(model, *target)
        out = kto_torch.kto_loss(
            logits, labels, None, ref_logp, desirable,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            loss_type=self.loss_type,
            reference_point="kl_batch" if self.calculate_KL else "zero",
            global_kl=global_kl,
        )
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
