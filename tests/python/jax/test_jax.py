"""kto's JAX FFI op against a pure-JAX float64 reference (CPU).

Tolerance rule (docs/math.md §7): fp32 accumulation is compared with the float64
reference of the same (upcast) inputs at 1e-5 relative to the magnitude the
quantity is computed from; a gradient stored as bfloat16/float16 adds that
type's unit roundoff (2^-8 / 2^-11) relative to the value.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kto_jax

jax.config.update("jax_enable_x64", True)


def make_batch(seed, vocab=23, dtype=jnp.float32, num_sequences=5):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 6, size=num_sequences)
    lengths[1] = 1
    offsets = np.concatenate([[1], 1 + np.cumsum(lengths)])  # row 0 outside every sequence
    rows = int(offsets[-1]) + 2
    logits = jnp.asarray(rng.normal(0, 3, size=(rows, vocab)), dtype)
    targets = rng.integers(0, vocab, size=rows)
    targets[rng.random(rows) < 0.2] = -100
    if num_sequences > 2:
        targets[offsets[2] : offsets[3]] = -100  # an all-ignored sequence
    desirable = (rng.random(num_sequences) < 0.5).astype(np.uint8)
    k = num_sequences + 1
    kl_num_tokens = rng.integers(0, 5, size=k)
    kl_num_tokens[0] = 0
    kl_policy = np.where(kl_num_tokens > 0, rng.normal(-20, 4, size=k), 0).astype(np.float32)
    kl_reference = np.where(kl_num_tokens > 0, kl_policy - 0.4 + rng.normal(0, 0.5, size=k), 0)
    seq_of_row = np.full(rows, num_sequences)
    for s in range(num_sequences):
        seq_of_row[offsets[s] : offsets[s + 1]] = s
    return dict(
        logits=logits,
        targets=targets,
        offsets=offsets,
        desirable=desirable,
        kl_policy_logp=kl_policy,
        kl_reference_logp=kl_reference.astype(np.float32),
        kl_num_tokens=kl_num_tokens,
        seq_of_row=seq_of_row,
        rng=rng,
    )


def transformed(logits64, options):
    """The model's logit transform (docs/math.md): z' = c·tanh(a·z/c)/τ, or a·z/τ when c = 0."""
    a, c, tau = options.logit_scale, options.logit_softcap, options.temperature
    z = a * logits64
    return (c * jnp.tanh(z / c) if c > 0 else z) / tau


def reference_logp(logits64, batch, options):
    b = len(batch["offsets"]) - 1
    targets = jnp.asarray(batch["targets"])
    mask = targets != options.ignore_index
    lsm = jax.nn.log_softmax(transformed(logits64, options), axis=-1)
    picked = jnp.take_along_axis(lsm, jnp.where(mask, targets, 0)[:, None], axis=1)[:, 0]
    token = jnp.where(mask, picked, 0.0)
    seg = jnp.asarray(batch["seq_of_row"])
    logp = jax.ops.segment_sum(token, seg, num_segments=b + 1)[:b]
    n = jax.ops.segment_sum(mask.astype(jnp.float64), seg, num_segments=b + 1)[:b]
    if options.average_logprob:
        logp = jnp.where(n > 0, logp / jnp.maximum(n, 1), 0.0)
    return logp, n


def reference_loss(logits64, batch, reference_logp_, options):
    """The KTO loss of docs/math.md, written out in float64 JAX."""
    logp, _ = reference_logp(logits64, batch, options)
    rho = logp - jnp.asarray(reference_logp_, jnp.float64)
    kl_rho = np.asarray(batch["kl_policy_logp"], np.float64) - np.asarray(
        batch["kl_reference_logp"], np.float64
    )
    if options.loss_type == "apo_zero_unpaired" or options.reference_point == "zero":
        z0 = 0.0
    elif options.reference_point == "fixed":
        z0 = options.fixed_z0
    else:
        keep = (
            np.ones_like(kl_rho, bool)
            if options.kl_estimator == "mean"
            else batch["kl_num_tokens"] > 0
        )
        z0 = kl_rho[keep].sum() / keep.sum() if keep.sum() else 0.0
        if options.clamp_kl:
            z0 = max(0.0, z0)
    d = jnp.asarray(batch["desirable"]) == 1
    u = jnp.where(d, options.beta * (rho - z0), options.beta * (z0 - rho))
    if options.link == "one_minus_sigmoid":
        f = 1.0 - jax.nn.sigmoid(u)
    else:
        f = -jax.nn.log_sigmoid(u)
    losses = jnp.where(d, options.desirable_weight, options.undesirable_weight) * f
    total = losses.sum()
    loss = total if options.reduction == "sum" else total / len(batch["desirable"])
    return loss, (z0, rho, logp, losses)


def run(batch, reference_logp_, options):
    args = (
        batch["logits"],
        batch["targets"],
        batch["offsets"],
        reference_logp_,
        batch["desirable"],
        batch["kl_policy_logp"],
        batch["kl_reference_logp"],
        batch["kl_num_tokens"],
    )
    loss, metrics = kto_jax.kto_loss(*args, options)

    def f(z):
        return kto_jax.kto_loss(z, *args[1:], options)[0]

    return loss, metrics, jax.jit(jax.grad(f))(batch["logits"]), jax.grad(f)(batch["logits"])


def check(batch, options, unit_roundoff):
    logits64 = jnp.asarray(batch["logits"], jnp.float64)
    logp64, _ = reference_logp(logits64, batch, options)
    ref = np.asarray(logp64 + batch["rng"].normal(0, 0.5, size=logp64.shape), np.float32)
    want_loss, (z0, rho, logp, losses) = reference_loss(logits64, batch, ref, options)
    want_grad = jax.grad(lambda z: reference_loss(z, batch, ref, options)[0])(logits64)
    loss, metrics, grad_jit, grad = run(batch, ref, options)

    scale = 1.0 + float(jnp.abs(transformed(logits64, options)).max()) * batch["logits"].shape[0]
    rtol = 1e-5
    assert abs(float(loss) - float(want_loss)) <= rtol * scale * options.beta
    assert abs(float(metrics["kl"]) - z0) <= rtol * max(1.0, abs(z0))
    np.testing.assert_allclose(metrics["per_example/logp"], logp, rtol=0, atol=rtol * scale)
    np.testing.assert_allclose(metrics["per_example/ratio"], rho, rtol=0, atol=rtol * scale)
    np.testing.assert_allclose(
        metrics["per_example/loss"], losses, rtol=0, atol=rtol * scale * options.beta * 2
    )
    d = batch["desirable"] == 1
    if d.any():
        np.testing.assert_allclose(
            metrics["rewards/chosen"], options.beta * np.mean(rho[d]), atol=rtol * scale
        )
    assert float(metrics["count/chosen"]) == d.sum()
    assert float(metrics["count/rejected"]) == (~d).sum()
    # Gradients: jit and eager agree bit for bit; both match the reference.
    assert np.array_equal(np.asarray(grad_jit), np.asarray(grad))
    g = np.asarray(grad, np.float64)
    w = np.asarray(want_grad)
    gmax = float(np.abs(w).max()) + 1e-30
    assert np.all(np.abs(g - w) <= rtol * gmax * 10 + unit_roundoff * np.abs(w)), (
        np.abs(g - w).max(),
        gmax,
    )
    # Rows outside sequences and ignored rows have exactly zero gradient, and their lse
    # is reported as 0 (as kto_torch), not the library's NaN marker.
    unscored = (batch["seq_of_row"] == len(batch["desirable"])) | (batch["targets"] == -100)
    assert np.all(g[unscored] == 0)
    assert np.all(np.asarray(metrics["per_row/lse"])[unscored] == 0)
    scored = np.asarray(metrics["per_row/lse"])[~unscored]
    want_lse = np.asarray(jax.scipy.special.logsumexp(transformed(logits64, options),
                                                      axis=-1))[~unscored]
    assert np.all(np.abs(scored - want_lse) <= rtol * (1 + np.abs(want_lse)))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_float32_default_options_match_reference(seed):
    check(make_batch(seed), kto_jax.KTOOptions(beta=0.3, undesirable_weight=1.33), 2.0**-24)


@pytest.mark.parametrize(
    "dtype,unit_roundoff", [(jnp.bfloat16, 2.0**-8), (jnp.float16, 2.0**-11)]
)
def test_half_precision_logits_match_reference_of_upcast_values(dtype, unit_roundoff):
    check(make_batch(7, vocab=301, dtype=dtype), kto_jax.KTOOptions(beta=0.5), unit_roundoff)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("link", ["one_minus_sigmoid", "neg_log_sigmoid"])
@pytest.mark.parametrize("kl_estimator", ["mean", "nonempty_mean"])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_option_matches_reference(loss_type, link, kl_estimator, average, reduction):
    options = kto_jax.KTOOptions(
        beta=0.7,
        desirable_weight=1.4,
        undesirable_weight=0.8,
        loss_type=loss_type,
        link=link,
        kl_estimator=kl_estimator,
        average_logprob=average,
        reduction=reduction,
    )
    check(make_batch(11), options, 2.0**-24)


# (logit_scale, logit_softcap, temperature): Cohere-style scale, Gemma-2-style soft-cap
# (saturating: |a·z| reaches 3c), sampling temperature, and all three together.
TRANSFORMS = [(0.0625, 0.0, 1.0), (1.0, 2.5, 1.0), (1.0, 0.0, 0.7), (1.5, 4.0, 1.3)]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["scale", "softcap", "temperature", "all"])
@pytest.mark.parametrize("dtype,unit_roundoff", [(jnp.float32, 2.0**-24), (jnp.bfloat16, 2.0**-8)])
def test_logit_transform_matches_reference(transform, dtype, unit_roundoff):
    a, c, tau = transform
    options = kto_jax.KTOOptions(beta=0.4, logit_scale=a, logit_softcap=c, temperature=tau)
    check(make_batch(13, vocab=41, dtype=dtype), options, unit_roundoff)


def test_logit_transform_gradient_matches_finite_differences():
    """The op's gradient against central differences of the float64 reference loss (no
    autodiff), on a saturating soft-cap. With h = 1e-4 the differences' error is about
    h^2/6 times the third derivative (below 1e-8 here) plus float64 noise (1e-12); the op's
    own error is check()'s fp32 rule, 10 · 1e-5 of the largest gradient entry."""
    batch = make_batch(17, vocab=29)
    options = kto_jax.KTOOptions(beta=0.8, logit_scale=1.2, logit_softcap=2.0, temperature=0.9)
    logits = np.asarray(batch["logits"], np.float64)
    logp64, _ = reference_logp(jnp.asarray(logits), batch, options)
    ref = np.asarray(logp64 + batch["rng"].normal(0, 0.5, size=logp64.shape), np.float32)
    _, _, _, grad = run(batch, ref, options)
    grad = np.asarray(grad, np.float64)

    def loss64(z):
        return float(reference_loss(jnp.asarray(z), batch, ref, options)[0])

    scored = np.flatnonzero((batch["seq_of_row"] < len(batch["desirable"]))
                            & (batch["targets"] != -100))
    h, checked = 1e-4, 0
    bound = 10 * 1e-5 * np.abs(grad).max()
    for r in scored[:4]:
        for v in (int(batch["targets"][r]), (int(batch["targets"][r]) + 5) % 29):
            plus, minus = logits.copy(), logits.copy()
            plus[r, v] += h
            minus[r, v] -= h
            fd = (loss64(plus) - loss64(minus)) / (2 * h)
            assert abs(fd - grad[r, v]) <= bound, (r, v, fd, grad[r, v])
            checked += 1
    assert checked == 8


