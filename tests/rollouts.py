"""Random but deterministic rollout batches for the loss tests."""

from __future__ import annotations

import dataclasses

import numpy as np

ALGORITHMS = ("grpo", "dapo", "gtpo", "grpo_s")


@dataclasses.dataclass
class Rollout:
    rewards: np.ndarray  # [P, G] binary
    mask: np.ndarray  # [P, G, T] float 0/1, prefix masks of random lengths
    entropy: np.ndarray  # [P, G, T]
    old_logp: np.ndarray
    logp: np.ndarray
    ref_logp: np.ndarray
    lengths: np.ndarray  # [P, G]

    def loss_inputs(self, *, ref: bool = True) -> dict[str, np.ndarray]:
        """Keyword arguments of `prepare_batch` (without `ref_logp` when `ref` is False)."""
        out = dict(rewards=self.rewards, mask=self.mask, old_logp=self.old_logp, entropy=self.entropy)
        return out | ({"ref_logp": self.ref_logp} if ref else {})

    def with_garbage_padding(self, seed: int = 0) -> Rollout:
        """The same rollout with NaN / inf / huge values in every padded position."""
        rng = np.random.default_rng(seed)
        pad = self.mask == 0
        junk = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 7.0])

        def fill(x):
            y = x.copy()
            y[pad] = rng.choice(junk, size=int(pad.sum()))
            return y

        return dataclasses.replace(
            self,
            entropy=fill(self.entropy),
            old_logp=fill(self.old_logp),
            logp=fill(self.logp),
            ref_logp=fill(self.ref_logp),
        )


def make_rollout(
    seed: int = 0,
    P: int = 4,
    G: int = 6,
    T: int = 9,
    *,
    dtype=np.float32,
    mixed: bool = True,
    log_ratio_scale: float = 0.3,
    empty_response: bool = True,
) -> Rollout:
    """Binary rewards (every group mixed when `mixed`), lengths 1..T (one empty response when
    `empty_response`), entropies in (0, 4), log-ratios of scale `log_ratio_scale`."""
    rng = np.random.default_rng(seed)
    rewards = (rng.random((P, G)) < 0.5).astype(dtype)
    if mixed:
        rewards[:, 0], rewards[:, 1] = 1.0, 0.0
        for p in range(P):
            rewards[p] = rewards[p, rng.permutation(G)]
    lengths = rng.integers(1, T + 1, size=(P, G))
    if empty_response and G > 2:
        # An all-padding response in the first group (it keeps its reward, it has no tokens).
        lengths[0, np.flatnonzero(rewards[0] == rewards[0, 0])[-1]] = 0
    mask = (np.arange(T)[None, None, :] < lengths[..., None]).astype(dtype)
    entropy = rng.uniform(0.05, 4.0, (P, G, T)).astype(dtype)
    old_logp = -rng.uniform(0.05, 3.0, (P, G, T)).astype(dtype)
    logp = (old_logp + log_ratio_scale * rng.standard_normal((P, G, T))).astype(dtype)
    ref_logp = (old_logp + 0.2 * rng.standard_normal((P, G, T))).astype(dtype)
    return Rollout(rewards, mask, entropy, old_logp, logp, ref_logp, lengths)
