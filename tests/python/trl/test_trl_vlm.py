"""Every model input TRL passes reaches the model (issue 11): vision-language models through
kto_torch.trl.KTOTrainer, against TRL 1.16's own KTOTrainer.

Tiny Qwen2-VL and Llava models are built from transformers configs (random init, no
download) and trained on an in-memory image dataset through TRL's own vision path
(DataCollatorForVisionUnpairedPreference: prompts with images, the rotated KL batch, flush
left). Checked, in the logits and the fused-linear mode:
(a) the vision parameters get non-zero gradients and change after a training step (they never
    did when the drop-in called the model with input_ids and attention_mask only);
(b) loss, metrics and every parameter gradient equal stock TRL's on the same model and batch,
    under test_trl.py's tolerance rule, kto_reference's (fp32 throughout: the loss and each
    metric of either trainer within 1e-5 of the float64 reference times its condition scale,
    every gradient entry within twice 1e-5 times its scale A_i). Its former bound, 1e-6
    relative, failed on an AVX2 CPU (issue 23: rewards/margins off by 1.9e-6 of 1.52).

The processors are stand-ins. transformers' image processors cannot be built in this
environment: neither Pillow nor torchvision is installed (requirements.txt pins neither), so
transformers.ImageProcessingMixin is a dummy object, `ProcessorMixin` rejects any image
processor ("Received a ... for argument image_processor, but a ImageProcessingMixin was
expected"), Qwen2VLImageProcessor fails to import torchvision and Qwen2VLImageProcessorPil
fails to import PILImageResampling. The stand-ins below do what Qwen2VLProcessor and
LlavaProcessor do for TRL's collator, with numpy: pixel values of the model's layout
(Qwen2-VL: [patches, C·t·p·p] plus image_grid_thw and mm_token_type_ids; Llava:
[images, C, H, W]) and each image token expanded to the number of features the vision tower
yields. The models and the trainer paths are the real ones.
"""

import copy

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
kto_trl = pytest.importorskip("kto_torch.trl")
np = pytest.importorskip("numpy")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    BatchFeature,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.processing_utils import ProcessorMixin  # noqa: E402

import kto_reference as kr  # noqa: E402
from test_trl import assert_matches_trl  # noqa: E402

WORDS = 24
SPECIAL = ["<pad>", "<unk>", "<eos>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>", "<image>"]
VOCAB = SPECIAL + [f"w{i}" for i in range(WORDS)]
ID = {w: i for i, w in enumerate(VOCAB)}


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(dict(ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[3:]})
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


class StandInProcessor(ProcessorMixin):
    """What TRL's vision collator needs of a processor: `.tokenizer` and
    `__call__(images=, text=, padding=, padding_side=, return_tensors=, add_special_tokens=)`.
    (ProcessorMixin.__init__ is skipped: it type-checks the image processor, see above.)"""

    image_token = None

    def __init__(self, tokenizer):  # noqa: D107  (no ProcessorMixin.__init__, see the class doc)
        self.tokenizer = tokenizer
        self.chat_template = None

    def image_features(self, image):
        raise NotImplementedError

    def __call__(self, images=None, text=None, padding=True, padding_side="right",
                 return_tensors="pt", add_special_tokens=False, **kwargs):
        text = list(text)
        features = {}
        if images is not None:
            per_image = [self.image_features(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
                         for imgs in images for img in imgs]
            for key in per_image[0][0]:
                features[key] = torch.cat([torch.as_tensor(f[key]) for f, _ in per_image])
            counts = iter(n for _, n in per_image)
            for i, t in enumerate(text):
                parts = t.split(self.image_token)
                text[i] = parts[0] + "".join(
                    " " + " ".join([self.image_token] * next(counts)) + " " + p
                    for p in parts[1:])
        enc = self.tokenizer(text, padding=padding, padding_side=padding_side,
                             return_tensors=return_tensors, add_special_tokens=add_special_tokens)
        out = dict(enc)
        out.update(self.extra_ids(enc["input_ids"]))
        out.update(features)
        return BatchFeature(out)

    def extra_ids(self, input_ids):
        return {}


class Qwen2VLStandIn(StandInProcessor):
    """Qwen2VLProcessor's outputs: 56×56 images in 14×14 patches (a 4×4 grid, t = 2 frames),
    rows of C·t·p·p = 1176 values, image_grid_thw [1, 4, 4], and <|image_pad|> expanded to
    grid / merge² = 4 tokens; mm_token_type_ids marks them (1) for M-RoPE."""

    image_token = "<|image_pad|>"
    patch, temporal, merge = 14, 2, 2

    def image_features(self, image):
        h, w, c = image.shape
        gh, gw = h // self.patch, w // self.patch
        x = np.repeat(image.transpose(2, 0, 1)[None], self.temporal, axis=0)  # t, C, H, W
        x = x.reshape(self.temporal, c, gh, self.patch, gw, self.patch).transpose(2, 4, 1, 0, 3, 5)
        rows = torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, -1))
        return ({"pixel_values": rows, "image_grid_thw": torch.tensor([[1, gh, gw]])},
                gh * gw // self.merge**2)

    def extra_ids(self, input_ids):
        return {"mm_token_type_ids": (input_ids == ID[self.image_token]).long()}


class LlavaStandIn(StandInProcessor):
    """LlavaProcessor's outputs: pixel_values [1, 3, 28, 28] a 28×28 image, and <image>
    expanded to (28 / 14)² = 4 tokens (CLIP's CLS feature dropped: the "default" strategy)."""

    image_token = "<image>"
    patch = 14

    def image_features(self, image):
        h, w, _ = image.shape
        pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        return {"pixel_values": pixels}, (h // self.patch) * (w // self.patch)


def text_config(cls, **extra):
    return cls(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               pad_token_id=ID["<pad>"], eos_token_id=ID["<eos>"], bos_token_id=None, **extra)


def make_qwen2_vl(seed=0):
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=ID["<pad>"],
                         eos_token_id=ID["<eos>"], bos_token_id=None,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                          "rope_theta": 10000.0}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ID["<|image_pad|>"], video_token_id=ID["<|video_pad|>"],
        vision_start_token_id=ID["<|vision_start|>"], vision_end_token_id=ID["<|vision_end|>"])
    return Qwen2VLForConditionalGeneration(config)