def test_bad_logit_transform_raises_the_library_message():
    batch = make_batch(3)
    with pytest.raises(Exception, match="options.logit_softcap"):
        run(batch, np.zeros(len(batch["desirable"]), np.float32),
            kto_jax.KTOOptions(logit_softcap=-1.0))


def test_sequence_logprobs_matches_reference():
    batch = make_batch(5, vocab=50)
    options = kto_jax.KTOOptions()
    logp, n = kto_jax.sequence_logprobs(batch["logits"], batch["targets"], batch["offsets"])
    want, want_n = reference_logp(jnp.asarray(batch["logits"], jnp.float64), batch, options)
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(n, want_n)


def test_bad_target_id_raises_the_library_message():
    batch = make_batch(9)
    batch["targets"][batch["offsets"][0]] = 10_000
    with pytest.raises(Exception, match=r"targets\[\d+\]' must be in \[0, 23\)"):
        run(batch, np.zeros(5, np.float32), kto_jax.KTOOptions())


def test_bad_option_raises_before_calling_the_library():
    with pytest.raises(ValueError, match="options.loss_type"):
        kto_jax.KTOOptions(loss_type="dpo").values()


def test_options_are_the_library_contract():
    """KTOOptions covers every option of the library's one options array (kto/options.hpp),
    and the named values are the library's table, not a copy."""
    assert {f.name for f in dataclasses.fields(kto_jax.KTOOptions)} == set(kto_jax.OPTION_NAMES)
    assert kto_jax.LOSS_TYPES == {"kto": 0, "apo_zero_unpaired": 1}
    assert kto_jax.LINKS == {"one_minus_sigmoid": 0, "neg_log_sigmoid": 1}
    assert kto_jax.REFERENCE_POINTS == {"kl_batch": 0, "fixed": 1, "zero": 2}
    assert kto_jax.KL_ESTIMATORS == {"mean": 0, "nonempty_mean": 1}
    assert kto_jax.REDUCTIONS == {"mean": 0, "sum": 1}
    values = kto_jax.KTOOptions(link="neg_log_sigmoid", beta=0.25, ignore_index=-1).values()
    assert values.dtype == np.float64 and values.shape == (len(kto_jax.OPTION_NAMES),)
    assert values[kto_jax.OPTION_NAMES.index("link")] == 1
    assert values[kto_jax.OPTION_NAMES.index("beta")] == 0.25
    assert values[kto_jax.OPTION_NAMES.index("ignore_index")] == -1


