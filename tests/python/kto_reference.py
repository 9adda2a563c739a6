"""The float64 reference of the KTO loss for the Python tests, and the tolerance rule they
compare with (the Python twin of tests/cpp/support.hpp; docs/math.md §7).

Tolerance rule
--------------
A quantity computed with accumulation type Acc is compared with the float64 reference of the
*upcast* inputs as

    |got − want| ≤ rtol(Acc) · max(|want|, scale)                      (assert_close_by_rule)

with rtol = RTOL_FP32 = 1e-5 for fp32 accumulation (≈ 168 units of fp32 roundoff
u = 2^-24) and RTOL_FP64 = 1e-12 for fp64, where `scale` is the magnitude the quantity was
computed from: Σ|terms| for a sum, never the (possibly cancelled) result. It is a
condition-number bound, not a number tuned until a test passes. Two fp32 computations of one
quantity (TRL's and kto's; one process and two) are each held to the rule against the
reference, or, where no float64 reference exists (parameter gradients), to each other at
twice the bound (assert_pair_close_by_rule). A value rounded to a narrower type T on the way
(a bf16 logit, a bf16 gradient) adds u_T (UNIT_ROUNDOFF) times the magnitude of what was
rounded, carried to the quantity by its first-order sensitivity.

Why rtol = 1e-5 covers summation order (SIMD width, ISA, thread count). A sum of n fp32 terms
computed in *any* order — serially, in L SIMD lanes or T threads that each sum a part and then
combine, pairwise — has error at most γ_{n−1} Σ|x_i| ≈ (n − 1) u Σ|x_i|, because each term
passes through at most n − 1 roundings (Higham, Accuracy and Stability of Numerical
Algorithms, §4.2; a dot product of n terms: γ_n). Two implementations that differ only in
order (torch's AVX2 and AVX-512 kernels, one thread or sixteen, TRL's chunked head and kto's)
therefore differ by at most 2(n − 1) u Σ|x_i| ≤ rtol · Σ|x_i| for every n ≤ 84, whatever the
two orders are. A blocked order (L lanes of n/L terms, then a tree) has the smaller bound
(n/L + log2 L) u, so vectorised code on both sides is covered for far longer sums (≈ 600 terms
at L = 8). For terms of one sign Σ|x_i| = |Σ x_i| and the bound is relative to the result; for
mixed signs it is relative to Σ|x_i|, which is why every scale below is a sum of magnitudes.
Longer sums (a 50k vocabulary) are covered in practice, where reordering errors grow like
√n u, not by the worst case. The sums in the TRL tests: a vocabulary's exponentials (V ≤ 50),
a sequence's tokens (≤ 12), a logit's dot product (hidden size 32), a batch's sequences (≤ 16).

Scales (module functions; all computed from the batch in float64 — what the tests can see):
* a token (row r, target t, logits z, p = softmax(z), lse = log Σ_v e^{z_v}) [token_scales]:
  ℓ_r = z_t − lse_r: |ℓ_r| + |lse_r| (z_t = ℓ_r + lse_r and lse_r are what it is computed
  from). Where the logits are a product z_v = h·W_v + b_v of n = D (+1) terms that each side
  computes in its own order (the lm_head GEMM; TRL's chunked head, kto's fused head), the two
  logits differ by at most 2γ_n P_v, P_v = Σ_d |h_d W_vd| + |b_v|, which reaches ℓ_r through
  ∂ℓ_r/∂z_v = 1[v = t] − p_v: the token adds (2γ_n / rtol) Σ_v |1[v = t] − p_v| P_v.
  Entropy H_r = lse_r − Σ_v p_v z_v: 1 + |lse_r| + Σ_v p_v|z_v| (+ the same product term
  through ∂H/∂z_v = −p_v (z_v − Σ p z)). Mean logit Σ_v z_v / V: Σ_v |z_v| / V (+ Σ_v P_v / V).
* logp_s = Σ_r ℓ_r over the scored rows [sequence_scale]: S_s = 1 + Σ_r scale(ℓ_r), the 1
  for the log of the exponentials' sum, whose rounding is absolute (as tests/cpp/compare.hpp);
  divided by n_s with the average option.
* ρ_s = logp_s − ref_s: S_ρ,s = S_s + S_ref,s, the reference model's S (or |ref_s| where the
  reference log-prob is given to both sides, precomputed). A reward βρ_s: β S_ρ,s.
* z0 = max(0, mean_j ρ_j over the KL batch): S_z0 = the mean of the KL pairs' S_ρ (a mean's
  error is at most the mean of its terms' errors; the clamp is 1-Lipschitz).
* TRL's means over sequences (rewards/*, logps/*) and tokens (entropy, logits/*): the mean of
  their terms' scales; rewards/margins = chosen − rejected: the sum of the two.
* the loss, Σ_s λ_s f(u_s) / B with u_s = ±β(ρ_s − z0) [kto_step_scales]: u_s moves by at most
  δu_s = β rtol (S_ρ,s + S_z0), over which f has the Lipschitz constant
  |f'(u_s)| + sup|f''| δu_s (≤ 1/4 for f = 1 − σ or σ); each term's scale is
  λ_s (Lipschitz · β (S_ρ,s + S_z0) + 1), the 1 for f's own rounding (σ is at most 1). An MoE
  model's coef · aux_loss adds coef · |aux_loss| (a sum of products of one sign).
* a parameter gradient [gradient_scale]: G = Σ_s g_s J_s with g_s = ∂L/∂logp_s and
  J_s = ∂logp_s/∂θ, the same network's backward on both sides. g_s = ±λ_s β f'(u_s) / B has
  absolute rounding of scale λ_s β / B (f' is computed from σ and 1 − σ, magnitudes ≤ 1) and
  moves with u_s by |f''| δu_s; the head's ∂ℓ_r/∂z and the backward's sums round relative to
  each sequence's contribution (the C++ rule's |g_s c_r|(1 + |lse_r| + max_v |z_rv|)). Entry
  i's scale is therefore A_i = Σ_s w_s |J_s,i| with
      w_s = |g_s| (1 + max_r (|lse_r| + max_v |z_rv|)) + (λ_s β / B)(1 + |f''| β (S_ρ,s + S_z0))
  (+ |coef ∂aux/∂θ_i| for MoE), J_s computed by one fp32 backward per sequence. |J_s,i|
  stands for |J_s|ᵀ|…|, which assumes no cancellation inside one sequence's backward (the
  network's Jacobian is never formed). Where an entry's exact gradient does cancel (an
  attention key bias: softmax is invariant to a shift shared by all keys), both sides compute
  only the backward's rounding of terms of the size of the model's gradients; a comparison of
  two gradients therefore adds the normwise u · max_j A_j per side
  (assert_gradients_by_rule). The absolute term of w_s is not academic: TRL's fp32
  1 − σ(u) rounds g_s to exactly 0 at |u| ≳ 17, where kto's g_s is ~1e-8. This replaces
  "1e-4 of the largest gradient entry", a normwise number that followed from no rule: what
  rounding allows depends on β, the log-prob scales and how saturated each sequence is.

The reference math follows docs/math.md: token log-probs ℓ_r = z_t − lse_r (never
log(softmax)), sequence sums (or means over the scored rows), the KL reference point
z0 = max(0, S / C), the per-example losses of both loss types and links, TRL's metrics, and
the gradients ∂L/∂logp_s and ∂L/∂Z in closed form. It is torch float64, differentiable where
its inputs are; the tolerance helpers also take numpy and JAX arrays (and work without torch).
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import numpy as np

try:
    import torch
except ImportError:  # the tolerance helpers work without torch (JAX-only environments)
    torch = None

RTOL_FP32 = 1e-5
RTOL_FP64 = 1e-12

# Unit roundoff u_T of a storage type: the largest relative rounding error of one value.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11,
                 "bfloat16": 2.0**-8}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "").split(".")[-1].strip("'>")


def unit_roundoff(dtype) -> float:
    """u_T of a torch, numpy or JAX dtype (or its name)."""
    return UNIT_ROUNDOFF[_dtype_name(dtype)]


def rtol_for(dtype) -> float:
    """rtol of the accumulation type of inputs of `dtype`: fp64 for float64, else fp32."""
    return RTOL_FP64 if _dtype_name(dtype) == "float64" else RTOL_FP32


def gamma(n: int, u: float = UNIT_ROUNDOFF["float32"]) -> float:
    """γ_n = n u / (1 − n u): the worst-case relative error of a sum or dot product of n terms,
    in any order (Higham §3.1)."""
    return n * u / (1 - n * u)


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------

def _f64(x) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def bound_by_rule(want, scale, rtol=RTOL_FP32, extra=0.0) -> np.ndarray:
    """rtol · max(|want|, scale) + extra, elementwise (extra: a narrower type's rounding)."""
    want, scale, extra = _f64(want), _f64(scale), _f64(extra)
    return rtol * np.maximum(np.abs(want), scale) + extra


def error_ratio(got, want, scale, rtol=RTOL_FP32, extra=0.0) -> float:
    """max |got − want| / bound: ≤ 1 passes the rule (how much of its bound a result uses)."""
    got, want = _f64(got), _f64(want)
    err = np.abs(got - want)
    if err.size == 0:
        return 0.0
    bound = bound_by_rule(want, scale, rtol, extra)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / bound)
    return float(np.max(np.where(np.isnan(ratio), np.inf, ratio)))


