"""kto_torch speaks Python (issue 24, item 5): its errors name the public function and the
argument the caller passed (never the library's kto::cpu::step_forward, 'kl.count' or
'hidden.cols'), with indices in the argument's own shape (targets[1, 2] for [B, T] targets,
not a flat row); a transposed lm_head is named as such; a module where a tensor belongs is
refused by name; the loss comes back in the accumulation type of the logits (float32, or
float64 for float64 logits: the float64 reference's rule holds); both loss functions take the
KL batch in one shape (its log-probs); every public argument is documented.

Each check asserts the exception's ``function`` and ``argument`` and the message's head.
"""

import inspect
import re

import pytest

torch = pytest.importorskip("torch")
kto_torch = pytest.importorskip("kto_torch")

import kto_reference as kr  # noqa: E402
from test_torch import make_batch  # noqa: E402
from test_torch_fused import kl_logprobs, logits_of, make_problem  # noqa: E402

KTO_LOSS = "kto_torch.kto_loss"
FUSED = "kto_torch.fused_linear_kto_loss"


def raised(cls, fn, call):
    """The error `call` raises: of `cls`, naming `fn` first in its message."""
    with pytest.raises(cls) as caught:
        call()
    error = caught.value
    assert error.function == fn, str(error)
    assert str(error).startswith(f"{fn}: "), str(error)
    assert "kto::" not in str(error), str(error)
    return error


def names(error, argument, message=None):
    """`error` names `argument` (exactly, as its .argument and in its message's head) and
    matches `message` (a regex) after it."""
    assert error.argument == argument, str(error)
    head = f"{error.function}: argument '{argument}' "
    assert str(error).startswith(head), str(error)
    if message is not None:
        assert re.match(message, str(error)[len(head):]), str(error)


def kl_args(batch):
    return batch["kl_policy"], batch["kl_reference"], batch["kl_num_tokens"]


def loss(batch, **kw):
    return kto_torch.kto_loss(batch["logits"], batch["targets"], None, torch.zeros(4),
                              batch["desirable"], *kl_args(batch), **kw)


def fused_loss(p, **kw):
    kl = kl_logprobs(p)
    args = dict(hidden=p["hidden"], weight=p["weight"], targets=p["targets"],
                reference_logp=p["reference_logp"], desirable=p["desirable"])
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    return kto_torch.fused_linear_kto_loss(
        args["hidden"], args["weight"], args["targets"], None, args["reference_logp"],
        args["desirable"], bias=p["bias"], **{**kl, **kw})


# ---- library errors in the caller's words ----

def test_a_bad_target_is_named_at_its_index_in_the_targets_shape():
    batch = make_batch(1)  # [4, 6] targets, V = 29
    batch["targets"][1, 2] = 29
    error = raised(kto_torch.KTOError, KTO_LOSS, lambda: loss(batch))
    names(error, "targets[1, 2]", r"must be in \[0, 29\) or ignore_index \(-100\); got 29$")
    error = raised(kto_torch.KTOError, "kto_torch.sequence_logprobs",
                   lambda: kto_torch.sequence_logprobs(batch["logits"], batch["targets"]))
    names(error, "targets[1, 2]")
    # 1-D targets beside [rows, V] logits: the row, as the caller indexes it.
    flat = batch["targets"].reshape(-1)
    error = raised(kto_torch.KTOError, KTO_LOSS, lambda: kto_torch.kto_loss(
        batch["logits"].reshape(24, 29), flat, torch.arange(5) * 6, torch.zeros(4),
        batch["desirable"], *kl_args(batch)))
    names(error, "targets[8]")


def test_fused_bad_targets_are_named_in_their_shape():
    p = make_problem(2)  # [4, 6] targets, V = 41
    bad = p["targets"].clone()
    bad[3, 4] = -7
    error = raised(kto_torch.KTOError, FUSED, lambda: fused_loss(p, targets=bad))
    names(error, "targets[3, 4]", r"must be in \[0, 41\)")
    error = raised(kto_torch.KTOError, "kto_torch.fused_linear_logprobs",
                   lambda: kto_torch.fused_linear_logprobs(p["hidden"], p["weight"], bad))
    names(error, "targets[3, 4]")