def test_malformed_options_array_is_refused_by_the_library():
    """A direct ffi_call's "options" attribute is checked by kto::options_from_array: its
    length and each named value's code, the error naming the public function."""
    batch = make_batch(3)
    b = len(batch["desirable"])
    results = (jax.ShapeDtypeStruct((b,), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32))

    def call(values):
        return kto_jax._library._call("kto_sequence_logprobs", results, options=values)(
            batch["logits"], jnp.asarray(batch["targets"], jnp.int32),
            jnp.asarray(batch["offsets"], jnp.int32))

    good = kto_jax.KTOOptions().values()
    count = len(good)
    with pytest.raises(Exception, match=rf"kto_jax.sequence_logprobs: argument 'options' must "
                                        rf"hold kOptionCount = {count} values; got {count - 1}"):
        call(good[:-1])
    bad = good.copy()
    bad[kto_jax.OPTION_NAMES.index("link")] = 2
    with pytest.raises(Exception, match=r"kto_jax.sequence_logprobs: argument 'options.link' "
                                        r"must be a whole number in \[0, 1\]; got 2"):
        call(bad)
    np.testing.assert_array_equal(np.asarray(call(good)[1]),
                                  np.asarray(kto_jax.sequence_logprobs(
                                      batch["logits"], batch["targets"], batch["offsets"])[1]))