def assert_close_by_rule(got, want, scale, rtol=RTOL_FP32, extra=0.0, what=""):
    """|got − want| ≤ rtol · max(|want|, scale) + extra, elementwise (equal values, infinities
    included, always pass), with a message that names the worst element, its bound and the
    scale it came from."""
    g, w, s, e = _f64(got), _f64(want), _f64(scale), _f64(extra)
    shape = np.broadcast_shapes(g.shape, w.shape, s.shape, e.shape)
    g, w, s = (np.broadcast_to(x, shape) for x in (g, w, s))
    bound = np.broadcast_to(bound_by_rule(w, s, rtol, e), shape)
    with np.errstate(invalid="ignore"):
        err = np.abs(g - w)
        ok = (g == w) | (err <= bound)
    if not bool(np.all(ok)):
        excess = np.where(ok, -np.inf, np.nan_to_num(err - bound, nan=np.inf))
        i = np.unravel_index(int(np.argmax(excess)), shape)
        raise AssertionError(
            f"{what or 'value'}{list(i) if shape else ''}: got {g[i]!r}, want {w[i]!r}, "
            f"|error| {err[i]:.3e} > bound {bound[i]:.3e} = rtol {rtol:g} · max(|want|, "
            f"scale {s[i]:.4g}) + extra ({int((~ok).sum())} of {ok.size} outside the rule)")