def test_offsets_options_and_kl_log_probs_are_named_as_the_arguments():
    batch = make_batch(3)
    z, t = batch["logits"].reshape(24, 29), batch["targets"].reshape(-1)
    error = raised(kto_torch.KTOError, KTO_LOSS, lambda: kto_torch.kto_loss(
        z, t, torch.tensor([0, 6, 4, 12, 24]), torch.zeros(4), batch["desirable"],
        *kl_args(batch)))
    names(error, "offsets[2]", r"must be >= offsets\[1\] = 6 \(non-decreasing\); got 4$")
    names(raised(kto_torch.KTOError, KTO_LOSS, lambda: loss(batch, beta=-1.0)), "beta",
          r"must be finite, > 0")
    names(raised(kto_torch.KTOError, KTO_LOSS, lambda: loss(batch, temperature=0.0)),
          "temperature")
    names(raised(kto_torch.KTOError, KTO_LOSS, lambda: loss(batch, loss_type="dpo")),
          "loss_type", r"must be one of \['apo_zero_unpaired', 'kto'\]; got 'dpo'$")
    kl_n = batch["kl_num_tokens"].clone()
    kl_n[2] = -1
    error = raised(kto_torch.KTOError, KTO_LOSS, lambda: kto_torch.kto_loss(
        batch["logits"], batch["targets"], None, torch.zeros(4), batch["desirable"],
        batch["kl_policy"], batch["kl_reference"], kl_n))
    names(error, "kl_num_tokens[2]", r"must be >= 0; got -1$")
    error = raised(kto_torch.KTOError, "kto_torch.kl_partial", lambda: kto_torch.kl_partial(
        batch["kl_policy"], batch["kl_reference"], kl_n))
    names(error, "kl_num_tokens[2]")
    kl_p = batch["kl_policy"].clone()
    kl_p[1] = float("nan")
    error = raised(kto_torch.KTOError, KTO_LOSS, lambda: kto_torch.kto_loss(
        batch["logits"], batch["targets"], None, torch.zeros(4), batch["desirable"], kl_p,
        batch["kl_reference"], batch["kl_num_tokens"]))
    names(error, "kl_policy_logp[1]", r"must be finite")
    ref = torch.zeros(4)
    ref[3] = float("inf")
    error = raised(kto_torch.KTOError, KTO_LOSS, lambda: kto_torch.kto_loss(
        batch["logits"], batch["targets"], None, ref, batch["desirable"], *kl_args(batch)))
    names(error, "reference_logp[3]")
    p = make_problem(3)
    names(raised(kto_torch.KTOError, FUSED, lambda: fused_loss(p, beta=0.0)), "beta")
    names(raised(kto_torch.KTOError, FUSED, lambda: fused_loss(p, chunk_bytes=0)),
          "chunk_bytes", r"must be > 0; got 0$")


def test_non_finite_logits_name_the_row_in_the_logits_shape():
    batch = make_batch(4)
    batch["targets"][1, 3] = 5
    batch["logits"][1, 3, 7] = float("nan")
    error = raised(kto_torch.NonFiniteLogitsError, KTO_LOSS, lambda: loss(batch))
    names(error, "logits", r"must give a finite log-prob on scored rows; got .* in sequence 1, "
                           r"row 9 \(logits\[1, 3\]\): logit 7 is nan$")
    assert (error.sequence, error.row) == (1, 9)
    error = raised(kto_torch.NonFiniteLogitsError, "kto_torch.sequence_logprobs",
                   lambda: kto_torch.sequence_logprobs(batch["logits"], batch["targets"]))
    names(error, "logits")
    assert "(logits[1, 3])" in str(error)


