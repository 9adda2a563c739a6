"""Padding-free batches in the TRL drop-in (issue 25, item 2): with ``padding_free`` each
batch's sequences, and the KL batch's, run as one packed row (input_ids and position_ids
[1, N], no attention mask; transformers builds the block-diagonal causal mask from the
position_ids), and the library's ops take the CSR offsets of the sequences.

Parity rule. The packed step must give the loss, every metric TRL logs and every parameter
gradient of the padded step under kto_reference's rule (tests/python/kto_reference.py): the
loss and each metric of TRL 1.16's trainer, of the drop-in padded and of the drop-in packed
within rtol = 1e-5 times the quantity's condition scale of the float64 reference of the
*padded* batch (kto_reference.trl_reference: the models' fp32 logits and lm_head inputs);
num_tokens equal; every gradient entry of the packed step within twice rtol · A_i (plus the
normwise u · max A) of the padded drop-in's and of TRL's. The rule applies because a packed
sequence is the same function as the padded one: it attends to the same keys at the same
positions, so the two layouts differ only in the order of their sums (attention over N or T
keys, whose masked ones add exact zeros; GEMMs over other row blocks), which the rule's
rtol covers. At the logits that order shows up as a different rounding of the lm_head's
inputs: each test first checks that the packed forward's hidden states h' differ from the
padded forward's h by no more than the rule already grants one side's lm_head product,
Σ_d |h'_d − h_d| |W_vd| ≤ γ_D Σ_d |h_d W_vd| for every real row and every v (seen at 16 % of
it; the metrics then at 0.3 % of their bounds, the gradients at 0.2 %), so the float64
reference of the padded batch holds the packed step too. The rule is stated in fp32
(bf16=False): under bf16 autocast the two layouts' backbones round in bf16 in different
orders, so packed and padded then agree to bf16's rounding of the hidden states (as any
two batch compositions do), not to the fp32 rule; step 1 stays exact.

Also: the packing itself (targets never cross into the next sequence; prompt and padding
rows unscored), step-1 exactness in packed mode (loss 0.5, kl 0, rewards 0, equality, fp32
and bf16 autocast, fused and logits), the default, and refusals: models whose attention
cannot keep packed sequences apart, VLMs, and batches that cannot be packed, refused by name
with padding_free=True and padded with the reason logged with padding_free=None.
"""

import copy
import logging
import random

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
kto_trl = pytest.importorskip("kto_torch.trl")

import train_trl_kto as example  # noqa: E402  (examples/trl: tiny model, tokenizer, data)

import kto_reference as kr  # noqa: E402
from test_trl import assert_matches_trl, loss_and_grads, perturbed_pair  # noqa: E402

LOGGER = "kto_torch.trl"
WORDS = len(example.WORDS) - 4