def assert_pair_close_by_rule(a, b, scale, rtol=RTOL_FP32, extra=0.0, what=""):
    """Two computations, each held to the rule against the same (unformed) reference, may
    differ by twice its bound."""
    assert_close_by_rule(a, b, 2.0 * _f64(scale), rtol, 2.0 * _f64(extra), what)


# ---------------------------------------------------------------------------------------------
# The float64 reference (torch)
# ---------------------------------------------------------------------------------------------

def as_float64(x):
    """x as a float64 tensor; autograd flows through the cast."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def token_logprobs(logits, targets, ignore_index=-100):
    """(ℓ, lse, scored): ℓ_r = z[t_r] − lse_r on scored rows (0 on ignored ones), for logits
    [..., V] and targets [...] (float64; differentiable w.r.t. the logits)."""
    z = as_float64(logits)
    targets = torch.as_tensor(targets)
    scored = targets != ignore_index
    lse = torch.logsumexp(z, -1)
    picked = z.gather(-1, torch.where(scored, targets, 0).unsqueeze(-1)).squeeze(-1)
    ell = torch.where(scored, picked - lse, torch.zeros((), dtype=torch.float64))
    return ell, lse, scored


def sequence_logprobs(logits, targets, offsets=None, average=False, ignore_index=-100):
    """(logp [B], num_tokens [B]): Σ ℓ_r over each sequence's scored rows (their mean with
    `average`; 0 for a sequence without one). Padded logits [B, T, V] with targets [B, T], or
    packed rows [R, V] with targets [R] and CSR `offsets` [B + 1]."""
    ell, _, scored = token_logprobs(logits, targets, ignore_index)
    if offsets is None:
        logp, n = ell.sum(-1), scored.sum(-1)
    else:
        spans = [(int(offsets[s]), int(offsets[s + 1])) for s in range(len(offsets) - 1)]
        logp = torch.stack([ell[a:b].sum() for a, b in spans]) if spans else ell.new_zeros(0)
        n = torch.tensor([int(scored[a:b].sum()) for a, b in spans], dtype=torch.int64)
    if average:
        logp = torch.where(n > 0, logp / n.clamp(min=1), torch.zeros_like(logp))
    return logp, n


def reference_z0(kl_policy_logp, kl_reference_logp, kl_num_tokens=None, o=None) -> float:
    """The reference point under kto_torch's options `o` (a dict of the op's keywords): 0 for
    apo_zero_unpaired or reference_point "zero", fixed_z0 for "fixed", else the KL estimate
    S / C (C: every KL example, or those with tokens under kl_estimator "nonempty_mean"; 0
    without any), clamped at 0 unless clamp_kl is False. Detached: a float."""
    o = o or {}
    if o.get("loss_type", "kto") == "apo_zero_unpaired" or o.get("reference_point") == "zero":
        return 0.0
    if o.get("reference_point") == "fixed":
        return float(o["fixed_z0"])
    rho = (as_float64(kl_policy_logp) - as_float64(kl_reference_logp)).detach()
    if o.get("kl_estimator", "mean") == "nonempty_mean":
        keep = torch.as_tensor(kl_num_tokens) > 0
    else:
        keep = torch.ones_like(rho, dtype=torch.bool)
    z0 = float(rho[keep].sum() / keep.sum()) if bool(keep.any()) else 0.0
    return max(0.0, z0) if o.get("clamp_kl", True) else z0


# sup |f''| and sup |f'''| of the links: f = 1 − σ (or σ): |σ''| ≤ 1/(6√3), |σ'''| ≤ 1/8;
# f = −log σ: f'' = σ' ≤ 1/4, |f'''| = |σ''| ≤ 1/(6√3).
LINK_BOUNDS = {"one_minus_sigmoid": (1 / (6 * math.sqrt(3)), 1 / 8),
               "neg_log_sigmoid": (1 / 4, 1 / (6 * math.sqrt(3)))}


def kto_loss(logp, reference_logp, desirable, z0=0.0, o=None):
    """The KTO loss under kto_torch's options `o` (beta 0.1, weights 1, loss_type kto, link
    one_minus_sigmoid, reduction mean by default) from per-sequence log-probs (differentiable
    w.r.t. them). Returns a namespace: loss, losses (per example, weighted), rho, reward (βρ),
    u, weight (λ_s), denom (B; 1 for reduction sum), grad_logp (∂loss/∂logp_s in closed form,
    detached), beta, d1 = |f'(u)|, d2 = |f''(u)| of the link f and its bounds f2_max, f3_max."""
    o = o or {}
    beta = float(o.get("beta", 0.1))
    logp = as_float64(logp)
    rho = logp - as_float64(reference_logp)
    d = torch.as_tensor(desirable).to(torch.bool)
    if o.get("loss_type", "kto") == "apo_zero_unpaired":
        z0 = 0.0  # 1 − σ(βρ) desirable, σ(βρ) = 1 − σ(−βρ) undesirable
    one = torch.ones((), dtype=torch.float64)
    sign = torch.where(d, one, -one)
    u = sign * beta * (rho - z0)
    weight = torch.where(d, float(o.get("desirable_weight", 1.0)) * one,
                         float(o.get("undesirable_weight", 1.0)) * one)
    link = o.get("link", "one_minus_sigmoid")
    s_pos, s_neg = torch.sigmoid(u), torch.sigmoid(-u)
    if link == "one_minus_sigmoid":
        f, df = s_neg, -s_pos * s_neg               # f = 1 − σ(u), f' = −σ'(u)
        d2f = s_pos * s_neg * (1 - 2 * s_pos)       # f'' = −σ'' = −σ'(1 − 2σ)
    else:
        f, df = -torch.nn.functional.logsigmoid(u), -s_neg   # f' = −σ(−u)
        d2f = s_pos * s_neg                                  # f'' = σ'(u)
    losses = weight * f
    denom = 1.0 if o.get("reduction", "mean") == "sum" else float(max(logp.shape[0], 1))
    f2_max, f3_max = LINK_BOUNDS[link]
    return SimpleNamespace(loss=losses.sum() / denom, losses=losses, rho=rho,
                           reward=beta * rho, u=u, weight=weight, denom=denom, beta=beta,
                           grad_logp=(weight * df * sign * beta / denom).detach(),
                           d1=df.abs().detach(), d2=d2f.abs().detach(), f2_max=f2_max,
                           f3_max=f3_max)