def test_mean_denominator_divides_loss_and_gradient():
    batch = make_batch(12)
    ref = np.full(5, -40.0, np.float32)
    loss, _, _, grad = run(batch, ref, kto_jax.KTOOptions(beta=0.3))
    loss4, _, _, grad4 = run(batch, ref, kto_jax.KTOOptions(beta=0.3, mean_denominator=20))
    np.testing.assert_allclose(float(loss4) * 4, float(loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad4) * 4, np.asarray(grad), rtol=1e-5, atol=1e-12)


def test_global_kl_replaces_the_local_kl_batch():
    batch = make_batch(13)
    ref = np.full(5, -40.0, np.float32)
    opts = kto_jax.KTOOptions(beta=0.3, clamp_kl=False)
    loss, metrics, _, grad = run(batch, ref, opts)
    partial = kto_jax.kl_partial(batch["kl_policy_logp"], batch["kl_reference_logp"],
                                 batch["kl_num_tokens"])
    want = np.asarray(batch["kl_policy_logp"], np.float64) - batch["kl_reference_logp"]
    np.testing.assert_allclose(partial, [want.sum(), len(want)], rtol=1e-6)

    def f(z):
        return kto_jax.kto_loss(z, batch["targets"], batch["offsets"], ref, batch["desirable"],
                                options=opts, global_kl=partial)

    (loss2, metrics2), grad2 = jax.value_and_grad(f, has_aux=True)(batch["logits"])
    np.testing.assert_allclose(float(metrics2["kl"]), float(metrics["kl"]), rtol=1e-6)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad2), np.asarray(grad), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="global_kl"):
        kto_jax.kto_loss(batch["logits"], batch["targets"], batch["offsets"], ref,
                         batch["desirable"], options=opts, global_kl=np.zeros(3, np.float32))