def make_ragged_dataset(n=16, seed=0, label=lambda i: i % 3 == 0, long_every=0):
    """Prompts of 1-9 words and completions of 1-14 (plus EOS): lengths 3-24, each batch of 8
    padded to its longest. With ``long_every`` = k, every k-th example has 9 + 14 words and
    the others 1-2 + 1-3: a few long sequences among many short ones. The completion starts
    with a space, so that TRL's tokenisation of prompt + completion keeps the prompt's last
    word."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(k))

    def lengths(i):
        if not long_every:
            return rng.randint(1, 9), rng.randint(1, 14)
        return (9, 14) if i % long_every == 0 else (rng.randint(1, 2), rng.randint(1, 3))

    rows = [{"prompt": words(p), "completion": " " + words(c), "label": label(i)}
            for i, (p, c) in enumerate(map(lengths, range(n)))]
    from datasets import Dataset

    return Dataset.from_list(rows)


def config(tmp_path, **kwargs):
    return trl.KTOConfig(**{"output_dir": str(tmp_path), "per_device_train_batch_size": 8,
                            "max_steps": 1, "report_to": "none", "use_cpu": True,
                            "save_strategy": "no", "disable_tqdm": True, "beta": 0.3,
                            "bf16": False, **kwargs})


def make_trainers(tmp_path, fused, model=None, data=None, **options):
    """TRL 1.16's trainer, the drop-in padded and the drop-in packed, on one model pair,
    batch and options."""
    torch.manual_seed(0)
    policy, reference = perturbed_pair(model if model is not None else example.make_model(0))
    common = dict(args=config(tmp_path, **options), train_dataset=data or make_ragged_dataset(),
                  processing_class=example.make_tokenizer())
    theirs = trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                            **common)
    ours = {layout: kto_trl.KTOTrainer(model=copy.deepcopy(policy),
                                       ref_model=copy.deepcopy(reference), fused_linear=fused,
                                       fused_chunk_bytes=4096, padding_free=layout == "packed",
                                       **common)
            for layout in ("padded", "packed")}
    assert ours["packed"].padding_free and not ours["padded"].padding_free
    assert ours["packed"].fused_linear == fused
    return theirs, ours["padded"], ours["packed"]


class BackboneSpy:
    """Records how a trainer's models run their backbones (model.base_model): the shape of
    input_ids and whether position_ids and an attention mask were passed."""

    def __init__(self, *models):
        self.calls = []
        self.handles = [m.base_model.register_forward_pre_hook(self._seen, with_kwargs=True)
                        for m in models]

    def _seen(self, module, args, kwargs):
        self.calls.append(dict(shape=tuple(kwargs["input_ids"].shape),
                               position_ids=kwargs.get("position_ids") is not None,
                               attention_mask=kwargs.get("attention_mask") is not None))

    def remove(self):
        for h in self.handles:
            h.remove()


PROBE = (1, 4)  # the first packed step's probe of each model: two sequences of 2 tokens


def assert_packed_calls(calls, batch, kl=True):
    """Every backbone call ran one packed row (the target batch's or the KL batch's real
    tokens, or the first step's probe), with position_ids and no attention mask. Returns
    the number of calls that were not the probe's."""
    sizes = {int(batch["attention_mask"].sum())}
    if kl:
        sizes.add(int(batch["KL_attention_mask"].sum()))
    assert calls
    for call in calls:
        assert call["position_ids"] and not call["attention_mask"], call
        assert call["shape"] == PROBE or (call["shape"][0] == 1 and call["shape"][1] in sizes), \
            (call, sizes)
    return sum(call["shape"] != PROBE for call in calls)


def lm_head_inputs(model, inputs):
    seen = []
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            model(**inputs)
    finally:
        hook.remove()
    return seen[-1]


def assert_layout_within_product_rounding(model, batch):
    """The packed forward's lm_head inputs h' against the padded forward's h, on the target
    and the KL batch: Σ_d |h'_d − h_d| |W_vd| ≤ γ_D Σ_d |h_d W_vd| for every real row and v,
    the rounding the rule already allows one side's lm_head product (module docstring).
    Returns the largest ratio seen."""
    weight = model.get_output_embeddings().weight.detach().double().abs()
    gamma = kr.gamma(weight.shape[1])
    worst = 0.0
    for kl, mask_key in ((False, "completion_mask"), (True, "KL_completion_mask")):
        if mask_key not in batch:  # no KL batch (apo_zero_unpaired)
            continue
        inputs = kto_trl.model_inputs(batch, kl=kl)
        real = inputs["attention_mask"].bool()
        padded = lm_head_inputs(model, inputs)[real].double()
        packed = kto_trl.pack_sequences(inputs, batch[mask_key])
        row = lm_head_inputs(model, packed.inputs)[0].double()
        assert row.shape == padded.shape
        moved = (row - padded).abs() @ weight.T
        allowed = gamma * (padded.abs() @ weight.T)
        worst = max(worst, float((moved / allowed).max()))
    assert worst <= 1.0, worst
    return worst


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
@pytest.mark.parametrize("loss_type,desirable_weight,undesirable_weight", [
    ("kto", 1.0, 1.0),
    ("kto", 2.0, 0.7),
    ("apo_zero_unpaired", 1.0, 1.0),
])
def test_packed_step_equals_the_padded_step(tmp_path, fused, loss_type, desirable_weight,
                                            undesirable_weight):
    theirs, padded, packed = make_trainers(tmp_path, fused, loss_type=loss_type,
                                           desirable_weight=desirable_weight,
                                           undesirable_weight=undesirable_weight)
    batch = next(iter(theirs.get_train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert int(lengths.max() - lengths.min()) >= 8  # ragged: real padding in the batch
    assert batch["completion_mask"].sum() < batch["attention_mask"].sum()  # prompts unscored
    assert_layout_within_product_rounding(theirs.model, batch)
    reference = kr.trl_reference(theirs, batch)
    want = loss_and_grads(theirs, batch)
    if loss_type == "kto":
        assert want[2]["kl"] > 0.0  # the reference point is exercised
    got_padded = loss_and_grads(padded, batch)
    spy = BackboneSpy(packed.model, packed.ref_model)
    try:
        got_packed = loss_and_grads(packed, batch)
    finally:
        spy.remove()
    # The policy's and the reference model's forwards on the target (and KL) batch.
    assert assert_packed_calls(spy.calls, batch, kl=loss_type == "kto") == \
        (4 if loss_type == "kto" else 2)
    assert sum(call["shape"] == PROBE for call in spy.calls) == 2  # each model probed once
    assert_matches_trl(reference, want, got_padded)
    assert_matches_trl(reference, want, got_packed)
    assert set(got_packed[2]) == set(got_padded[2]) == set(want[2])
    kr.assert_gradients_by_rule(got_packed[1], got_padded[1], reference.grad_scale,
                                who="packed vs padded")


def test_packed_moe_step_equals_trl(tmp_path):
    """A tiny Mixtral: TRL's load-balancing loss weights the padded batch's router logits by
    its attention mask; the packed row holds only real tokens, so its unweighted mean is the
    same quantity (aux_loss and the routers' gradients under the same rule)."""
    from test_trl_moe import make_mixtral

    for fused in (False, True):
        theirs, padded, packed = make_trainers(tmp_path, fused, model=make_mixtral())
        batch = next(iter(theirs.get_train_dataloader()))
        reference = kr.trl_reference(theirs, batch)
        want = loss_and_grads(theirs, batch)
        assert want[2]["aux_loss"] > 0.0
        got = loss_and_grads(packed, batch)
        assert_matches_trl(reference, want, got)
        kr.assert_gradients_by_rule(got[1], loss_and_grads(padded, batch)[1],
                                    reference.grad_scale, who="packed vs padded")


def test_pack_sequences_scores_exactly_the_padded_pairs():
    """Ragged right-padded rows, one with an empty prompt (its first token is a completion
    token, which the previous sequence's last row must not predict) and one of one token."""
    ids = torch.tensor([[5, 6, 7, 8, 0, 0],
                        [9, 10, 11, 12, 13, 14],
                        [15, 0, 0, 0, 0, 0],
                        [16, 17, 18, 0, 0, 0]])
    mask = (ids != 0).long()
    completion = torch.tensor([[0, 0, 1, 1, 0, 0],
                               [1, 1, 1, 1, 1, 1],
                               [1, 0, 0, 0, 0, 0],
                               [0, 1, 1, 0, 0, 0]])
    packed = kto_trl.pack_sequences(dict(input_ids=ids, attention_mask=mask, use_cache=False),
                                    completion)
    assert packed.offsets.tolist() == [0, 4, 10, 11, 14]
    assert packed.inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                                    17, 18]]
    assert packed.inputs["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 0, 1,
                                                       2]]
    assert "attention_mask" not in packed.inputs and packed.inputs["use_cache"] is False
    assert packed.targets.tolist() == [-100, 7, 8, -100,      # 9 (next sequence) not predicted
                                       10, 11, 12, 13, 14, -100,
                                       -100,                   # one token: nothing to predict
                                       17, 18, -100]
    # The (context, target) pairs the padded batch scores: logits[:, :-1] against labels[:, 1:].
    labels = ids.masked_fill(completion == 0, -100)[:, 1:]
    pairs = {(s, r, int(labels[s, r])) for s in range(4) for r in range(5) if labels[s, r] >= 0}
    packed_pairs = set()
    for s in range(4):
        start, end = packed.offsets[s], packed.offsets[s + 1]
        for r in range(int(end - start)):
            t = int(packed.targets[start + r])
            if t >= 0:
                packed_pairs.add((s, r, t))
    assert packed_pairs == pairs
    assert kto_trl.unpackable_batch_reason(dict(input_ids=ids, attention_mask=mask)) is None
    left = mask.flip(1)
    assert kto_trl.unpackable_batch_reason(dict(input_ids=ids, attention_mask=left)) == (
        "its attention mask is not right padding (each sequence's tokens first)")