def logits_gradient(logits, targets, grad_logp, average=False, ignore_index=-100):
    """∂L/∂Z in closed form (docs/math.md) for padded logits [B, T, V]:
    g_s c_r (1[v = t_r] − softmax(Z_r)_v) on scored rows, 0 on ignored ones, c_r = 1 or 1/n_s."""
    z = as_float64(logits).detach()
    targets = torch.as_tensor(targets)
    scored = targets != ignore_index
    p = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(torch.where(scored, targets, 0), z.shape[-1])
    c = torch.ones_like(p[..., 0])
    if average:
        c = c / scored.sum(-1, keepdim=True).clamp(min=1)
    g = as_float64(grad_logp).reshape(-1, *([1] * (z.dim() - 2)))
    return torch.where(scored[..., None], (g * c)[..., None] * (onehot - p),
                       torch.zeros((), dtype=torch.float64))


def token_statistics(logits):
    """Per row: entropy H = lse − Σ p z and the mean logit Σ z / V (float64)."""
    z = as_float64(logits).detach()
    lse = torch.logsumexp(z, -1)
    p = torch.exp(z - lse[..., None])
    return lse - _finite_products(p, z).sum(-1), z.mean(-1)


def trl_metrics(logp, reference_logp, desirable, z0, beta):
    """TRL 1.16's logged KTO metrics (kl, rewards/*, logps/*) from per-sequence log-probs."""
    logp = as_float64(logp).detach()
    rho = logp - as_float64(reference_logp).detach()
    d = torch.as_tensor(desirable).to(torch.bool)
    m = {"kl": float(z0)}
    for side, mask in (("chosen", d), ("rejected", ~d)):
        if bool(mask.any()):
            m[f"rewards/{side}"] = float(beta * rho[mask].mean())
            m[f"logps/{side}"] = float(logp[mask].mean())
    if bool(d.any()) and bool((~d).any()):
        m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
    return m


