"""`TrainState`: everything that changes during training, as one pytree of arrays.

Parameters are a pure-dict tree (`nnx.split` of the policy, so jitted code sees arrays only);
the model's graph definition lives outside the state. `rng` holds raw key data (uint32) so the
whole state saves and restores with orbax like any array tree. Randomness of step `s` is
`fold_in(rng, s)`: nothing random depends on how many steps ran in this process, which is
what makes a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gtpo_jax.config import OptimSection
from gtpo_jax.models.lora import split_trainable


class TrainState(NamedTuple):
    params: Any  # pure-dict tree of the policy's parameters (with LoRA: frozen base + trained adapters)
    opt_state: Any
    step: jax.Array  # RL steps completed (int32 scalar)
    rng: jax.Array  # raw key data (uint32)
    skipped: jax.Array  # updates skipped for a non-finite gradient (int32 scalar)

    def key(self, *path: int) -> jax.Array:
        """The key for (step, *path): a pure function of the state's seed and the step."""
        key = jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
        for p in path:
            key = jax.random.fold_in(key, p)
        return key


def make_optimizer(
    cfg: OptimSection, total_steps: int, learning_rate: float | None = None, *, updates_per_step: int = 1
) -> optax.GradientTransformation:
    """AdamW with linear warm-up, constant or cosine decay, and global-norm clipping.

    `total_steps` counts optimiser updates; `cfg.warmup_steps` counts RL steps of
    `updates_per_step` updates each (ppo_epochs x mini_batches), as DAPO's recipe does."""
    schedule = make_schedule(cfg, total_steps, learning_rate, updates_per_step=updates_per_step)
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def make_schedule(
    cfg: OptimSection, total_steps: int, learning_rate: float | None = None, *, updates_per_step: int = 1
) -> optax.Schedule:
    """Learning rate as a function of the optimiser update count (see `make_optimizer`)."""
    peak = cfg.learning_rate if learning_rate is None else learning_rate
    warmup = min(cfg.warmup_steps * updates_per_step, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(total_steps, warmup + 1))
    if not warmup:
        return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


def init_state(
    params: Any, optimizer: optax.GradientTransformation, seed: int, *, mesh: Mesh | None = None
) -> TrainState:
    """A fresh state. On a `mesh`, every leaf lives on it (scalars and leaves not yet placed are
    replicated), so restored checkpoints and jitted calls never mix single-device and mesh arrays."""
    state = TrainState(
        params=params,
        opt_state=optimizer.init(split_trainable(params)[0]),  # with LoRA: the adapters' state only
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=jnp.zeros((), jnp.int32),
    )
    if mesh is None:
        return state
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), state)