STEP_ONE = [(loss_type, fused, bf16)
            for loss_type, precisions in (("kto", (False, True)), ("apo_zero_unpaired", (True,)))
            for fused in (False, True) for bf16 in precisions]


@pytest.mark.parametrize("loss_type,fused,bf16", STEP_ONE, ids=[
    f"{t}-{'fused_linear' if f else 'logits'}-{'bf16_autocast' if b else 'fp32'}"
    for t, f, b in STEP_ONE])
def test_step_one_is_exact_when_packed(tmp_path, fused, bf16, loss_type):
    """Policy = reference at step 1: both run the same packed row through the same path, so
    TRL's values are exact (no tolerance); apo_zero_unpaired (no KL batch) under TRL's
    default bf16 autocast."""
    policy = example.make_model(seed=0)
    args = config(tmp_path, max_steps=1, logging_steps=1, bf16=bf16, loss_type=loss_type)
    trainer = kto_trl.KTOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=args,
                                 train_dataset=make_ragged_dataset(),
                                 processing_class=example.make_tokenizer(), fused_linear=fused,
                                 padding_free=True)
    spy = BackboneSpy(trainer.model, trainer.ref_model)
    try:
        trainer.train()
    finally:
        spy.remove()
    assert trainer.padding_free and trainer.accelerator.native_amp == bf16
    assert spy.calls and all(c["position_ids"] and c["shape"][0] == 1 for c in spy.calls)
    log = next(h for h in trainer.state.log_history if "rewards/chosen" in h)
    assert log["loss"] == 0.5
    assert log["rewards/chosen"] == 0.0
    assert log["rewards/rejected"] == 0.0
    if loss_type == "kto":
        assert log["kl"] == 0.0
        assert log["rewards/margins"] == 0.0


