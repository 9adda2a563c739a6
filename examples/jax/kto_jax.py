"""kto for JAX: the KTO loss and its logit gradient through XLA FFI (CPU).

    import kto_jax
    loss, metrics = kto_jax.kto_loss(logits, targets, offsets, reference_logp, desirable,
                                     kl_policy_logp, kl_reference_logp, kl_num_tokens,
                                     kto_jax.KTOOptions(beta=0.1))
    jax.grad(lambda z: kto_jax.kto_loss(z, ...)[0])(logits)

`kto_loss` is a jax.custom_vjp: the forward runs the library's sequence
log-probs, KL partial and finish; the backward its one-pass logit gradient,
scaled by the incoming cotangent. Both work under jax.jit. Logits are a
[rows, vocab] array (float32, bfloat16 or float16); sequences are CSR `offsets`
over the rows; `targets` uses ignore_index (-100) for unscored rows. The
shared library is compiled from kto_jax_ffi.cpp on first use (g++, the jaxlib
FFI headers and Eigen), into $KTO_JAX_BUILD or ../../build/jax.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent
_SOURCE = _HERE / "kto_jax_ffi.cpp"

LOSS_TYPES = {"kto": 0, "apo_zero_unpaired": 1}
LINKS = {"one_minus_sigmoid": 0, "neg_log_sigmoid": 1}
REFERENCE_POINTS = {"kl_batch": 0, "fixed": 1, "zero": 2}
KL_ESTIMATORS = {"mean": 0, "nonempty_mean": 1}
REDUCTIONS = {"mean": 0, "sum": 1}
METRIC_NAMES = (
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "count/chosen",
    "count/rejected",
)


@dataclasses.dataclass(frozen=True)
class KTOOptions:
    """Every option of kto::Options, by TRL's names where TRL has one."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"
    link: str = "one_minus_sigmoid"
    reference_point: str = "kl_batch"
    kl_estimator: str = "mean"
    clamp_kl: bool = True
    fixed_z0: float = 0.0
    average_log_prob: bool = False
    reduction: str = "mean"
    ignore_index: int = -100

    def attributes(self) -> dict:
        for name, table in (
            ("loss_type", LOSS_TYPES),
            ("link", LINKS),
            ("reference_point", REFERENCE_POINTS),
            ("kl_estimator", KL_ESTIMATORS),
            ("reduction", REDUCTIONS),
        ):
            if getattr(self, name) not in table:
                raise ValueError(
                    f"kto: argument 'options.{name}' must be one of {sorted(table)}; "
                    f"got {getattr(self, name)!r}"
                )
        return dict(
            beta=np.float64(self.beta),
            desirable_weight=np.float64(self.desirable_weight),
            undesirable_weight=np.float64(self.undesirable_weight),
            loss_type=np.int32(LOSS_TYPES[self.loss_type]),
            link=np.int32(LINKS[self.link]),
            reference_point=np.int32(REFERENCE_POINTS[self.reference_point]),
            kl_estimator=np.int32(KL_ESTIMATORS[self.kl_estimator]),
            clamp_kl=bool(self.clamp_kl),
            fixed_z0=np.float64(self.fixed_z0),
            average=bool(self.average_log_prob),
            reduction=np.int32(REDUCTIONS[self.reduction]),
            ignore_index=np.int64(self.ignore_index),
        )


def _build_dir() -> Path:
    return Path(os.environ.get("KTO_JAX_BUILD", _ROOT / "build" / "jax"))


def build_library() -> Path:
    """Compiles kto_jax_ffi.cpp unless an up-to-date library exists."""
    out = _build_dir() / "libkto_jax.so"
    headers = list((_ROOT / "include").rglob("*.hpp"))
    newest = max(p.stat().st_mtime for p in [_SOURCE, *headers])
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        os.environ.get("CXX", "g++"),
        "-std=c++17",
        "-O3",
        "-march=native",
        "-shared",
        "-fPIC",
        "-pthread",
        f"-I{_ROOT / 'include'}",
        "-I/usr/include/eigen3",
        "-isystem",
        str(jax.ffi.include_dir()),
        str(_SOURCE),
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    return out


