"""The RL loop (docs/architecture.md): the only place with side effects besides the CLIs.

    for step in range(start, steps):
        batch, verdicts = collect(sample -> reward -> dynamic sampling with refill)   host + jit
        old_logp, entropy = score(params) ; ref_logp = score(ref) if kl                jit
        loss batch = prepare(verdicts, masks, log-probs)                                jit
        ppo_epochs x mini_batches: state = update(state, mini-batch)                    jit
        metrics -> JSONL / TensorBoard / console / W&B ; samples every N -> samples.jsonl / W&B
        checkpoint every N, at the end, on SIGTERM

`Trainer` holds what changes (the `TrainState`, the prompt position, the reference policy) and
the run's resources (reward workers, checkpoints, metrics); what does not change is the `Run`
that `training/build.py` builds once.

Stopping (SIGTERM, a TPU preemption) is decided by all processes together, at the same points:
after the rollout (the update is then skipped; the resumed run samples the same rollout again)
and after each step. Every process saves the same step and exits 0. With a KL term, the
reference policy is saved before the step-0 checkpoint, so no preemption can leave a run that
resumes without it.

Randomness of step `s` comes from `fold_in(seed, s)`, the prompt order from the pipeline state
saved in each checkpoint, and rewards are deterministic, so a run that is killed and resumed
produces bit-identical parameters to one that never stopped (tested on CPU).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gtpo_jax.config import Config, check_resume, to_dict
from gtpo_jax.losses import finalize_diagnostics
from gtpo_jax.models.lora import adapters_off, has_adapters
from gtpo_jax.training.build import Run, build, initial_params, load_data, prompt_pipeline, reward_pool
from gtpo_jax.training.checkpoint import Checkpointer, PreemptionGuard
from gtpo_jax.training.collect import GroupBatch, RewardHealthError, Verdicts, check_reward_health, collect
from gtpo_jax.training.evaluation import evaluate
from gtpo_jax.training.metrics import CompileCounter, open_metrics
from gtpo_jax.training.samples import write_samples
from gtpo_jax.training.state import TrainState, init_state
from gtpo_jax.training.update import Groups, response_width, train_on
from gtpo_jax.training.warmup import warm_up

__all__ = ["RewardHealthError", "Trainer", "agreed", "load_data"]

CONSOLE_KEYS = ("sampled_pass_rate", "pass_rate", "entropy_pos", "entropy_neg", "len_mean", "clip_frac_high",
                "grad_norm")  # fmt: skip


def agreed(flag: bool) -> bool:
    """`flag` on any process -> True on every process (a collective: call it at the same point on all)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


