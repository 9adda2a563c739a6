"""A soft-capped model (a Gemma-2-style config, final_logit_softcapping) through the TRL
drop-in: the fused head runs by default and applies the cap as the library's option (read
from the config as TRL 1.16 reads it), and loss, every metric and every parameter gradient
match TRL 1.16's own trainer on the same model and batch. The cap is set low (2.0) so that it
changes the logits of this tiny random model substantially.

Tolerance: test_trl.py's, kto_reference's rule (fp32 throughout; each metric and the loss of
either trainer within 1e-5 of the float64 reference — from the model's capped fp32 logits;
the cap is 1-Lipschitz, so the lm_head products' rounding reaches it undiminished at most —
times its condition scale, the gradients within twice 1e-5 times theirs).
"""

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
kto_trl = pytest.importorskip("kto_torch.trl")
transformers = pytest.importorskip("transformers")

import train_trl_kto as example  # noqa: E402

from test_trl import step_against_trl  # noqa: E402


def make_gemma2(seed=0, softcap=2.0):
    torch.manual_seed(seed)
    config = transformers.Gemma2Config(
        vocab_size=len(example.WORDS), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        final_logit_softcapping=softcap, attn_logit_softcapping=None,
        tie_word_embeddings=False)
    model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # logits well past the cap
    return model


@pytest.mark.parametrize("fused_linear", [None, False], ids=["fused_default", "logits"])
def test_soft_capped_model_matches_trl(tmp_path, fused_linear):
    policy = make_gemma2()
    assert kto_trl.logit_transform(policy) == dict(logit_scale=1.0, logit_softcap=2.0)
    metrics_t, _, _ = step_against_trl(tmp_path, policy, fused_linear)
    assert metrics_t["kl"] > 0.0  # the reference point is exercised


def test_the_cap_matters_here():
    """Without the cap the loss differs: the test above would catch a head that ignored it."""
    policy = make_gemma2()
    ids = torch.randint(4, len(example.WORDS), (2, 6))
    with torch.no_grad():
        capped = policy(input_ids=ids).logits
        raw = policy.lm_head(policy.model(input_ids=ids).last_hidden_state)
    assert float((capped - raw).abs().max()) > 1.0
    assert float(capped.abs().max()) <= 2.0