# ---------------------------------------------------------------------------------------------
# Condition scales
# ---------------------------------------------------------------------------------------------

def _finite_products(a, b):
    """a · b elementwise with 0 · ∞ = 0 (masked vocabulary entries: p = 0 at z = −inf)."""
    return torch.where(a == 0, torch.zeros((), dtype=a.dtype), a * b)


def token_scales(logits, targets, products=None, product_terms=0, rtol=RTOL_FP32,
                 ignore_index=-100):
    """Per-row float64 values and condition scales of logits [..., V] (module docstring):
    ell, lse, scored, entropy, mean_logit and their scales ell_scale, entropy_scale,
    mean_logit_scale; row_factor = |lse| + max_v |z_v| (the gradient's); ell_relative =
    Σ_v |1[v = t] − p_v| |z_v|, the first-order change of ℓ per unit relative rounding of every
    logit (a logit rounded to bf16). `products` [..., V]: P_v = Σ_d |h_d W_vd| + |b_v| where
    each side computes the logits as its own product of `product_terms` terms."""
    with torch.no_grad():
        z = as_float64(logits).detach()
        ell, lse, scored = token_logprobs(z, targets, ignore_index)
        p = torch.exp(z - lse[..., None])
        targets = torch.as_tensor(targets)
        onehot = torch.nn.functional.one_hot(torch.where(scored, targets, 0), z.shape[-1])
        d_ell = (onehot - p).abs()                                   # |∂ℓ/∂z_v|
        za = z.abs()
        mean_pz = _finite_products(p, z).sum(-1)
        out = SimpleNamespace(
            ell=ell, lse=lse, scored=scored, entropy=lse - mean_pz, mean_logit=z.mean(-1),
            ell_scale=ell.abs() + lse.abs(),
            entropy_scale=1 + lse.abs() + _finite_products(p, za).sum(-1),
            mean_logit_scale=za.mean(-1),
            row_factor=lse.abs() + za.amax(-1),
            ell_relative=_finite_products(d_ell, za).sum(-1))
        if products is not None:
            c = 2 * gamma(product_terms) / rtol  # two sides' products, in units of rtol
            P = c * as_float64(products).detach()
            out.ell_scale = out.ell_scale + (d_ell * P).sum(-1)
            out.entropy_scale = out.entropy_scale + _finite_products(
                p, (z - mean_pz[..., None]).abs() * P).sum(-1)
            out.mean_logit_scale = out.mean_logit_scale + P.mean(-1)
        return out


def sequence_scale(tokens, average=False):
    """S_s = 1 + Σ_r scale(ℓ_r) over the scored rows of each sequence of a padded [B, T]
    token_scales (divided by n_s with `average`): the scale of logp_s."""
    s = (tokens.ell_scale * tokens.scored).sum(-1)
    if average:
        s = s / tokens.scored.sum(-1).clamp(min=1)
    return 1.0 + s


def _mean(x, mask=None) -> float:
    x = as_float64(x)
    if mask is not None:
        x = x[torch.as_tensor(mask)]
    return float(x.mean()) if x.numel() else 0.0