def test_non_finite_hidden_states_name_the_element_in_the_hidden_shape():
    p = make_problem(5)  # hidden [4, 6, 12]
    p["targets"][2, 5] = 3
    p["hidden"][2, 5, 7] = float("inf")
    error = raised(kto_torch.NonFiniteLogitsError, FUSED, lambda: fused_loss(p))
    names(error, "hidden", r"must be finite on scored rows; got inf at hidden\[2, 5, 7\] in "
                           r"sequence 2, row 17$")
    assert (error.sequence, error.row) == (2, 17)


# ---- the binding's own checks ----

def test_a_transposed_head_is_named_as_the_weight_and_the_shape_it_must_have():
    p = make_problem(6)  # weight [41, 12]
    error = raised(kto_torch.KTOError, FUSED, lambda: fused_loss(p, weight=p["weight"].T))
    names(error, "weight", re.escape(
        "must be the lm_head's weight [V, D] with V >= 1 and D = 12 (the last dimension of "
        "'hidden'), as nn.Linear(D, V).weight holds it; got shape [12, 41]: a transposed "
        "[D, V] head; pass lm_head.weight itself, not its transpose"))
    error = raised(kto_torch.KTOError, "kto_torch.fused_linear_logprobs",
                   lambda: kto_torch.fused_linear_logprobs(p["hidden"], p["weight"][:, :5],
                                                           p["targets"]))
    names(error, "weight", r".* D = 12 .*; got shape \[41, 5\]$")
    error = raised(kto_torch.KTOError, FUSED, lambda: fused_loss(p, weight=p["weight"][0]))
    names(error, "weight", r"must be the lm_head's weight \[V, D\].*; got shape \[12\]$")


def test_a_module_where_a_tensor_belongs_is_refused_by_name():
    p = make_problem(7)
    head = torch.nn.Linear(12, 41)
    error = raised(kto_torch.KTOError, FUSED, lambda: fused_loss(p, weight=head))
    assert isinstance(error, TypeError)
    names(error, "weight", re.escape("must be a tensor; got the module Linear: pass its "
                                     "parameter (lm_head.weight), not the module"))
    error = raised(TypeError, "kto_torch.fused_linear_logprobs",
                   lambda: kto_torch.fused_linear_logprobs(p["hidden"], head, p["targets"]))
    names(error, "weight")
    error = raised(TypeError, "kto_torch.fused_linear_logprobs",
                   lambda: kto_torch.fused_linear_logprobs(p["hidden"], p["weight"],
                                                           p["targets"], bias=head))
    names(error, "bias", r"must be a tensor; got the module Linear: pass its parameter "
                         r"\(lm_head.bias\)")
    batch = make_batch(7)
    error = raised(TypeError, KTO_LOSS, lambda: kto_torch.kto_loss(
        head, batch["targets"], None, torch.zeros(4), batch["desirable"]))
    names(error, "logits", r"must be a tensor; got the module Linear$")
    error = raised(TypeError, KTO_LOSS, lambda: kto_torch.kto_loss(
        batch["logits"], batch["targets"].tolist(), None, torch.zeros(4), batch["desirable"]))
    names(error, "targets", r"must be a tensor; got list$")