def make_llava(seed=0):
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=28, patch_size=14),
        text_config=text_config(LlamaConfig), image_token_index=ID["<image>"], image_seq_length=4,
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config)


VLMS = {
    # name: (model factory, processor, prompt prefix, image side, vision parameter name parts)
    "qwen2_vl": (make_qwen2_vl, Qwen2VLStandIn,
                 "<|vision_start|> <|image_pad|> <|vision_end|>", 56, ("visual",)),
    "llava": (make_llava, LlavaStandIn, "<image>", 28, ("vision_tower", "multi_modal_projector")),
}


def make_dataset(prefix, side, n=16, seed=0):
    """One image per prompt, prompts of 1-3 words, completions of 2-4 (TRL's collator pads
    and flushes them), every third example desirable."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = lambda k: " ".join(f"w{rng.integers(WORDS)}" for _ in range(k))  # noqa: E731
        rows.append({"images": [rng.integers(0, 256, (side, side, 3), dtype=np.uint8)],
                     "prompt": f"{prefix} {words(1 + i % 3)}",
                     "completion": words(2 + i % 3) + " <eos>", "label": i % 3 == 0})
    return Dataset.from_list(rows)


def make_trainers(tmp_path, vlm, fused):
    factory, processor, prefix, side, _ = VLMS[vlm]
    policy = factory()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        # As in test_trl.py: a peaky reference and a perturbed policy, so ρ ≠ 0 and z0 > 0.
        reference.lm_head.weight.add_(torch.randn_like(reference.lm_head.weight))
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                         report_to="none", beta=0.3, use_cpu=True, save_strategy="no",
                         bf16=False, disable_tqdm=True, max_length=None)
    data = make_dataset(prefix, side)
    theirs = trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                            args=args, train_dataset=data,
                            processing_class=processor(make_tokenizer()))
    ours = kto_trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                              args=args, train_dataset=data,
                              processing_class=processor(make_tokenizer()),
                              fused_linear=fused, fused_chunk_bytes=4096)
    return theirs, ours


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
             if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss.detach(), grads, metrics


def is_vision(name, vlm):
    return any(part in name for part in VLMS[vlm][4])


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
@pytest.mark.parametrize("vlm", list(VLMS))
def test_vision_inputs_reach_the_model_and_match_trl(tmp_path, vlm, fused):
    theirs, ours = make_trainers(tmp_path, vlm, fused)
    assert theirs._is_vision_dataset and ours._is_vision_dataset
    assert ours.fused_linear == fused
    batch = next(iter(theirs.get_train_dataloader()))
    image_keys = {"qwen2_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids",
                               "KL_mm_token_type_ids"},
                  "llava": {"pixel_values"}}[vlm]
    assert image_keys <= set(batch)
    inputs = kto_trl.model_inputs(batch)
    assert {k for k in image_keys if not k.startswith("KL_")} <= set(inputs)
    assert "KL_input_ids" not in inputs and "label" not in inputs

    loss_t, grads_t, metrics_t = loss_and_grads(theirs, batch)
    loss_o, grads_o, metrics_o = loss_and_grads(ours, batch)
    vision = [n for n in grads_t if is_vision(n, vlm)]
    assert vision, "the model has vision parameters with gradients under stock TRL"
    # (a) gradients reach the vision tower through the drop-in
    for name in vision:
        assert name in grads_o and float(grads_o[name].abs().max()) > 0.0, name
    # (b) parity with stock TRL (test_trl.py's rule)
    assert metrics_t["kl"] > 0.0
    assert set(grads_o) == set(grads_t)
    assert_matches_trl(kr.trl_reference(theirs, batch), (loss_t, grads_t, metrics_t),
                       (loss_o, grads_o, metrics_o))

    # (a) and a training step updates the vision parameters (those with a gradient: Llava
    # reads CLIP's last layer before post_layernorm, which stays unused)
    before = {n: p.detach().clone() for n, p in ours.model.named_parameters() if n in vision}
    assert ours.train().global_step == 1
    changed = [n for n, p in ours.model.named_parameters()
               if n in before and not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before), sorted(set(before) - set(changed))[:5]


def test_model_inputs_passes_every_collator_key():
    """A text model's batch with extra collator outputs: each reaches the model call; the KL
    batch takes its KL_* entries in place of the target's."""
    t = lambda *v: torch.tensor([list(v)])  # noqa: E731
    batch = {"input_ids": t(5, 6, 7), "attention_mask": t(1, 1, 1), "completion_mask": t(0, 1, 1),
             "token_type_ids": t(0, 0, 1), "my_extra_input": t(9, 9, 9),
             "KL_input_ids": t(5, 8), "KL_attention_mask": t(1, 1), "KL_completion_mask": t(0, 1),
             "KL_token_type_ids": t(0, 1), "label": torch.tensor([True]),
             "ref_logps": torch.tensor([-1.0]), "ref_KL_logps": torch.tensor([-2.0])}
    target = kto_trl.model_inputs(batch)
    assert set(target) == {"input_ids", "attention_mask", "token_type_ids", "my_extra_input",
                           "use_cache"}
    assert target["use_cache"] is False and target["input_ids"] is batch["input_ids"]
    kl = kto_trl.model_inputs(batch, kl=True)
    assert set(kl) == set(target)
    assert kl["input_ids"] is batch["KL_input_ids"]
    assert kl["attention_mask"] is batch["KL_attention_mask"]
    assert kl["token_type_ids"] is batch["KL_token_type_ids"]
    assert kl["my_extra_input"] is batch["my_extra_input"]