def kto_step_scales(policy_scale, reference_scale, desirable, step, kl_scale=0.0,
                    rtol=RTOL_FP32, own_rounding=True):
    """The scales of one KTO step, from the per-sequence scales of the policy's log-probs and
    the reference's ([B]; |ref_logp| where it is given), the KL estimate's (`kl_scale`, the
    mean of the KL pairs' S_ρ; 0 without a KL batch) and the reference step (kto_loss's
    namespace). Returns a namespace: metrics (TRL's names → scale), rho [B] (S_ρ,s) and
    grad_weight [B] (the part of w_s that does not depend on the head's rows). Without
    `own_rounding`, the loss's scale leaves out the link's own rounding (the 1 per term): the
    scales of a perturbation of the log-probs alone (logit_rounding_scales)."""
    rho = as_float64(policy_scale) + as_float64(reference_scale)
    d = torch.as_tensor(desirable).to(torch.bool)
    beta = step.beta
    metrics = {"kl": float(kl_scale)}
    for side, mask in (("chosen", d), ("rejected", ~d)):
        metrics[f"rewards/{side}"] = beta * _mean(rho, mask)
        metrics[f"logps/{side}"] = _mean(policy_scale, mask)
    metrics["rewards/margins"] = metrics["rewards/chosen"] + metrics["rewards/rejected"]
    lam = step.weight
    moved = beta * (rho + kl_scale)                      # β (S_ρ,s + S_z0) = δu_s / rtol
    lipschitz = step.d1 + step.f2_max * rtol * moved     # sup |f'| over u_s ± δu_s
    own = 1.0 if own_rounding else 0.0
    metrics["loss"] = float((lam * (lipschitz * moved + own)).sum() / step.denom)
    curvature = step.d2 + step.f3_max * rtol * moved     # sup |f''| over u_s ± δu_s
    grad_weight = lam * beta / step.denom * (1 + curvature * moved)
    return SimpleNamespace(metrics=metrics, rho=rho, grad_weight=grad_weight)


def gradient_weights(step, scales, row_factor):
    """w_s = |g_s| (1 + max_r (|lse_r| + max_v |z_rv|)) + (λ_s β / B)(1 + |f''| β (S_ρ,s +
    S_z0)): the weight of |∂logp_s/∂θ| in the gradient's scale (module docstring)."""
    return step.grad_logp.abs() * (1 + as_float64(row_factor)) + scales.grad_weight