def trainer_for(tmp_path, model, padding_free, **kwargs):
    return kto_trl.KTOTrainer(model=model, ref_model=copy.deepcopy(model),
                              args=config(tmp_path, max_steps=1),
                              train_dataset=make_ragged_dataset(),
                              processing_class=example.make_tokenizer(),
                              padding_free=padding_free, **kwargs)


V = len(example.WORDS)
IDS = dict(vocab_size=V, pad_token_id=0, bos_token_id=2, eos_token_id=3)
UNPACKABLE = {
    # name: (model factory, the refusal's reason)
    "bloom_alibi": (
        lambda: transformers.BloomForCausalLM(transformers.BloomConfig(
            hidden_size=32, n_layer=2, n_head=4, **IDS)),
        "the policy (BloomForCausalLM): BloomForCausalLM.forward takes no position_ids (its "
        "positions come from the attention mask)"),
    "lfm2_short_conv": (
        lambda: transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, layer_types=["conv", "full_attention"], **IDS)),
        "the policy (Lfm2ForCausalLM) has ['conv'] layers, which carry state along the whole "
        "packed row from one sequence into the next"),
}


@pytest.mark.parametrize("name", list(UNPACKABLE))
def test_a_model_that_cannot_take_packed_input_is_refused_by_name(tmp_path, name, caplog):
    factory, reason = UNPACKABLE[name]
    with pytest.raises(ValueError) as raised:
        trainer_for(tmp_path, factory(), True)
    assert str(raised.value) == (
        f"kto_torch.trl.KTOTrainer: padding_free=True cannot be honoured: {reason}; pass "
        "padding_free=None to fall back to padded batches, or False")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer = trainer_for(tmp_path, factory(), None)
    assert not trainer.padding_free and trainer.padding_free_reason == reason
    assert (f"kto_torch.trl.KTOTrainer: padded batches, not padding-free, because {reason}"
            in caplog.messages)
    assert trainer.train().global_step == 1