@jax.jit
def _drift(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and max |trainer log-prob - sampler log-prob| over response tokens."""
    diff = jnp.where(mask, jnp.abs(old_logp - sampler_logp), 0.0)
    return jnp.sum(diff) / jnp.maximum(jnp.sum(mask), 1), jnp.max(diff)


def _length_stats(batch: GroupBatch, record: dict[str, float], ppo_epochs: int) -> dict[str, float]:
    tokens = float(batch.lengths.sum())
    return {
        "len_mean": float(batch.lengths.mean()),
        "len_max": float(batch.lengths.max()),
        "truncation_rate": float(batch.truncated.mean()),
        "rollout_tokens_per_s": tokens / max(record["rollout_time_s"], 1e-9),
        "update_tokens_per_s": tokens * ppo_epochs / max(record["update_time_s"], 1e-9),
    }


def cropped(rollout: Any, width: int) -> Any:
    """The rollout's `[P, G, T]` arrays cut to their first `width` positions (nothing real lies
    beyond: every response is at most `width` long)."""
    return rollout._replace(
        tokens=rollout.tokens[..., :width], mask=rollout.mask[..., :width], logp=rollout.logp[..., :width]
    )


def loss_inputs(run: Run, params: Any, ref_params: Any, batch: GroupBatch, verdicts: Verdicts):
    """The scoring pass on the batch's own placed prompts and responses, cropped to the length
    bucket of the longest response (`train.length_buckets`), then the loss batch: `(groups, loss
    batch, diagnostics)`, `[P, G, width]`. Only the verdicts cross from the host to the devices."""
    width = response_width(run.cfg, int(batch.lengths.max()))
    run.note_length_bucket(int(batch.prompts.shape[1]), width)
    r = run.place.as_rows(cropped(batch.rollout, width))
    groups = Groups(batch.prompts, batch.prompt_valid, r.tokens, r.mask)
    old_logp, entropy = run.fns.score(params, groups)
    ref_params = kl_reference(run.cfg, params, ref_params)
    ref_logp = run.fns.score(ref_params, groups)[0] if ref_params is not None else None
    verdicts = run.place.put(verdicts.as_tuple())
    loss_batch, diag = run.fns.prepare(verdicts, groups, r.lengths, r.finish_reason, old_logp, entropy, ref_logp)
    drift_mean, drift_max = _drift(old_logp, r.logp, r.mask)
    return (
        groups,
        loss_batch,
        {"logp_drift_mean": float(drift_mean), "logp_drift_max": float(drift_max), **finalize_diagnostics(diag)},
    )


def saved_reference(cfg: Config, params: Any) -> bool:
    """Whether the run keeps a saved KL reference: with a KL term, unless the policy has LoRA
    adapters (its reference is then `kl_reference`'s base with the adapters off)."""
    return cfg.loss.kl_coef > 0 and not has_adapters(params)


def kl_reference(cfg: Config, params: Any, saved: Any) -> Any:
    """The KL reference's parameters: the saved one (None without a KL term) or, for a policy with
    LoRA adapters, its frozen base with the adapters off, made from the current tree
    (adapter-sized zeros beside the base's own arrays): no copy of the weights is kept or saved."""
    return adapters_off(params) if cfg.loss.kl_coef > 0 and has_adapters(params) else saved


def rounds_left(cfg: Config, sampled: int) -> int | None:
    """Sampling rounds of `prompts_per_step x G` responses left in the budget (None: no budget)."""
    t = cfg.train
    if not t.max_sampled_responses:
        return None
    return max(t.max_sampled_responses - sampled, 0) // (t.prompts_per_step * cfg.loss.group_size)


def eval_due(cfg: Config, step: int, record: dict[str, float], rounds_left: int | None) -> bool:
    """Whether a periodic evaluation follows this step: every `eval.every` steps, or when the
    sampled responses pass a multiple of `eval.every_responses`; never at the run's last step (the
    final evaluation covers it)."""
    e = cfg.eval
    if step >= cfg.train.steps or rounds_left == 0:
        return False
    if e.every_responses:
        now = int(record["sampled_responses"])
        before = now - int(record["prompts_sampled"]) * cfg.loss.group_size
        return now // e.every_responses > before // e.every_responses
    return bool(e.every) and step % e.every == 0


def recompiled(step: int, names: list[str]) -> str:
    """The warning for a step after the first that compiled programs again (`CompileCounter.again`)."""
    return (
        f"warning: step {step} compiled again, for new input shapes: {', '.join(names)}; expected once per "
        "prompt or response length bucket (the first use of each is logged at INFO), anything else is a "
        "shape that changes from step to step and recompiles as the run goes on, slowing it"
    )


def _changes(start: dict[str, float], final: dict[str, float], step: int) -> list[str]:
    """`held-out avg@k: a% at the start -> b% after N steps (+c points)` (and greedy pass@1)."""
    keys = [k for k in final if (k.startswith("avg@") or k == "greedy_pass@1") and k in start]
    return [
        f"held-out {k}: {100 * start[k]:.1f}% at the start -> {100 * final[k]:.1f}% after {step} steps "
        f"({100 * (final[k] - start[k]):+.1f} points)"
        for k in keys
    ]


def _prefixed(result: dict[str, float]) -> dict[str, float]:
    return {f"eval/{k}": v for k, v in result.items()}


def _fmt(result: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" if k != "prompts" else f"on {int(v)} prompts" for k, v in result.items())


def _fresh_state(run: Run, params: Any) -> TrainState:
    return init_state(params, run.optimizer, run.cfg.train.seed, mesh=run.mesh)


def train_loop(trainer: Trainer) -> dict[str, Any]:
    """The run: start (or resume), steps until `train.steps`, the sampling budget or a stop, then
    the final evaluation. `Trainer.run` calls it under `jax.set_mesh(mesh)`: the model then pins
    its activations' rows to the batch axes (`models.transformer.shard_rows`) and may take the
    splash attention kernel, the layout `benchmarks/memory_plan.py` plans. The checkpoints, the
    resume and every step run in that one context, so a resumed run stays bit-identical to one
    that never stopped (the step functions are the same programs before and after)."""
    with CompileCounter() as trainer.compiles:
        return _steps(trainer)


def _steps(trainer: Trainer) -> dict[str, Any]:
    trainer._start()
    ran = 0
    with PreemptionGuard() as guard:
        while int(trainer.state.step) < trainer.cfg.train.steps and trainer._rounds_left() != 0:
            record = trainer.step(lambda: agreed(guard.requested))
            ran += record is not None
            why = trainer._after_step(record, ran, guard)
            again = trainer.compiles.again() if record is not None and ran > 1 else []
            if again:
                trainer.metrics.message(recompiled(int(trainer.state.step), again))
            if why:
                step = int(trainer.state.step)
                trainer.metrics.message(f"stopping at step {step} ({why}); resume with the same command")
                return {"stopped_at": step, "start_eval": trainer.meta.get("start_eval", {})}
    return trainer._finish()


class Trainer:
    """One training run of `cfg`: `run()` trains (resuming if asked), `step()` makes one RL step."""

    def __init__(self, cfg: Config, *, mesh: Mesh | None = None, params: Any = None):
        """`params`: the policy to start from (e.g. a shared warm-up's), instead of the config's."""
        self.cfg, self.built = cfg, build(cfg, mesh, train=True)
        self.train_records, self.test_records = load_data(cfg, self.built.encode)
        self.pool = reward_pool(cfg, self.train_records, self.test_records)
        self.pipeline = prompt_pipeline(cfg, self.train_records, self.built.encode)
        directory = f"{cfg.train.run_dir.rstrip('/')}/checkpoints"
        self.checkpointer = Checkpointer(directory, keep=cfg.train.keep_checkpoints)
        self.metrics = open_metrics(cfg)
        self.state = _fresh_state(self.built, initial_params(self.built) if params is None else params)
        self.ref_params = None
        self.compiles = CompileCounter()  # entered by `train_loop`
        # Run facts saved with every checkpoint; `sampled_responses` counts every response generated
        # by completed steps (refills included), for the sampling budget.
        self.meta: dict[str, Any] = {"config": to_dict(cfg), "sampled_responses": 0}

    def save(self) -> None:
        self.checkpointer.save(int(self.state.step), self.state, self.pipeline.get_state(), self.meta)

    def restore(self) -> int | None:
        """Loads the latest checkpoint onto this run's mesh; returns its step, or None if none."""
        step = self.checkpointer.latest_step()
        if step is not None:
            self.state, data_state, meta = self.checkpointer.restore(step, self.state)
            check_resume(meta.get("config", {}), self.meta["config"], self.checkpointer.directory)
            self.metrics.rewind(step)
            self.pipeline.set_state(data_state)
            self.meta.update({k: v for k, v in meta.items() if k != "config"})
        return step

    def warmup(self) -> None:
        params = warm_up(self.built, self.state.params, self.train_records, log=self.metrics.message)
        self.state = _fresh_state(self.built, params)

    def evaluate(self, *, samples: int | None = None, num_prompts: int | None = None) -> dict[str, float]:
        return evaluate(
            self.built, self.state.params, self.pool, self.test_records, samples=samples, num_prompts=num_prompts
        )

    def rollout(self) -> tuple[Any, Groups, Any, dict[str, Any]]:
        """Collects this step's groups and makes the loss batch: `(batch, groups, loss batch, stats)`."""
        b, t0 = self.built, time.time()
        batch, verdicts, stats = collect(
            b, self.state.params, self.pool, self.pipeline, self.state.key(0), max_rounds=self._rounds_left()
        )
        stats["rollout_time_s"] = time.time() - t0
        check_reward_health(stats, batch.first_error, self.cfg.reward, int(self.state.step) + 1)
        groups, loss_batch, diagnostics = loss_inputs(b, self.state.params, self.ref_params, batch, verdicts)
        stats.update(diagnostics)
        return batch, groups, loss_batch, stats

    def update(self, groups: Groups, loss_batch: Any) -> dict[str, float]:
        """`ppo_epochs` x `mini_batches` optimiser steps on one rollout batch (`update.train_on`)."""
        self.state, metrics = train_on(self.built.fns, self.state, groups, loss_batch, self.cfg)
        return metrics

    def step(self, stop_requested: Any = lambda: False) -> dict[str, float] | None:
        """One RL step (rollout, then update); returns its metrics, or None when `stop_requested()`
        (checked by every process together after the rollout) says to stop before the update."""
        t0, data_state = time.time(), self.pipeline.get_state()
        batch, groups, loss_batch, record = self.rollout()
        if stop_requested():  # the rollout is dropped: rewind the prompts it drew, for the resume
            self.pipeline.set_state(data_state)
            return None
        record.update(self.update(groups, loss_batch))
        self.meta["sampled_responses"] += int(record["prompts_sampled"]) * self.cfg.loss.group_size
        record["sampled_responses"] = float(self.meta["sampled_responses"])
        self.state = self.state._replace(step=self.state.step + 1)
        write_samples(self.built, self.metrics, batch, loss_batch, int(self.state.step))
        return record | _length_stats(batch, record, self.cfg.train.ppo_epochs) | {"step_time_s": time.time() - t0}

    def _rounds_left(self) -> int | None:
        return rounds_left(self.cfg, self.meta["sampled_responses"])

    def _start(self) -> None:
        """A fresh run: warm-up, start evaluation, the KL reference, and the step-0 checkpoint (a
        resumed run never repeats the warm-up); or, if a checkpoint exists, the resume."""
        cfg = self.cfg
        resumed = self.restore() if cfg.train.resume == "auto" else None
        if resumed is not None:
            self.metrics.message(f"resumed from step {resumed} ({self.checkpointer.directory})")
            if saved_reference(cfg, self.state.params):
                self.ref_params = self.checkpointer.reference(self.state.params, save=False)
            return
        self.metrics.rewind(-1)
        if cfg.warmup.steps > 0:
            self.warmup()
        self.meta["start_eval"] = self.evaluate()
        self.metrics.message(f"start: held-out {_fmt(self.meta['start_eval'])}")
        if saved_reference(cfg, self.state.params):  # the reference is the policy RL starts from (after
            # any warm-up), saved before step 0's checkpoint: a run with that checkpoint always has it
            self.ref_params = self.checkpointer.reference(self.state.params, save=True)
        self.save()

    def _after_step(self, record: dict[str, float] | None, ran: int, guard: PreemptionGuard) -> str:
        """Evaluates, logs and checkpoints after a step; returns why to stop ("" = go on)."""
        cfg, step = self.cfg, int(self.state.step)
        why = "SIGTERM" if record is None else ""  # preempted after the rollout: no update was made
        if record is not None:
            if eval_due(cfg, step, record, self._rounds_left()):
                record.update(_prefixed(self.evaluate()))
            record["compilations"] = float(len(self.compiles.take()))  # this step's, its evaluation's
            if step % cfg.train.log_every == 0 or step == cfg.train.steps or any(k.startswith("eval/") for k in record):
                self.metrics.write(step, record)
                self.metrics.progress(step, record, CONSOLE_KEYS)
            if agreed(guard.requested):  # every process decides the same, at the same step
                why = "SIGTERM"
            elif cfg.train.stop_after and ran >= cfg.train.stop_after:
                why = "stop_after"
        due = (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or why
        if due and self.checkpointer.latest_step() != step:  # (a stop before step 1's update)
            self.save()
        return why

    def run(self) -> dict[str, Any]:
        """Trains to `train.steps` (resuming if asked) under the run's mesh (`train_loop`); returns
        the start and final evaluations."""
        with jax.set_mesh(self.built.mesh):
            return train_loop(self)

    def _finish(self) -> dict[str, Any]:
        final, step = self.evaluate(), int(self.state.step)
        self.meta["final_eval"] = final
        if self.checkpointer.latest_step() != step:
            self.save()
        self.metrics.write(step, {"sampled_responses": self.meta["sampled_responses"]} | _prefixed(final))
        start = self.meta.get("start_eval", {})
        for line in [f"final: held-out {_fmt(final)}", *_changes(start, final, step)]:
            self.metrics.message(line)
        return {
            "start_eval": start,
            "final_eval": final,
            "skipped_updates": int(self.state.skipped),
            "sampled_responses": self.meta["sampled_responses"],
            "steps": step,
        }

    def close(self) -> None:
        self.pool.close()
        self.checkpointer.close()
        self.metrics.close()