def gradient_scale(params, logp, weights, extra=()):
    """A_i = Σ_s w_s |∂logp_s/∂θ_i| (+ |∂e/∂θ_i| for each extra scalar e, e.g. coef ·
    aux_loss): one fp32 backward per sequence through `logp` [B] (differentiable w.r.t. the
    parameters). `params`: dict name → parameter. Returns dict name → float64 CPU tensor."""
    names = list(params)
    tensors = [params[n] for n in names]
    total = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    terms = [(logp[s], float(weights[s])) for s in range(logp.shape[0])
             if float(weights[s]) != 0.0 and logp[s].requires_grad]
    terms += [(e, 1.0) for e in extra]
    for k, (scalar, weight) in enumerate(terms):
        grads = torch.autograd.grad(scalar, tensors, retain_graph=k + 1 < len(terms),
                                    allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                total[n] += weight * g.detach().to("cpu", torch.float64).abs()
    return total


# ---------------------------------------------------------------------------------------------
# Models: the head's inputs, and one KTO step of a trainer
# ---------------------------------------------------------------------------------------------

def model_inputs(batch, kl=False):
    """The keyword arguments TRL 1.16's KTOTrainer calls the model with: the batch without
    the loss's own entries; with `kl`, each KL_<name> in place of <name>."""
    loss_keys = {"completion_mask", "label", "ref_logps", "ref_KL_logps"}
    inputs = {k: v for k, v in batch.items() if k not in loss_keys and not k.startswith("KL_")}
    if kl:
        for k, v in batch.items():
            if k.startswith("KL_") and k != "KL_completion_mask":
                inputs[k[len("KL_"):]] = v
    inputs["use_cache"] = False
    return inputs


def head_forward(model, inputs, completion_mask, grad=False, aux_loss=False, products=True):
    """One plain fp32 forward of a causal LM (autocast off), read as TRL's head reads it: the
    logits of the last T positions, shifted, against the completion tokens. Returns a
    namespace: tokens (token_scales; with `products`, the lm_head products P of its input
    hidden states, seen by a hook), logp [B] (float64; differentiable w.r.t. the parameters
    with `grad`), scale [B] (sequence_scale), aux_loss (the MoE load-balancing loss)."""
    head = model.get_output_embeddings()
    seen = []
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    device = next(model.parameters()).device.type
    try:
        with torch.autocast(device, enabled=False), torch.set_grad_enabled(grad):
            out = model(**inputs, **({"output_router_logits": True} if aux_loss else {}))
    finally:
        hook.remove()
    t = inputs["input_ids"].size(1)
    logits = out.logits[:, out.logits.size(1) - t:-1]
    targets = inputs["input_ids"].masked_fill(completion_mask == 0, -100)[:, 1:]
    P, terms = None, 0
    if products:
        hidden = seen[-1].detach()[:, seen[-1].size(1) - t:-1]
        with torch.no_grad():
            P = hidden.double().abs() @ head.weight.detach().double().abs().T
            terms = hidden.shape[-1]
            if getattr(head, "bias", None) is not None:
                P, terms = P + head.bias.detach().double().abs(), terms + 1
    tokens = token_scales(logits, targets, P, terms)
    logp = sequence_logprobs(logits, targets)[0]
    return SimpleNamespace(tokens=tokens, logp=logp if grad else logp.detach(),
                           scale=sequence_scale(tokens), targets=targets,
                           aux_loss=out.aux_loss if aux_loss else None)


def step_reference(policy, reference_logp, reference_scale, desirable, options, z0=0.0,
                   kl_scale=0.0, params=None, aux_coef=0.0):
    """One KTO step's float64 reference and scales from the policy's head_forward (with grad
    where `params`, a dict name → parameter, asks for the gradient's scale), the reference
    log-probs and their scales, the labels, the options (kto_loss's), z0 and its scale.
    Returns a namespace: metrics and scales (TRL's names → value / scale), step (kto_loss's
    namespace), grad_scale (name → A; with `params`)."""
    desirable = torch.as_tensor(desirable, dtype=torch.bool).cpu()
    logp = policy.logp.detach().cpu()
    step = kto_loss(logp, reference_logp, desirable, z0, options)
    sc = kto_step_scales(policy.scale.cpu(), reference_scale, desirable, step, kl_scale)
    metrics = trl_metrics(logp, reference_logp, desirable, z0, step.beta)
    metrics["loss"] = float(step.loss)
    scales = dict(sc.metrics)
    # TRL's token statistics: means over the completion tokens (all; chosen's; rejected's).
    tok = policy.tokens
    scored = tok.scored.cpu()
    metrics["entropy"] = _mean(tok.entropy.cpu(), scored)
    scales["entropy"] = _mean(tok.entropy_scale.cpu(), scored)
    for side, mask in (("chosen", desirable), ("rejected", ~desirable)):
        rows = scored & mask[:, None]
        if bool(rows.any()):
            metrics[f"logits/{side}"] = _mean(tok.mean_logit.cpu(), rows)
            scales[f"logits/{side}"] = _mean(tok.mean_logit_scale.cpu(), rows)
    extra = []
    if policy.aux_loss is not None:
        metrics["aux_loss"] = float(policy.aux_loss.detach())
        scales["aux_loss"] = abs(metrics["aux_loss"])
        metrics["loss"] += aux_coef * metrics["aux_loss"]
        scales["loss"] += aux_coef * scales["aux_loss"]
        extra = [aux_coef * policy.aux_loss] if policy.aux_loss.requires_grad else []
    out = SimpleNamespace(metrics=metrics, scales=scales, step=step, z0=z0, kl_scale=kl_scale,
                          rho_scale=sc.rho, policy=policy, desirable=desirable)
    if params is not None:
        rows = torch.where(scored, tok.row_factor.cpu(), torch.zeros((), dtype=torch.float64))
        weights = gradient_weights(step, sc, rows.amax(-1))
        out.grad_scale = gradient_scale(params, policy.logp, weights, extra)
    return out


def _reference_model(trainer):
    """The reference model of a TRL trainer as its step runs it, and the context to run it in
    (a PEFT policy without a ref_model: its adapter disabled, or TRL's "ref" adapter)."""
    if trainer.ref_model is not None:
        return trainer.ref_model, contextlib.nullcontext()
    from trl.trainer.utils import use_adapter

    model = trainer.accelerator.unwrap_model(trainer.model)
    name = "ref" if "ref" in model.peft_config else None
    return trainer.model, use_adapter(model, adapter_name=name)


def trl_reference(trainer, batch, gradients=True, products=True):
    """The float64 reference of one step of TRL 1.16's KTOTrainer (or the drop-in) on `batch`,
    from the trainer's models (read, not changed) and options, with the condition scale of
    everything it logs (step_reference's namespace; grad_scale over the trainable parameters
    with `gradients`; num_tokens, the batch's attention-mask tokens, is a count: exact)."""
    policy = trainer.model
    options = dict(beta=trainer.beta, desirable_weight=trainer.desirable_weight,
                   undesirable_weight=trainer.undesirable_weight, loss_type=trainer.loss_type)
    aux = bool(getattr(trainer, "aux_loss_enabled", False))
    target = model_inputs(batch)
    pol = head_forward(policy, target, batch["completion_mask"], grad=gradients, aux_loss=aux,
                       products=products)
    kl_scale, z0 = 0.0, 0.0
    with torch.no_grad():
        if trainer.calculate_KL:
            kl_inputs = model_inputs(batch, kl=True)
            pol_kl = head_forward(policy, kl_inputs, batch["KL_completion_mask"],
                                  products=products)
        if trainer.precompute_ref_logps:  # read by both sides: exact
            ref_logp = as_float64(batch["ref_logps"]).cpu()
            ref_scale = ref_logp.abs()
            if trainer.calculate_KL:
                ref_kl_logp = as_float64(batch["ref_KL_logps"]).cpu()
                ref_kl_scale = ref_kl_logp.abs()
        else:
            ref_model, context = _reference_model(trainer)
            with context:
                ref = head_forward(ref_model, target, batch["completion_mask"],
                                   products=products)
                ref_logp, ref_scale = ref.logp.cpu(), ref.scale.cpu()
                if trainer.calculate_KL:
                    ref_kl = head_forward(ref_model, kl_inputs, batch["KL_completion_mask"],
                                          products=products)
                    ref_kl_logp, ref_kl_scale = ref_kl.logp.cpu(), ref_kl.scale.cpu()
        if trainer.calculate_KL:
            z0 = reference_z0(pol_kl.logp.cpu(), ref_kl_logp, o=options)
            kl_scale = _mean(pol_kl.scale.cpu() + ref_kl_scale)
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad} \
        if gradients else None
    out = step_reference(pol, ref_logp, ref_scale, batch["label"], options, z0, kl_scale,
                         params, trainer.router_aux_loss_coef if aux else 0.0)
    out.num_tokens = int(batch["attention_mask"].sum())
    out.heads = dict(policy=pol, policy_kl=pol_kl if trainer.calculate_KL else None,
                     reference=None if trainer.precompute_ref_logps else ref,
                     reference_kl=None if trainer.precompute_ref_logps or not
                     trainer.calculate_KL else ref_kl)
    return out


