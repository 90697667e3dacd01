"""Optional supervised warm-up: teacher-forced cross-entropy on reference answers before RL.

RL needs a policy that solves part of the task (no signal when every group is all-wrong). For a
randomly initialised model on a built-in task, a short warm-up on `prompt -> answer<eos>` gets
it there inside the run; a record with a reference `solution` (a written-out path, as the `chain`
task's) teaches that instead (`reference_text`). The loss is the mean negative log-prob of the
target tokens, computed by the same chunked scoring op the RL loss uses (`scoring.score` at temperature 1).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gtpo_jax.config import WarmupSection
from gtpo_jax.data.prompts import pad_prompts
from gtpo_jax.data.tokenizer import Tokenizer
from gtpo_jax.models.lora import has_adapters, join, split_trainable
from gtpo_jax.scoring import score
from gtpo_jax.training.build import Run


def reference_text(record: dict[str, Any]) -> str:
    """What the warm-up teaches for `record`: its `solution` when it has one, else its `answer`."""
    return str(record["solution"]) if record.get("solution") else str(record["answer"])


def answer_tokens(tok: Tokenizer, answers: Sequence[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded `answer<eos>` ids `[B, 1, width]` and mask; answers longer than `width` are cut."""
    tokens = np.full((len(answers), 1, width), tok.pad_id, np.int32)
    mask = np.zeros((len(answers), 1, width), bool)
    for i, a in enumerate(answers):
        ids = (tok.encode(a) + ([tok.eos_id] if tok.eos_id is not None else []))[:width]
        tokens[i, 0, : len(ids)] = ids
        mask[i, 0, : len(ids)] = True
    return tokens, mask


def supervised_warmup(
    model_of: Callable[[Any], Any],
    params: Any,
    records: Sequence[dict[str, Any]],
    encode: Callable[[dict[str, Any]], list[int]],
    tok: Tokenizer,
    cfg: WarmupSection,
    *,
    seed: int,
    width: int,
    buckets: Sequence[int],
    log: Callable[[str], None] = print,
) -> Any:
    """Returns `params` after `cfg.steps` AdamW steps on batches of `cfg.batch_size` records."""
    optimizer = optax.adamw(cfg.learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, prompts, valid, tokens, mask):
        def loss_fn(p):
            logp, _ = score(model_of(p), prompts, valid, tokens, mask, temperature=1.0)
            return -jnp.sum(logp) / jnp.maximum(jnp.sum(mask), 1)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    position, start = 0, time.time()
    for i in range(cfg.steps):
        if position + cfg.batch_size > len(order):
            order, position = rng.permutation(len(records)), 0
        batch = [records[j] for j in order[position : position + cfg.batch_size]]
        position += cfg.batch_size
        prompts, valid = pad_prompts([encode(r) for r in batch], buckets, tok.pad_id)
        tokens, mask = answer_tokens(tok, [reference_text(r) for r in batch], width)
        params, opt_state, loss = step(params, opt_state, prompts, valid, tokens, mask)
        if (i + 1) % max(cfg.steps // 5, 1) == 0 or i + 1 == cfg.steps:
            elapsed = time.time() - start
            eta = elapsed / (i + 1) * (cfg.steps - i - 1)
            log(
                f"warm-up {i + 1}/{cfg.steps}: answer cross-entropy {float(loss):.4f}"
                f"  elapsed {elapsed:.0f} s  eta {eta:.0f} s"
            )
    return params


def warm_up(
    run: Run,
    params: Any,
    records: Sequence[dict[str, Any]],
    *,
    steps: int | None = None,
    log: Callable[[str], None] = print,
) -> Any:
    """`supervised_warmup` as the run's config asks (`steps` overrides `warmup.steps`).

    With LoRA adapters it trains the base and leaves the adapters as they are (B = 0): the
    warmed-up base is what RL starts from and what the KL reference (adapters off) is."""
    cfg = run.cfg
    w = cfg.warmup if steps is None else dataclasses.replace(cfg.warmup, steps=steps)
    log(f"warm-up: {w.steps} supervised steps on reference solutions / answers")
    adapters, base = split_trainable(params) if has_adapters(params) else ({}, params)
    return join(
        adapters,
        supervised_warmup(
            lambda p: run.model.merge(join(adapters, p)),
            base,
            records,
            run.encode,
            run.tok,
            w,
            seed=cfg.train.seed,
            width=cfg.rollout.max_new_tokens,
            buckets=cfg.rollout.prompt_buckets,
            log=log,
        ),
    )