def test_a_loss_without_its_kl_batch_says_what_to_pass():
    batch = make_batch(8)
    p = make_problem(8)
    for fn, call in ((KTO_LOSS, lambda: kto_torch.kto_loss(
            batch["logits"], batch["targets"], None, torch.zeros(4), batch["desirable"])),
            (FUSED, lambda: kto_torch.fused_linear_kto_loss(
                p["hidden"], p["weight"], p["targets"], None, p["reference_logp"],
                p["desirable"]))):
        names(raised(kto_torch.KTOError, fn, call), "kl_policy_logp",
              r"must hold the KL batch's log-probs \(at least one sequence\) with "
              r"reference_point='kl_batch' \(the default\)")
    # nonempty_mean with no KL sequence holding a token; an all-reduced (S, C) with C = 0.
    none = torch.zeros(4, dtype=torch.int64)
    names(raised(kto_torch.KTOError, KTO_LOSS, lambda: kto_torch.kto_loss(
        batch["logits"], batch["targets"], None, torch.zeros(4), batch["desirable"],
        batch["kl_policy"], batch["kl_reference"], none, kl_estimator="nonempty_mean")),
        "kl_num_tokens", r"must count at least one KL sequence with a scored token")
    kl = dict(kl_logprobs(p), kl_num_tokens=none)
    names(raised(kto_torch.KTOError, FUSED, lambda: kto_torch.fused_linear_kto_loss(
        p["hidden"], p["weight"], p["targets"], None, p["reference_logp"], p["desirable"],
        kl_estimator="nonempty_mean", **kl)), "kl_num_tokens")
    empty = torch.tensor([1.5, 0.0], dtype=torch.float64)
    names(raised(kto_torch.KTOError, KTO_LOSS, lambda: kto_torch.kto_loss(
        batch["logits"], batch["targets"], None, torch.zeros(4), batch["desirable"],
        global_kl=empty)), "global_kl", r"must count at least one KL example \(C >= 1\)")


def test_an_empty_batch_and_a_bad_rank_are_named():
    batch = make_batch(9)
    error = raised(kto_torch.KTOError, KTO_LOSS, lambda: kto_torch.kto_loss(
        batch["logits"].reshape(24, 29), batch["targets"].reshape(-1),
        torch.tensor([0]), torch.zeros(0), batch["desirable"][:0], *kl_args(batch)))
    names(error, "offsets", r"must hold B \+ 1 entries with B >= 1 sequences \(an empty batch "
                            r"has no loss\); got shape \[1\]$")
    p = make_problem(9)
    error = raised(kto_torch.KTOError, FUSED, lambda: fused_loss(p, hidden=p["hidden"][None]))
    names(error, "hidden", r"must be \[N, D\] or \[B, T, D\]; got 4 dims")
    error = raised(kto_torch.KTOError, FUSED, lambda: fused_loss(
        p, hidden=p["hidden"].reshape(24, 12), targets=p["targets"].reshape(-1)))
    names(error, "offsets", r"must be given for hidden that are not \[B, T, D\]")