def test_padded_batch_t_v_logits_take_no_offsets():
    rng = np.random.default_rng(14)
    logits = jnp.asarray(rng.normal(size=(3, 4, 9)), jnp.float32)
    labels = rng.integers(0, 9, size=(3, 4)).astype(np.int32)
    labels[:, 0] = -100
    args = (np.full(3, -6.0, np.float32), np.array([1, 0, 1], np.uint8))
    opts = kto_jax.KTOOptions(reference_point="zero")
    loss3, _ = kto_jax.kto_loss(logits, labels, None, *args, options=opts)
    loss2, _ = kto_jax.kto_loss(logits.reshape(12, 9), labels.reshape(-1),
                                np.arange(4, dtype=np.int32) * 4, *args, options=opts)
    assert float(loss3) == float(loss2)


def test_package_version_is_the_library_version():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "include" / "kto" / "config.hpp").read_text()
    want = ".".join(re.search(rf"#define KTO_VERSION_{k} (\d+)", text).group(1)
                    for k in ("MAJOR", "MINOR", "PATCH"))
    assert kto_jax.__version__ == want


def reference_token_statistics(logits64, batch, options):
    """Per sequence: the sums over its scored tokens of the entropy (−Σ p log p) and mean
    logit (Σ z' / V) of the transformed logits z', and the magnitudes each sum comes from
    (1 + the row's range; mean |z'|), for the tolerance rule of test_torch_token_statistics:
    1e-5 relative to that magnitude, plus float32's unit roundoff of the result."""
    z = transformed(logits64, options)
    b = len(batch["offsets"]) - 1
    lsm = jax.nn.log_softmax(z, axis=-1)
    entropy = -(jnp.exp(lsm) * lsm).sum(-1)
    scored = (jnp.asarray(batch["seq_of_row"]) < b) & (jnp.asarray(batch["targets"]) != -100)
    seg = jnp.asarray(batch["seq_of_row"])

    def per_sequence(x):
        return jax.ops.segment_sum(jnp.where(scored, x, 0.0), seg, num_segments=b + 1)[:b]

    return (per_sequence(entropy), per_sequence(1 + z.max(-1) - z.min(-1)),
            per_sequence(z.mean(-1)), per_sequence(jnp.abs(z).mean(-1)))


def assert_statistic(got, want, scale):
    got, want, scale = (np.asarray(x, np.float64) for x in (got, want, scale))
    bound = 1e-5 * np.maximum(np.abs(want), scale) + 2.0**-24 * np.abs(want)
    assert np.all(np.abs(got - want) <= bound), (got, want, bound)


