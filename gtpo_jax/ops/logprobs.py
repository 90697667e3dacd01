"""Token log-probs and full-vocabulary entropy without materialising `[tokens, vocab]` logits.

The entropy is the `H_{i,t}` that GTPO's shaped token rewards (Eq. 3, 5) and GRPO-S's mean
response entropy (Eq. 9) read: the full next-token distribution's Shannon entropy under the
sampling policy, from the same pass as the old log-probs (docs/algorithms.md, "Notation").

For final hidden states `h` (`[N, d]`) and the unembedding `W` (`[d, V]`), with logits
`z = h W / temperature`:

    logp_n    = z_{n, y_n} - logsumexp_v z_{n, v}
    entropy_n = logsumexp_v z_{n, v} - sum_v p_{n, v} z_{n, v}       (= -sum_v p log p)
              = log s - (sum_v e_v (z_v - m)) / s,     e_v = exp(z_v - m),  s = sum_v e_v

Forward: tokens are processed in chunks of `token_chunk` rows; for each, the vocabulary is
streamed in chunks of `vocab_chunk` columns with an online (running-max) logsumexp that also
accumulates `sum exp(z - m) * (z - m)` and the target logit. The entropy is formed from the
max-shifted sum, never as `lse - E[z]`: at logit scales of 30-50 those two are large and
nearly equal, and their float32 difference loses ~1e-5 (tests/test_logprobs.py checks <= 1e-6
against float64). Only one `[token_chunk, vocab_chunk]`
float32 block exists at a time; matmuls accumulate in float32 whatever the input dtype
(float64 inputs are computed in float64, for exact gradient checks).

Backward (custom VJP): with cotangents `g_logp`, `g_ent`, the logit gradient is

    dL/dz_k = g_logp * (1[k = y] - p_k) - g_ent * p_k * (log p_k + H)

(the entropy term from dH/dz_k = -p_k (log p_k + H)); blocks of `z` are recomputed from `h`
and `W` (one extra matmul instead of storing `[N, V]`), and `dh`, `dW` are accumulated block
by block, `dW` one vocabulary chunk at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _pad_to(x: Array, axis: int, multiple: int) -> Array:
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _blocks(h: Array, w: Array, targets: Array, token_chunk: int, vocab_chunk: int):
    """Padded operands reshaped into chunks: h [nt, tc, d], w [nv, d, vc], targets [nt, tc]."""
    tc, vc = min(token_chunk, h.shape[0]), min(vocab_chunk, w.shape[1])
    hb = _pad_to(h, 0, tc).reshape(-1, tc, h.shape[1])
    yb = _pad_to(targets, 0, tc).reshape(-1, tc)
    wb = _pad_to(w, 1, vc).reshape(w.shape[0], -1, vc).transpose(1, 0, 2)
    return hb, wb, yb, tc, vc


def _acc_dtype(*xs: Array) -> jnp.dtype:
    """float32, or float64 when an input is float64 (for exact gradient checks)."""
    return jnp.result_type(*xs, jnp.float32)


def _logit_block(h_c: Array, w_v: Array, v: Array, vc: int, vocab: int, temperature: float) -> tuple[Array, Array]:
    """`[tc, vc]` logits (float32 or wider) of vocabulary chunk `v`, and which columns are real."""
    z = jnp.dot(h_c, w_v, preferred_element_type=_acc_dtype(h_c, w_v)) / temperature
    cols = v * vc + jnp.arange(vc)
    return z, cols < vocab


def _forward(h, w, targets, temperature, token_chunk, vocab_chunk):
    N, V = h.shape[0], w.shape[1]
    hb, wb, yb, tc, vc = _blocks(h, w, targets, token_chunk, vocab_chunk)

    def per_token_chunk(_, xs):
        h_c, y_c = xs

        def per_vocab_chunk(carry, v):
            m, s, t, zy = carry  # t = sum e * (z - m), relative to the running max m
            z, real = _logit_block(h_c, wb[v], v, vc, V, temperature)
            z_masked = jnp.where(real, z, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(z_masked, axis=-1))
            scale = jnp.exp(m - m_new)
            shifted = jnp.where(real, z - m_new[:, None], 0.0)
            e = jnp.where(real, jnp.exp(shifted), 0.0)
            # Re-base the old sum from m to m_new: sum e_old (z - m_new) = t + s (m - m_new).
            rebased = jnp.where(s > 0, t + s * (m - m_new), 0.0)
            s = s * scale + jnp.sum(e, axis=-1)
            t = rebased * scale + jnp.sum(e * shifted, axis=-1)
            zy = zy + jnp.sum(jnp.where(v * vc + jnp.arange(vc) == y_c[:, None], z, 0.0), axis=-1)
            return (m_new, s, t, zy), None

        acc = _acc_dtype(h, w)
        init = (jnp.full((tc,), -jnp.inf, acc), *(jnp.zeros((tc,), acc) for _ in range(3)))
        (m, s, t, zy), _ = jax.lax.scan(per_vocab_chunk, init, jnp.arange(wb.shape[0]))
        log_s = jnp.log(s)
        return None, (zy - (m + log_s), log_s - t / s, m + log_s)

    _, (logp, ent, lse) = jax.lax.scan(per_token_chunk, None, (hb, yb))
    return logp.reshape(-1)[:N], ent.reshape(-1)[:N], lse.reshape(-1)[:N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _logprobs_entropy(h, w, targets, temperature, token_chunk, vocab_chunk):
    logp, ent, _ = _forward(h, w, targets, temperature, token_chunk, vocab_chunk)
    return logp, ent


def _fwd(h, w, targets, temperature, token_chunk, vocab_chunk):
    logp, ent, lse = _forward(h, w, targets, temperature, token_chunk, vocab_chunk)
    return (logp, ent), (h, w, targets, lse, ent)


def _bwd(temperature, token_chunk, vocab_chunk, residuals, cotangents):
    h, w, targets, lse, ent = residuals
    acc = _acc_dtype(h, w)
    g_logp, g_ent = (c.astype(acc) for c in cotangents)
    N, V = h.shape[0], w.shape[1]
    hb, wb, yb, tc, vc = _blocks(h, w, targets, token_chunk, vocab_chunk)
    lse_b, ent_b, gl_b, ge_b = (_pad_to(x, 0, tc).reshape(-1, tc) for x in (lse, ent, g_logp, g_ent))

    def per_vocab_chunk(dh, v):
        def per_token_chunk(dw_v, xs):
            h_c, y_c, lse_c, ent_c, gl_c, ge_c = xs
            z, real = _logit_block(h_c, wb[v], v, vc, V, temperature)
            logp_all = z - lse_c[:, None]
            p = jnp.where(real, jnp.exp(logp_all), 0.0)
            onehot = (v * vc + jnp.arange(vc)) == y_c[:, None]
            dz = gl_c[:, None] * (onehot - p) - ge_c[:, None] * jnp.where(real, p * (logp_all + ent_c[:, None]), 0.0)
            dz = dz / temperature
            dh_c = jnp.dot(dz, wb[v].T.astype(acc), preferred_element_type=acc)
            dw_v = dw_v + jnp.dot(h_c.T.astype(acc), dz, preferred_element_type=acc)
            return dw_v, dh_c

        dw_v, dh_blocks = jax.lax.scan(
            per_token_chunk, jnp.zeros((w.shape[0], vc), acc), (hb, yb, lse_b, ent_b, gl_b, ge_b)
        )
        return dh + dh_blocks, dw_v

    dh, dw = jax.lax.scan(per_vocab_chunk, jnp.zeros(hb.shape, acc), jnp.arange(wb.shape[0]))
    dh = dh.reshape(-1, h.shape[1])[:N].astype(h.dtype)
    dw = dw.transpose(1, 0, 2).reshape(w.shape[0], -1)[:, :V].astype(w.dtype)
    return dh, dw, None


_logprobs_entropy.defvjp(_fwd, _bwd)


def token_logprobs_and_entropy(
    hidden: Float[Array, "... d"],
    unembedding: Float[Array, "d V"],
    targets: Int[Array, "..."],
    *,
    temperature: float = 1.0,
    token_chunk: int = 1024,
    vocab_chunk: int = 16384,
) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """Log-prob of each target token and the full-vocabulary entropy, both float32, at `temperature`.

    Peak extra memory is about `token_chunk * vocab_chunk * 4` bytes per live block instead of
    `N * V * 4`. Differentiable w.r.t. `hidden` and `unembedding` (not `targets`).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r}: log-probs need a temperature > 0")
    if token_chunk <= 0 or vocab_chunk <= 0:
        raise ValueError(f"token_chunk={token_chunk}, vocab_chunk={vocab_chunk}: both must be > 0")
    batch_shape = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).astype(jnp.int32)
    logp, ent = _logprobs_entropy(h, unembedding, y, float(temperature), int(token_chunk), int(vocab_chunk))
    return logp.reshape(batch_shape), ent.reshape(batch_shape)


def dense_logprobs_and_entropy(
    hidden: Float[Array, "... d"],
    unembedding: Float[Array, "d V"],
    targets: Int[Array, "..."],
    *,
    temperature: float = 1.0,
) -> tuple[Array, Array]:
    """Reference: materialises all float32 logits (tests and benchmarks only)."""
    acc = _acc_dtype(hidden, unembedding)
    z = jnp.einsum("...d,dv->...v", hidden, unembedding, preferred_element_type=acc) / temperature
    logp_all = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