# ---- the loss's dtype ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_loss_is_in_the_accumulation_type_within_the_float64_rule(dtype):
    batch = make_batch(10, dtype=dtype)
    logits = batch["logits"].detach().requires_grad_(True)
    out = kto_torch.kto_loss(logits, batch["targets"], None, torch.zeros(4, dtype=torch.float64),
                             batch["desirable"], *kl_args(batch), beta=0.3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.loss.dtype == acc and out.logp.dtype == acc
    assert out.metrics["loss"].dtype == torch.float64  # metrics stay float64
    assert out.loss.item() == pytest.approx(out.metrics["loss"].item(), rel=2**-23)
    out.loss.backward()
    assert logits.grad.dtype == dtype
    # Against the float64 reference of the upcast logits, under the rule (kto_reference).
    o = dict(beta=0.3)
    z64 = batch["logits"].double()
    tokens = kr.token_scales(z64, batch["targets"])
    logp, _ = kr.sequence_logprobs(z64, batch["targets"])
    z0 = kr.reference_z0(*kl_args(batch), o)
    step = kr.kto_loss(logp, torch.zeros(4, dtype=torch.float64), batch["desirable"], z0, o)
    kl_scale = float((batch["kl_policy"].abs() + batch["kl_reference"].abs()).double().mean())
    scales = kr.kto_step_scales(kr.sequence_scale(tokens), torch.zeros(4), batch["desirable"],
                                step, kl_scale)
    kr.assert_close_by_rule(out.loss, step.loss, scales.metrics["loss"], kr.rtol_for(dtype),
                            what="loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_fused_loss_is_in_the_accumulation_type(dtype):
    p = make_problem(11, dtype=dtype)
    out = fused_loss(p)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.loss.dtype == acc and out.logp.dtype == acc
    assert out.metrics["loss"].dtype == torch.float64


# ---- one shape for the KL batch ----

@pytest.mark.parametrize("estimator", ["mean", "nonempty_mean"])
def test_both_losses_take_the_kl_batch_as_its_log_probs(estimator):
    """The same KL log-probs give the same z0 and, in float64, the same loss to kto_loss on
    the materialised logits and to fused_linear_kto_loss on the hidden states; an
    all-reduced (S, C) of them (global_kl) gives the same step as the local batch."""
    p = make_problem(12, dtype=torch.float64)
    kl = kl_logprobs(p)
    o = dict(beta=0.2, kl_estimator=estimator, clamp_kl=False)
    z = logits_of(p, p["hidden"], p["weight"], p["bias"])
    want = kto_torch.kto_loss(z, p["targets"], None, p["reference_logp"], p["desirable"],
                              kl["kl_policy_logp"], kl["kl_reference_logp"], kl["kl_num_tokens"],
                              **o)
    got = kto_torch.fused_linear_kto_loss(p["hidden"], p["weight"], p["targets"], None,
                                          p["reference_logp"], p["desirable"], p["bias"], **kl,
                                          **o)
    assert float(got.metrics["kl"]) == float(want.metrics["kl"]) != 0.0
    assert abs(got.loss.item() - want.loss.item()) <= 1e-12
    partial = kto_torch.kl_partial(*kl.values(), kl_estimator=estimator)
    global_ = kto_torch.fused_linear_kto_loss(p["hidden"], p["weight"], p["targets"], None,
                                              p["reference_logp"], p["desirable"], p["bias"],
                                              global_kl=partial, **o)
    assert torch.equal(global_.metrics["kl"], got.metrics["kl"])
    assert torch.equal(global_.loss, got.loss)


def test_the_fused_loss_takes_no_kl_hidden_states():
    p = make_problem(13)
    with pytest.raises(TypeError, match="kl_hidden"):
        kto_torch.fused_linear_kto_loss(p["hidden"], p["weight"], p["targets"], None,
                                        p["reference_logp"], p["desirable"],
                                        kl_hidden=p["kl_hidden"], kl_targets=p["kl_targets"],
                                        kl_reference_logp=p["kl_reference_logp"])
    kto_params = inspect.signature(kto_torch.kto_loss).parameters
    fused_params = inspect.signature(kto_torch.fused_linear_kto_loss).parameters
    for name in ("kl_policy_logp", "kl_reference_logp", "kl_num_tokens", "global_kl"):
        assert name in kto_params and name in fused_params, name


def test_fused_hidden_states_keep_their_shape_and_strides():
    """[B, T, D] hidden states go to the op as they are: dL/dhidden comes back in their shape,
    a strided slice (TRL's hidden[:, :-1]) included, equal to the flattened call's."""
    p = make_problem(14)
    full = torch.cat([p["hidden"], torch.randn(4, 1, 12)], 1).requires_grad_(True)
    out = fused_loss(p, hidden=full[:, :-1])
    out.loss.backward()
    flat = p["hidden"].reshape(24, 12).clone().requires_grad_(True)
    want = kto_torch.fused_linear_kto_loss(flat, p["weight"], p["targets"].reshape(-1),
                                           torch.arange(5) * 6, p["reference_logp"],
                                           p["desirable"], p["bias"], **kl_logprobs(p))
    want.loss.backward()
    assert torch.equal(out.loss, want.loss)
    assert torch.equal(full.grad[:, :-1].reshape(24, 12), flat.grad)
    assert bool((full.grad[:, -1] == 0).all())


# ---- docstrings ----

@pytest.mark.parametrize("fn", [kto_torch.kto_loss, kto_torch.fused_linear_kto_loss,
                                kto_torch.sequence_logprobs, kto_torch.fused_linear_logprobs,
                                kto_torch.kl_partial, kto_torch.reference_point])
def test_every_argument_is_documented(fn):
    doc = fn.__doc__
    for name in inspect.signature(fn).parameters:
        assert re.search(rf"\b{name}\b", doc), f"{fn.__name__}: {name} is not documented"
