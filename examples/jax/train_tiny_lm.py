"""Train a tiny causal LM in JAX with KTO from binary feedback, through the fused-linear head.

The model: 8 tokens, an embedding, one tanh layer and an lm_head, in plain JAX (no Flax,
no optax: a few lines of Adam below). A frozen reference copy samples completions of six
tokens after a one-token prompt; a rule labels each desirable (no token repeated back to
back) or undesirable, and no other signal is given. The reference model likes repeats,
so few samples are desirable; the dataset is cut to 1 desirable : 4 undesirable and
weighted λ_D = 4, λ_U = 1 (the paper's band, λ_D n_D / (λ_U n_U) = 1).

Each step takes 16 target examples and a KL batch of 16 mismatched (prompt, completion)
pairs (completions rotated by one, as TRL builds them) and calls
kto_jax.fused_linear_kto_loss on the last hidden states and the lm_head weight: the
logits are never materialised, and jax.grad flows from the loss through dH and dW into
every parameter. The reference log-probs, and the KL batch's under the policy (forward
only), come from kto_jax.fused_linear_logprobs. The
desirable rate of the policy's own samples is printed before, during and after training.

    python examples/jax/train_tiny_lm.py [--steps 150] [--seed 0]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import kto_jax

VOCAB, DIM, COMPLETION = 8, 16, 6


def init_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    eye = jnp.eye(VOCAB, DIM, dtype=jnp.float32)
    return {
        "embed": 2.0 * eye + 0.1 * jax.random.normal(k1, (VOCAB, DIM), jnp.float32),
        "layer": jnp.eye(DIM, dtype=jnp.float32)
        + 0.1 * jax.random.normal(k2, (DIM, DIM), jnp.float32),
        "lm_head": 1.6 * eye + 0.1 * jax.random.normal(k3, (VOCAB, DIM), jnp.float32),  # repeats
    }


def hidden_states(params, tokens):
    """Last hidden states [..., T, DIM] of the inputs tokens[..., :-1] (causal: each position
    sees its own token; the model is a bigram model with a nonlinearity)."""
    return jnp.tanh(params["embed"][tokens[..., :-1]] @ params["layer"])


def sample(params, key, prompts):
    """Completions of COMPLETION tokens after each prompt token: [n, 1 + COMPLETION]."""
    tokens = [prompts]
    for _ in range(COMPLETION):
        key, sub = jax.random.split(key)
        h = jnp.tanh(params["embed"][tokens[-1]] @ params["layer"])
        tokens.append(jax.random.categorical(sub, h @ params["lm_head"].T))
    return jnp.stack(tokens, axis=1)


def is_desirable(tokens):
    return np.all(tokens[:, 1:] != tokens[:, :-1], axis=1)


def desirable_rate(params, key, n=2000):
    k1, k2 = jax.random.split(key)
    prompts = jax.random.randint(k1, (n,), 0, VOCAB)
    return float(is_desirable(np.asarray(sample(params, k2, prompts))).mean())


def sequence_logprobs(params, tokens):
    """Forward-only log-probs of every completion under `params` (the reference model)."""
    h = hidden_states(params, tokens)
    logp, _ = kto_jax.fused_linear_logprobs(h, params["lm_head"], tokens[:, 1:])
    return logp


def adam(lr=0.05, b1=0.9, b2=0.999, eps=1e-8):
    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return (zeros, zeros, 0)

    def update(grads, state, params):
        m, v, t = state
        t += 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
        def step(p, m, v):
            return p - lr * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)

        return jax.tree.map(step, params, m, v), (m, v, t)

    return init, update


def train(steps=150, seed=0, batch=16, log_every=25, verbose=True):
    """Trains; returns (desirable rate before, after)."""
    say = print if verbose else (lambda *a, **k: None)
    key = jax.random.PRNGKey(seed)
    key, k_init, k_data, k_prompts = jax.random.split(key, 4)
    reference = init_params(k_init)
    params = jax.tree.map(jnp.copy, reference)

    # The binary-feedback dataset, sampled once from the reference model.
    prompts = jax.random.randint(k_prompts, (6000,), 0, VOCAB)
    data = np.asarray(sample(reference, k_data, prompts))
    label = is_desirable(data)
    good, bad = data[label], data[~label]
    n_good = min(len(good), len(bad) // 4)
    good, bad = good[:n_good], bad[: 4 * n_good]
    options = kto_jax.KTOOptions(beta=0.5, desirable_weight=4.0, undesirable_weight=1.0)
    say(f"dataset: {len(good)} desirable, {len(bad)} undesirable (1:4); "
        f"lambda_D={options.desirable_weight} lambda_U={options.undesirable_weight}")

    def loss_fn(params, tokens, desirable, ref_logp, kl_logp, kl_ref_logp):
        return kto_jax.fused_linear_kto_loss(
            hidden_states(params, tokens), params["lm_head"], tokens[:, 1:], None, ref_logp,
            desirable, options=options, kl_policy_logp=kl_logp, kl_reference_logp=kl_ref_logp)

    opt_init, opt_update = adam()

    @jax.jit
    def step(params, opt_state, tokens, desirable):
        # KL batch: each prompt with the next example's completion (TRL's rotation).
        kl_tokens = jnp.concatenate([tokens[:, :1], jnp.roll(tokens[:, 1:], 1, axis=0)], axis=1)
        ref_logp = sequence_logprobs(reference, tokens)
        kl_ref_logp = sequence_logprobs(reference, kl_tokens)
        # The KL batch under the policy, forward only: it estimates z0, never gets a gradient.
        kl_logp = sequence_logprobs(jax.lax.stop_gradient(params), kl_tokens)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, tokens, desirable, ref_logp, kl_logp, kl_ref_logp)
        params, opt_state = opt_update(grads, opt_state, params)
        return params, opt_state, loss, metrics

    rate_before = desirable_rate(params, jax.random.PRNGKey(99))
    say(f"desirable rate before training: {rate_before:.3f}")
    opt_state = opt_init(params)
    rng = np.random.default_rng(seed)
    everything = np.concatenate([good, bad])
    labels = np.concatenate([np.ones(len(good), np.uint8), np.zeros(len(bad), np.uint8)])
    for i in range(1, steps + 1):
        pick = rng.choice(len(everything), size=batch, replace=False)
        params, opt_state, loss, metrics = step(params, opt_state, everything[pick], labels[pick])
        if verbose and (i % log_every == 0 or i == steps):
            say(f"step {i:4d}/{steps}  loss {float(loss):.4f}  z0 {float(metrics['kl']):.4f}  "
                f"rewards/chosen {float(metrics['rewards/chosen']):+.3f}  "
                f"desirable rate {desirable_rate(params, jax.random.PRNGKey(1000 + i), 1000):.3f}")
    rate_after = desirable_rate(params, jax.random.PRNGKey(99))
    say(f"desirable rate after training:  {rate_after:.3f} (before {rate_before:.3f})")
    return rate_before, rate_after


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train(args.steps, args.seed)


if __name__ == "__main__":
    main()