@functools.lru_cache(maxsize=None)
def _register() -> None:
    lib = ctypes.cdll.LoadLibrary(str(build_library()))
    for name, symbol in (
        ("kto_sequence_logprobs", lib.KtoSequenceLogprobs),
        ("kto_step_forward", lib.KtoStepForward),
        ("kto_step_backward", lib.KtoStepBackward),
    ):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")


def _ints(x):
    return jnp.asarray(x, dtype=jnp.int32)


def sequence_logprobs(logits, targets, offsets, *, average_log_prob=False, ignore_index=-100):
    """Per-sequence log-probs and token counts (forward only, no gradient)."""
    _register()
    num_sequences = offsets.shape[0] - 1
    call = jax.ffi.ffi_call(
        "kto_sequence_logprobs",
        (
            jax.ShapeDtypeStruct((num_sequences,), jnp.float32),
            jax.ShapeDtypeStruct((num_sequences,), jnp.int32),
        ),
        vmap_method="sequential",
    )
    return call(
        logits,
        _ints(targets),
        _ints(offsets),
        ignore_index=np.int64(ignore_index),
        average=bool(average_log_prob),
    )


def _forward(options, logits, targets, offsets, reference_logp, desirable, kl_policy_logp,
             kl_reference_logp, kl_num_tokens):
    _register()
    rows = logits.shape[0]
    b = offsets.shape[0] - 1
    call = jax.ffi.ffi_call(
        "kto_step_forward",
        (
            jax.ShapeDtypeStruct((len(METRIC_NAMES),), jnp.float32),
            jax.ShapeDtypeStruct((5, b), jnp.float32),
            jax.ShapeDtypeStruct((b,), jnp.int32),
            jax.ShapeDtypeStruct((rows,), jnp.float32),
        ),
        vmap_method="sequential",
    )
    return call(
        logits,
        _ints(targets),
        _ints(offsets),
        jnp.asarray(reference_logp, jnp.float32),
        jnp.asarray(desirable, jnp.uint8),
        jnp.asarray(kl_policy_logp, jnp.float32),
        jnp.asarray(kl_reference_logp, jnp.float32),
        _ints(kl_num_tokens),
        **options.attributes(),
    )


def _outputs(metrics, per_example, num_tokens):
    out = {name: metrics[i] for i, name in enumerate(METRIC_NAMES)}
    for k, name in enumerate(("logp", "ratio", "reward", "loss", "grad_logp")):
        out[f"per_example/{name}"] = per_example[k]
    out["per_example/num_tokens"] = num_tokens
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def kto_loss(logits, targets, offsets, reference_logp, desirable, kl_policy_logp,
             kl_reference_logp, kl_num_tokens, options=KTOOptions()):
    """(loss, metrics): TRL's KTO loss of the target batch and its metrics."""
    metrics, per_example, num_tokens, _ = _forward(
        options, logits, targets, offsets, reference_logp, desirable, kl_policy_logp,
        kl_reference_logp, kl_num_tokens)
    return metrics[0], _outputs(metrics, per_example, num_tokens)


def _kto_loss_fwd(logits, targets, offsets, reference_logp, desirable, kl_policy_logp,
                  kl_reference_logp, kl_num_tokens, options):
    metrics, per_example, num_tokens, row_lse = _forward(
        options, logits, targets, offsets, reference_logp, desirable, kl_policy_logp,
        kl_reference_logp, kl_num_tokens)
    residuals = (logits, targets, offsets, row_lse, per_example[4], num_tokens)
    return (metrics[0], _outputs(metrics, per_example, num_tokens)), residuals


def _kto_loss_bwd(options, residuals, cotangents):
    logits, targets, offsets, row_lse, grad_logp, num_tokens = residuals
    loss_cotangent = jnp.asarray(cotangents[0], jnp.float32).reshape(1)
    call = jax.ffi.ffi_call(
        "kto_step_backward",
        jax.ShapeDtypeStruct(logits.shape, logits.dtype),
        vmap_method="sequential",
    )
    dlogits = call(
        logits,
        _ints(targets),
        _ints(offsets),
        row_lse,
        grad_logp,
        num_tokens,
        loss_cotangent,
        average=bool(options.average_log_prob),
        ignore_index=np.int64(options.ignore_index),
    )
    # Only the policy logits are differentiable; the rest get no cotangent.
    return (dlogits, None, None, None, None, None, None, None)


kto_loss.defvjp(_kto_loss_fwd, _kto_loss_bwd)