def make_opt():
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, **IDS))


def test_a_model_that_builds_its_mask_without_position_ids_is_caught_at_the_first_step(
        tmp_path, caplog):
    """OPT takes position_ids but builds its causal mask without them (transformers 5.24):
    the static checks pass it, the first step's probe forward does not. With
    padding_free=True that step raises, naming it; with None the trainer pads from then on,
    logging why, and its step is the padded drop-in's bit for bit."""
    reason = ("the policy (OPTForCausalLM) does not build its attention mask from position_ids "
              "(a forward of two packed sequences did not reach transformers' packed-sequence "
              "detection), so packed sequences would attend to each other")
    insisting = trainer_for(tmp_path, make_opt(), True)
    assert insisting.padding_free  # the static checks cannot see it
    batch = next(iter(insisting.get_train_dataloader()))
    with pytest.raises(ValueError) as raised:
        insisting.compute_loss(insisting.model, batch)
    assert str(raised.value) == ("kto_torch.trl.KTOTrainer: padding_free=True cannot be "
                                 f"honoured: {reason}")
    assert "(in the padding-free check)" in raised.value.__notes__
    falling_back = trainer_for(tmp_path, make_opt(), None)
    padded = trainer_for(tmp_path, make_opt(), False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = falling_back.compute_loss(falling_back.model, batch)
    assert not falling_back.padding_free and falling_back.padding_free_reason == reason
    assert f"kto_torch.trl.KTOTrainer: padded batches, not padding-free, because {reason}" \
        in caplog.messages
    assert torch.equal(got, padded.compute_loss(padded.model, batch))


def test_a_vision_language_model_is_refused(tmp_path, caplog):
    from test_trl_vlm import VLMS, make_dataset, make_tokenizer

    factory, processor, prefix, side, _ = VLMS["qwen2_vl"]
    policy = factory()
    common = dict(args=config(tmp_path, per_device_train_batch_size=4, max_length=None),
                  train_dataset=make_dataset(prefix, side),
                  processing_class=processor(make_tokenizer()))
    reason = ("a vision-language model or dataset (TRL's vision collator left-pads the prompts, "
              "and images are per sequence)")
    with pytest.raises(ValueError, match=r"padding_free=True cannot be honoured: a "
                                         r"vision-language model or dataset"):
        kto_trl.KTOTrainer(model=policy, ref_model=copy.deepcopy(policy), padding_free=True,
                           **common)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer = kto_trl.KTOTrainer(model=policy, ref_model=copy.deepcopy(policy),
                                     padding_free=None, **common)
    assert not trainer.padding_free and trainer.padding_free_reason == reason
    assert any(reason in m for m in caplog.messages)


def test_a_batch_that_cannot_be_packed_is_refused_or_padded(tmp_path, caplog):
    """A custom collator's extra model input (per padded sequence): padding_free=True refuses
    the batch, naming the key; None pads it (logged once), the same step as padded."""
    collate = trl.trainer.kto_trainer.DataCollatorForUnpairedPreference(pad_token_id=0)

    def collator(examples):
        return dict(collate(examples), output_attentions=False)

    insisting = trainer_for(tmp_path, example.make_model(0), True, data_collator=collator)
    batch = next(iter(insisting.get_train_dataloader()))
    with pytest.raises(ValueError) as raised:
        insisting.compute_loss(insisting.model, batch)
    assert str(raised.value) == (
        "kto_torch.trl.KTOTrainer: padding_free=True cannot pack this batch: the batch holds "
        "model inputs other than input_ids and attention_mask (['output_attentions'])")
    auto = trainer_for(tmp_path, example.make_model(0), None, data_collator=collator)
    padded = trainer_for(tmp_path, example.make_model(0), False, data_collator=collator)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            got = auto.compute_loss(auto.model, batch)
    fallbacks = [m for m in caplog.messages if "a padded batch, not padding-free" in m]
    assert fallbacks == ["kto_torch.trl.KTOTrainer: a padded batch, not padding-free, because "
                         "the batch holds model inputs other than input_ids and attention_mask "
                         "(['output_attentions'])"]
    assert auto.padding_free  # later batches are packed where they can be
    assert torch.equal(got, padded.compute_loss(padded.model, batch))


def test_the_default_packs_where_the_packed_row_costs_less(tmp_path, caplog):
    """padding_free=None (the default) packs a batch where its packed row costs fewer
    estimated FLOPs than the padded batch (layout_costs, packing_pays: measured against the
    step's time in docs/performance.md) and keeps it padded elsewhere, a batch without
    padding among them; the policy and the reference model alike."""
    with caplog.at_level(logging.INFO, logger=LOGGER):
        policy = example.make_model(0)
        trainer = kto_trl.KTOTrainer(model=policy, ref_model=copy.deepcopy(policy),
                                     args=config(tmp_path),
                                     train_dataset=make_ragged_dataset(long_every=4),
                                     processing_class=example.make_tokenizer())
    assert trainer.padding_free and trainer.padding_free_reason is None
    assert ("kto_torch.trl.KTOTrainer: padding-free, each batch packed into one row where "
            "that costs fewer estimated FLOPs than padding it" in caplog.messages)
    costs = kto_trl.layout_costs(trainer.model, logits=False)
    backbone = trainer.model.base_model
    embedded = sum(p.numel() for p in backbone.embed_tokens.parameters())
    assert costs.per_position == 2 * (sum(p.numel() for p in backbone.parameters()) - embedded)
    config_ = trainer.model.config
    assert costs.per_pair == 4 * config_.hidden_size * config_.num_hidden_layers and costs.dense
    ragged = next(iter(trainer.get_train_dataloader()))
    # The same batch with every sequence cut to the shortest's length: nothing to unpad.
    shortest = int(ragged["attention_mask"].sum(1).min())
    even = {k: (v[:, :shortest] if k != "label" else v) for k, v in ragged.items()}
    for batch, packed in ((ragged, True), (even, False)):
        for key in ("", "KL_"):
            lengths = batch[f"{key}attention_mask"].sum(1).tolist()
            width = batch[f"{key}attention_mask"].size(1)
            assert kto_trl.packing_pays(costs, lengths, width) == packed
        spy = BackboneSpy(trainer.model, trainer.ref_model)
        try:
            trainer.compute_loss(trainer.model, batch)
        finally:
            spy.remove()
        calls = [c for c in spy.calls if c["shape"] != PROBE]
        assert len(calls) == 4
        for call in calls:
            assert call["position_ids"] == packed and call["attention_mask"] == (not packed)
            assert (call["shape"][0] == 1) == packed


def test_packing_pays_counts_positions_and_attended_pairs():
    dense = kto_trl.LayoutCosts(per_position=100.0, per_pair=1.0, dense=True)
    sparse = dense._replace(dense=False)
    assert not kto_trl.packing_pays(dense, [8, 8, 8], 8)  # no padding: never
    assert not kto_trl.packing_pays(sparse, [8, 8, 8], 8)
    # Padded: 3·20 positions, 3·20² pairs = 7200; packed: 30 positions, 30² pairs = 3900.
    assert kto_trl.packing_pays(dense, [20, 5, 5], 20)
    # Many short sequences under a dense mask: 16·4 = 64 positions, 64² pairs = 10496 packed
    # against 16·5 = 80 positions, 16·5² pairs = 8400 padded.
    assert not kto_trl.packing_pays(dense, [4] * 15 + [5], 5)
    assert kto_trl.packing_pays(sparse, [4] * 15 + [5], 5)  # varlen: 6400 + 265 < 8000 + 265
