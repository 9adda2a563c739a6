"""A Mixture-of-Experts model (a tiny Mixtral) through the TRL drop-in: the load-balancing
auxiliary loss is added to the KTO loss as TRL 1.16 adds it (the architecture's
router_aux_loss_coef times Mixtral's load_balancing_loss_func over the policy's router logits
of the target batch) and logged as `aux_loss`, in the fused default and the logits path; loss,
every metric and every parameter gradient (the routers' included) match TRL's own trainer.

Tolerance: test_trl.py's, kto_reference's rule (fp32; each metric and the loss of either
trainer within 1e-5 of the float64 reference times its condition scale, aux_loss and
coef · aux_loss included; the gradients, the routers' too, within twice 1e-5 times theirs).
"""

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
kto_trl = pytest.importorskip("kto_torch.trl")
transformers = pytest.importorskip("transformers")

import train_trl_kto as example  # noqa: E402

from test_trl import step_against_trl  # noqa: E402


def make_mixtral(seed=0):
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=len(example.WORDS), hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, router_aux_loss_coef=0.5,
        tie_word_embeddings=False)
    return transformers.MixtralForCausalLM(config)


@pytest.mark.parametrize("fused_linear", [None, False], ids=["fused_default", "logits"])
def test_moe_aux_loss_matches_trl(tmp_path, fused_linear):
    metrics_t, ours, grads_o = step_against_trl(tmp_path, make_mixtral(), fused_linear)
    assert ours.aux_loss_enabled and metrics_t["aux_loss"] > 0.0
    routers = [n for n in grads_o if "gate" in n and "experts" not in n]
    assert routers and all(float(grads_o[n].abs().max()) > 0 for n in routers)