@pytest.mark.parametrize("transform", [(1.0, 0.0, 1.0), (1.5, 4.0, 1.3)], ids=["plain", "all"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_statistics_match_reference(transform, dtype):
    a, c, tau = transform
    batch = make_batch(19, vocab=37, dtype=dtype)
    plain = kto_jax.KTOOptions(beta=0.4, logit_scale=a, logit_softcap=c, temperature=tau)
    options = dataclasses.replace(plain, token_statistics=True)
    ref = np.zeros(len(batch["desirable"]), np.float32) - 20
    loss, metrics, grad_jit, grad = run(batch, ref, options)
    loss0, metrics0, _, grad0 = run(batch, ref, plain)
    assert "per_example/entropy_sum" not in metrics0
    # The statistics leave the loss, the metrics and the gradient bit for bit as they are.
    assert float(loss) == float(loss0)
    assert np.array_equal(np.asarray(grad), np.asarray(grad0))
    for key, value in metrics0.items():
        assert np.array_equal(np.asarray(metrics[key]), np.asarray(value)), key
    h, hs, m, ms = reference_token_statistics(jnp.asarray(batch["logits"], jnp.float64), batch,
                                              options)
    assert metrics["per_example/entropy_sum"].shape == (len(batch["desirable"]),)
    assert_statistic(metrics["per_example/entropy_sum"], h, hs)
    assert_statistic(metrics["per_example/mean_logit_sum"], m, ms)
    # The all-ignored sequence (make_batch's third) sums nothing.
    assert float(metrics["per_example/entropy_sum"][2]) == 0.0


@pytest.mark.parametrize("asked", [False, True])
def test_statistics_result_must_match_the_option(asked):
    """A direct ffi_call whose token-statistics result disagrees with the attribute is refused
    (the wrappers size it from the options)."""
    batch = make_batch(3)
    b = len(batch["desirable"])
    options = kto_jax.KTOOptions(token_statistics=asked)
    wrong = dataclasses.replace(options, token_statistics=not asked)
    call = kto_jax._library._call("kto_step_forward",
                         kto_jax.functional._step_results(batch["logits"].shape[0], b, wrong),
                         options=options.values())
    want = 2 * b if asked else 0
    with pytest.raises(Exception, match=f"kto_jax.kto_loss: the token statistics result must "
                                        f"hold {want} elements"):
        call(batch["logits"], jnp.asarray(batch["targets"], jnp.int32),
             jnp.asarray(batch["offsets"], jnp.int32), jnp.full((b,), -20.0, jnp.float32),
             jnp.asarray(batch["desirable"], jnp.uint8),
             jnp.asarray(batch["kl_policy_logp"], jnp.float32),
             jnp.asarray(batch["kl_reference_logp"], jnp.float32),
             jnp.asarray(batch["kl_num_tokens"], jnp.int32), jnp.zeros((0,), jnp.float32))


@pytest.mark.parametrize("fused", [False, True])
def test_targets_must_hold_one_id_per_row(fused):
    """A targets array shorter than the rows is refused in Python, naming the public function
    (the CUDA handlers would otherwise read past it)."""
    rows, d, v = 6, 8, 11
    targets, offsets = jnp.zeros((rows - 1,), jnp.int32), jnp.array([0, 3, 6], jnp.int32)
    opts = kto_jax.KTOOptions(reference_point="zero")
    if fused:
        call, fn = (lambda: kto_jax.fused_linear_kto_loss(
            jnp.ones((rows, d)), jnp.ones((v, d)), targets, offsets, jnp.zeros(2),
            jnp.array([1, 0]), options=opts)), "kto_jax.fused_linear_kto_loss"
    else:
        call, fn = (lambda: kto_jax.kto_loss(jnp.ones((rows, v)), targets, offsets,
                                             jnp.zeros(2), jnp.array([1, 0]), options=opts),
                    "kto_jax.kto_loss")
    with pytest.raises(ValueError, match=rf"{fn}: argument 'targets' must hold one token id per "
                                         rf"row of '(logits|hidden)' \(6\); got 5"):
        call()