def test_text_model_receives_an_extra_collator_key(tmp_path):
    """A text model whose forward takes an extra input: a custom collator adds it, and the
    drop-in calls the model (logits mode) and the backbone (fused mode) with it, as TRL does."""
    import train_trl_kto as example
    from transformers import LlamaForCausalLM, LlamaModel

    seen = []

    class Recorder(LlamaModel):
        def forward(self, *args, extra_scale=None, **kwargs):
            seen.append(extra_scale)
            out = super().forward(*args, **kwargs)
            if extra_scale is not None:
                out.last_hidden_state = out.last_hidden_state * extra_scale[:, None, None]
            return out

    class ExtraLM(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.model = Recorder(config)

        def forward(self, *args, extra_scale=None, **kwargs):
            seen.append(extra_scale)
            return super().forward(*args, **kwargs)

    base = example.make_model(seed=0)
    policy = ExtraLM(base.config)
    policy.load_state_dict(base.state_dict())
    collate = trl.trainer.kto_trainer.DataCollatorForUnpairedPreference(pad_token_id=0)

    def collator(examples):
        out = collate(examples)
        out["extra_scale"] = torch.full((len(examples),), 0.5)
        return out

    for fused in (False, True):
        seen.clear()
        args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                             report_to="none", use_cpu=True, save_strategy="no", bf16=False,
                             disable_tqdm=True)
        trainer = kto_trl.KTOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=args,
                                     train_dataset=example.make_dataset(n=16),
                                     processing_class=example.make_tokenizer(),
                                     data_collator=collator, fused_linear=fused)
        assert trainer.train().global_step == 1
        scales = [s for s in seen if s is not None]
        assert len(scales) >= 4, seen  # policy, KL batch, reference target and KL
        assert all(torch.equal(s, torch.full((8,), 0.5)) for s in scales)