def logit_rounding_scales(reference):
    """Where one side rounds every logit to a narrower type T (TRL's fused head under bf16
    autocast rounds each logit tile to bf16; kto keeps fp32 logits): |δz_v| ≤ u_T |z_v| moves
    ℓ_r by at most u_T Σ_v |1[v = t] − p_v| |z_v| (token_scales' ell_relative, first order),
    carried through the step as the log-prob scales are. Returns TRL's metric names (kl,
    rewards/*, logps/*, loss) → the factor of u_T in the bound, for a trl_reference of the
    step (with its model-computed reference log-probs)."""
    heads = reference.heads
    assert heads["reference"] is not None, "precomputed reference log-probs: not rounded here"

    def per_sequence(head):
        return (head.tokens.ell_relative * head.tokens.scored).sum(-1).cpu()

    rho = per_sequence(heads["policy"])
    kl = 0.0
    if heads["policy_kl"] is not None:
        kl = _mean(per_sequence(heads["policy_kl"]) + per_sequence(heads["reference_kl"]))
    desirable = torch.as_tensor(reference.desirable, dtype=torch.bool)
    sc = kto_step_scales(rho, per_sequence(heads["reference"]), desirable, reference.step, kl,
                         own_rounding=False)
    return sc.metrics


# The metrics TRL 1.16's KTOTrainer logs that carry a tolerance (num_tokens is a count).
TRL_METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "logps/chosen", "logps/rejected", "entropy", "logits/chosen", "logits/rejected",
               "aux_loss")


def assert_metrics_by_rule(metrics, reference, rtol=RTOL_FP32, who="", keys=TRL_METRICS):
    """Each of TRL's metrics in `metrics` against the float64 reference under the rule, with
    its scale; the same names present on both sides ('loss' is checked where given)."""
    for key in keys:
        if key == "loss" and key not in metrics:
            continue
        assert (key in metrics) == (key in reference.metrics), (who, key)
        if key in metrics:
            assert_close_by_rule(metrics[key], reference.metrics[key], reference.scales[key],
                                 rtol, what=f"{who} {key}".strip())


def assert_gradients_by_rule(got, want, grad_scale, rtol=RTOL_FP32, extra=None, who=""):
    """Two fp32 parameter gradients (dicts name → tensor) against each other: each entry within
    twice rtol · A_i + u · max_j A_j (each side is held to the rule, and no float64 gradient
    is formed; the normwise term is the backward's own rounding where an entry's exact
    gradient cancels, module docstring), plus `extra` (name → bound, as given: rounding that
    the sides add of their own)."""
    assert got.keys() == want.keys(), (who, sorted(set(got) ^ set(want))[:5])
    largest = max((float(grad_scale[n].max()) for n in want if grad_scale[n].numel()),
                  default=0.0)
    normwise = 2.0 * UNIT_ROUNDOFF["float32"] * largest
    for name, w in want.items():
        assert_close_by_rule(got[name], w, 2.0 * _f64(grad_scale[name]), rtol,
                             normwise + (0.0 if extra is None else _f64(extra[name])),
                             what=f"{who} gradient of {name}".strip())
