"""The RL loop (DESIGN.md, "One RL step"): the only place with side effects besides the CLIs.

    for step in range(start, steps):
        groups  = collect(sample -> reward -> dynamic sampling with refill)        host + jit
        old_logp, entropy = score(old params)       ; ref_logp = score(ref) if kl   jit
        loss batch = prepare_batch(advantages, masks)                               jit
        ppo_epochs x mini_batches: state = update(state, groups[mb], batch[mb])     jit
        metrics -> JSONL / TensorBoard / console ; checkpoint every N, at the end, on SIGTERM

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

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from gtpo_jax.config import Config, to_dict
from gtpo_jax.data import tasks
from gtpo_jax.data.pipeline import PipelineConfig, PromptPipeline
from gtpo_jax.data.sources import read_records
from gtpo_jax.data.tokenizer import load_tokenizer
from gtpo_jax.evaluate import evaluate_policy
from gtpo_jax.losses import finalize_diagnostics, merge_diagnostics
from gtpo_jax.models import presets
from gtpo_jax.models.families import family
from gtpo_jax.models.sharding import abstract_model, batch_width, create_sharded, rows_sharding
from gtpo_jax.models.weights import load_hf
from gtpo_jax.parallel.mesh import mesh_from_config
from gtpo_jax.rewards.pool import RewardPool
from gtpo_jax.rewards.registry import check_reward, get_reward
from gtpo_jax.rollout.sampler import Sampler, SamplingConfig
from gtpo_jax.training.checkpoint import Checkpointer, PreemptionGuard
from gtpo_jax.training.collect import collect, render_prompt
from gtpo_jax.training.metrics import MetricsWriter
from gtpo_jax.training.state import TrainState, init_state, make_optimizer
from gtpo_jax.training.update import Groups, StepFns, mini_batch_fn
from gtpo_jax.training.warmup import supervised_warmup

CONSOLE_KEYS = ("sampled_pass_rate", "pass_rate", "entropy_pos", "entropy_neg", "len_mean", "clip_frac_high",
                "grad_norm")  # fmt: skip


class RewardHealthError(RuntimeError):
    """Too many responses of a step have no valid reward: the verifier, not the policy, is failing."""


def agreed(flag: bool) -> bool:
    """`flag` on any process -> True on every process (a collective: call it at the same point on all)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def load_data(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, held-out records) as the config names them."""
    d = cfg.data
    if d.source == "task":
        common = dict(seed=d.seed, difficulty=d.difficulty, prompt_style=d.prompt_style, operations=d.operations)
        return (tasks.generate(d.task, d.num_train, split="train", **common),
                tasks.generate(d.task, d.num_test, split="test", **common))  # fmt: skip
    if not d.path:
        raise ValueError(f"data.source={d.source!r} needs data.path (a file, or the tfds builder name)")
    train = list(read_records(d.source, d.path, d.fields, split="train"))
    test = list(read_records(d.source, d.test_path, d.fields, split="test")) if d.test_path else []
    return train, test


class Trainer:
    """Builds everything a run needs from a `Config`; `run()` trains, `evaluate()` measures."""

    def __init__(self, cfg: Config, *, mesh=None, for_eval: bool = False):
        self.cfg = cfg
        self.mesh = mesh or mesh_from_config(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.dcn_data)
        m, t = cfg.model, cfg.tokenizer
        tok_path = t.path or m.checkpoint
        dtypes = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat)
        if m.checkpoint:
            policy = load_hf(m.checkpoint, mesh=self.mesh, **dtypes)
            model_cfg = policy.cfg
            # The checkpoint's family decides the end-of-turn tokens, wherever the tokenizer lives.
            self.tok = load_tokenizer(t.kind, tok_path, stop_tokens=family(model_cfg.architecture).stop_tokens)
        else:
            self.tok = load_tokenizer(t.kind, tok_path)
            # A randomly initialised model gets exactly the tokenizer's vocabulary.
            model_cfg = presets.get_preset(m.preset, vocab_size=self.tok.vocab_size, **dtypes)
            policy = create_sharded(model_cfg, self.mesh, seed=m.init_seed)
        graphdef, abstract = abstract_model(model_cfg)
        self.model_cfg = model_cfg
        self.train_records, self.test_records = load_data(cfg)
        updates_per_step = cfg.train.ppo_epochs * cfg.train.mini_batches
        self.optimizer = make_optimizer(cfg.optim, cfg.train.steps * updates_per_step,
                                        updates_per_step=updates_per_step)  # fmt: skip
        self.fns = StepFns(graphdef, abstract, cfg.loss, self.optimizer, cfg.rollout.temperature,
                           m.token_chunk, m.vocab_chunk, cfg.train.micro_batches)  # fmt: skip
        self.state = self._init_state(nnx.to_pure_dict(nnx.state(policy)))
        self.sampling = SamplingConfig(
            group_size=cfg.loss.group_size, max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
            stop_token_ids=self.tok.stop_ids, pad_id=self.tok.pad_id, prompt_buckets=cfg.rollout.prompt_buckets,
        )  # fmt: skip
        self.sampler = Sampler(self.sampling)
        self._encoded: dict[str, list[int]] = {}
        self.pipeline = PromptPipeline(
            self.train_records,
            PipelineConfig(batch_size=cfg.train.prompts_per_step, seed=cfg.data.seed,
                           max_prompt_tokens=cfg.data.max_prompt_tokens),
            # Every process walks the same global order and holds the step's records (small text);
            # the rollout itself is split over the processes' devices (training/collect.py).
            prompt_tokens=lambda r: len(self.encode(r)),
        )  # fmt: skip
        r = cfg.reward
        options = {"answer_pattern": r.answer_pattern} if r.answer_pattern else {}
        options |= {k: v for k, v in (("strict", r.strict), ("rel_tol", r.rel_tol)) if v is not None}
        # A reward that cannot work (an option it does not take, records without its field) fails
        # here, naming the field, instead of scoring every response as a failure.
        where = cfg.data.path or f"task {cfg.data.task!r}"
        named = [(f"{where} record {i + 1} (id {x.get('id')})", x) for i, x in enumerate(self.train_records)]
        named += [(f"{cfg.data.test_path or where} held-out record {i + 1} (id {x.get('id')})", x)
                  for i, x in enumerate(self.test_records)]  # fmt: skip
        check_reward(get_reward(r.name), options, named, prefix="reward")
        self.pool = RewardPool(r.name, num_workers=r.num_workers, timeout_s=r.timeout_s, options=options)
        self.checkpointer = Checkpointer(
            f"{cfg.train.run_dir.rstrip('/')}/checkpoints", keep=cfg.train.keep_checkpoints
        )
        self.metrics = None if for_eval else MetricsWriter(cfg.train.run_dir, cfg.train.steps)
        self.score_fn, self.prepare_fn, self.update_fn = (
            self.fns.score_fn(),
            self.fns.prepare_fn(),
            self.fns.update_fn(),
        )
        self.ref_params = None
        self.meta: dict[str, Any] = {"config": to_dict(cfg)}
        # Mini-batch rows are padded to a multiple of the mesh's batch width (and micro_batches),
        # so they stay split over the devices.
        self.batch_width = batch_width(self.mesh)
        n = cfg.train.prompts_per_step // cfg.train.mini_batches
        multiple = int(np.lcm(self.batch_width, cfg.train.micro_batches))
        self.take_mini_batch = mini_batch_fn(self.mesh, n, -(-n // multiple) * multiple)

    # ---- helpers -------------------------------------------------------------------------
    def _init_state(self, params: Any) -> TrainState:
        """A fresh state whose every leaf lives on the mesh (scalars replicated), so restored
        checkpoints and jitted calls never mix single-device and mesh arrays."""
        state = init_state(params, self.optimizer, self.cfg.train.seed)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        on_mesh = lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated)  # noqa: E731
        return jax.tree.map(on_mesh, state)

    def encode(self, record: dict[str, Any]) -> list[int]:
        """Token ids of a record's rendered prompt, cached by prompt text (ids of a training file
        and a held-out file may coincide)."""
        key = record["prompt"]
        if key not in self._encoded:
            t = self.cfg.tokenizer
            text = render_prompt(self.tok, record, template=t.chat_template, system_prompt=t.system_prompt,
                                 suffix=self.cfg.data.prompt_suffix)  # fmt: skip
            self._encoded[key] = self.tok.encode(text)
        return self._encoded[key]

    def _put(self, tree: Any) -> Any:
        """Host arrays (the same on every process) onto the mesh: the leading axis split over the
        batch axes when it divides, else replicated. Each device receives only its slice."""
        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, rows_sharding(self.mesh, x.shape), lambda index: x[index])

        return jax.tree.map(put, tree)

    def log(self, text: str) -> None:
        if self.metrics is not None:
            self.metrics.message(text)
        elif jax.process_index() == 0:
            print(text, flush=True)

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self) -> None:
        step = int(self.state.step)
        self.checkpointer.save(step, self.state, self.pipeline.get_state(), self.meta)

    def restore(self, step: int | None = None, directory: str | None = None) -> int | None:
        """Loads `step` (default: latest) onto this trainer's mesh; returns the step, or None if none."""
        ckpt = Checkpointer(f"{directory.rstrip('/')}/checkpoints") if directory else self.checkpointer
        step = ckpt.latest_step() if step is None else step
        if step is None:
            return None
        self.state, data_state, meta = ckpt.restore(step, self.state)
        self.pipeline.set_state(data_state)
        self.meta.update({k: v for k, v in meta.items() if k != "config"})
        return step

    # ---- phases --------------------------------------------------------------------------
    def warmup(self) -> None:
        w = self.cfg.warmup
        self.log(f"warm-up: {w.steps} supervised steps on reference answers")
        params = supervised_warmup(
            self.fns.model, self.state.params, self.train_records, self.encode, self.tok, w,
            seed=self.cfg.train.seed, width=self.cfg.rollout.max_new_tokens, buckets=self.cfg.rollout.prompt_buckets,
            log=self.log,
        )  # fmt: skip
        self.state = self._init_state(params)

    def evaluate(self, *, samples: int | None = None, num_prompts: int | None = None) -> dict[str, float]:
        e = self.cfg.eval
        samples = 1 if e.temperature == 0 else (samples or e.samples)
        records = self.test_records[: num_prompts or e.num_prompts]
        if not records:
            return {}
        sampling = SamplingConfig(**{**self.sampling.__dict__, "group_size": samples, "temperature": e.temperature})
        key = jax.random.fold_in(jax.random.wrap_key_data(self.state.rng), 1_000_003)  # same prompts, same draws
        return evaluate_policy(self.fns.model(self.state.params), self.tok, self.pool, records, self.encode, key,
                               sampling=sampling, success_threshold=self.cfg.loss.success_threshold,
                               put=self._put, row_multiple=self.batch_width)  # fmt: skip

    def rollout(self) -> tuple[Any, Groups, Any, dict[str, Any]]:
        """Collects this step's groups and makes the loss batch: `(host batch, groups, loss batch, info)`."""
        cfg, t0 = self.cfg, time.time()
        batch, stats = collect(
            self.sampler, self.fns.model(self.state.params), self.tok, self.pool, self.pipeline, self.encode,
            self.state.key(0), num_prompts=cfg.train.prompts_per_step,
            dynamic_sampling=cfg.loss.dynamic_sampling, max_refill_rounds=cfg.rollout.max_refill_rounds,
            success_threshold=cfg.loss.success_threshold, put=self._put, mini_batches=cfg.train.mini_batches,
            mask_truncated=bool(cfg.loss.mask_truncated),
        )  # fmt: skip
        stats["rollout_time_s"] = time.time() - t0
        self._check_reward_health(stats, batch.first_error)
        prompts, valid = self._put(batch.padded_prompts(cfg.rollout.prompt_buckets, self.tok.pad_id))
        groups = Groups(prompts, valid, batch.tokens, batch.mask)
        old_logp, entropy = self.score_fn(self.state.params, groups)
        ref_logp = self.score_fn(self.ref_params, groups)[0] if self.ref_params is not None else None
        rewards, valid, lengths, truncated = self._put((batch.rewards, batch.valid, batch.lengths, batch.truncated))
        loss_batch, batch_diag = self.prepare_fn(rewards, valid, groups, old_logp, entropy, lengths, truncated,
                                                 ref_logp)  # fmt: skip
        drift_mean, drift_max = _drift(old_logp, batch.sampler_logp, batch.mask)
        stats["logp_drift_mean"], stats["logp_drift_max"] = float(drift_mean), float(drift_max)
        stats.update(finalize_diagnostics(batch_diag))
        return batch, groups, loss_batch, stats

    def _check_reward_health(self, stats: dict[str, float], first_error: str) -> None:
        """Logs invalid rewards; stops the run when more than `reward.max_invalid_frac` are invalid."""
        r, rate = self.cfg.reward, stats["reward_invalid_rate"]
        if rate == 0:
            return
        what = (f"{100 * rate:.1f}% of the step's sampled responses have no valid reward (errors "
                f"{100 * stats['reward_error_rate']:.1f}%, timeouts {100 * stats['reward_timeout_rate']:.1f}% at "
                f"reward.timeout_s={r.timeout_s}, crashes {100 * stats['reward_crash_rate']:.1f}%)")  # fmt: skip
        error = f"; first error: {first_error}" if first_error else ""
        if rate > r.max_invalid_frac:
            raise RewardHealthError(
                f"step {int(self.state.step) + 1}: {what}, more than reward.max_invalid_frac={r.max_invalid_frac}. "
                f"The verifier (reward.name={r.name!r}) is failing, not the policy; nothing of this step was "
                f"trained on{error}"
            )
        logging.warning("reward: %s; they are left out of the loss%s", what, error)

    def update(self, groups: Groups, loss_batch: Any) -> dict[str, float]:
        """`ppo_epochs` x `mini_batches` optimiser steps on one rollout batch (groups kept whole).

        A mini-batch without loss tokens takes no step; `empty_updates` counts them."""
        cfg, t0 = self.cfg, time.time()
        n = cfg.train.prompts_per_step // cfg.train.mini_batches
        diag, metrics = None, []
        for _ in range(cfg.train.ppo_epochs):
            for i in range(cfg.train.mini_batches):
                mini = self.take_mini_batch((groups, loss_batch), jnp.int32(i * n))
                self.state, m, d = self.update_fn(self.state, *mini)
                metrics.append(jax.device_get(m))
                diag = d if diag is None else merge_diagnostics(diag, d)
        jax.block_until_ready(self.state.params)
        empty = int(sum(m["empty_update"] for m in metrics))
        trained = [m for m in metrics if not m["empty_update"]]
        if empty:
            logging.warning("%d of %d optimiser updates had no loss tokens and were skipped", empty, len(metrics))
        return {
            **finalize_diagnostics(diag),
            "loss": float(np.mean([float(m["loss"]) for m in trained])) if trained else float("nan"),
            "grad_norm": float(np.mean([float(m["grad_norm"]) for m in trained])) if trained else float("nan"),
            "skipped_updates": float(self.state.skipped),
            "empty_updates": float(empty),
            "update_time_s": time.time() - t0,
        }

    def step(self, stop_requested: Any = lambda: False) -> dict[str, float] | None:
        """One RL step (rollout, then update); returns its metrics, or None when `stop_requested()`
        (checked by every process together after the rollout) says to stop before the update."""
        t0 = time.time()
        data_state = self.pipeline.get_state()
        batch, groups, loss_batch, record = self.rollout()
        if stop_requested():  # the rollout is dropped: rewind the prompts it drew, for the resume
            self.pipeline.set_state(data_state)
            return None
        record.update(self.update(groups, loss_batch))
        self.state = self.state._replace(step=self.state.step + 1)
        tokens = float(batch.lengths.sum())
        record.update({
            "reward": float(batch.rewards.mean()),
            "len_mean": float(batch.lengths.mean()),
            "len_max": float(batch.lengths.max()),
            "truncation_rate": float(batch.truncated.mean()),
            "rollout_tokens_per_s": tokens / max(record["rollout_time_s"], 1e-9),
            "update_tokens_per_s": tokens * self.cfg.train.ppo_epochs / max(record["update_time_s"], 1e-9),
            "step_time_s": time.time() - t0,
        })  # fmt: skip
        return record

    def run(self) -> dict[str, Any]:
        """Trains to `train.steps` (resuming if asked); returns the start and final evaluations."""
        cfg = self.cfg
        resumed = self.restore() if cfg.train.resume == "auto" else None
        if resumed is None:
            if cfg.warmup.steps > 0:
                self.warmup()
            self.meta["start_eval"] = self.evaluate()
            self.log(f"start: held-out {_fmt(self.meta['start_eval'])}")
            if cfg.loss.kl_coef > 0:  # the reference is the policy RL starts from (after any warm-up),
                # saved before step 0's checkpoint: a run with that checkpoint always has its reference
                self.ref_params = self.checkpointer.reference(self.state.params, save=True)
            self.save()  # step 0: a resumed run never repeats the warm-up
        else:
            self.log(f"resumed from step {resumed} ({self.checkpointer.directory})")
            if cfg.loss.kl_coef > 0:
                self.ref_params = self.checkpointer.reference(self.state.params, save=False)
        ran = 0
        with PreemptionGuard() as guard:
            while int(self.state.step) < cfg.train.steps:
                record = self.step(lambda: agreed(guard.requested))
                step = int(self.state.step)
                if record is None:  # preempted after the rollout: the update is not made
                    stop, why = True, "SIGTERM"
                else:
                    ran += 1
                    if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                        record.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                        self.metrics.write(step, record)
                        self.metrics.progress(step, record, CONSOLE_KEYS)
                    signalled = agreed(guard.requested)  # every process decides the same, at the same step
                    stop = signalled or bool(cfg.train.stop_after and ran >= cfg.train.stop_after)
                    why = "SIGTERM" if signalled else "stop_after"
                due = (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or stop
                if due and self.checkpointer.latest_step() != step:  # (a stop before step 1's update)
                    self.save()
                if stop:
                    self.log(f"stopping at step {step} ({why}); resume with the same command")
                    return {"stopped_at": step, "start_eval": self.meta.get("start_eval", {})}
        final = self.evaluate()
        self.meta["final_eval"] = final
        if self.checkpointer.latest_step() != int(self.state.step):
            self.save()
        self.metrics.write(int(self.state.step), {f"eval/{k}": v for k, v in final.items()})
        start = self.meta.get("start_eval", {})
        self.log(f"final: held-out {_fmt(final)}")
        if start:
            key = next(k for k in final if k.startswith("avg@"))
            self.log(f"held-out {key}: {100 * start[key]:.1f}% at the start -> {100 * final[key]:.1f}% after "
                     f"{cfg.train.steps} steps ({100 * (final[key] - start[key]):+.1f} points)")  # fmt: skip
        return {"start_eval": start, "final_eval": final, "skipped_updates": int(self.state.skipped)}

    def close(self) -> None:
        self.pool.close()
        self.checkpointer.close()
        if self.metrics is not None:
            self.metrics.close()


@jax.jit
def _drift(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and max |trainer log-prob - sampler log-prob| over response tokens."""
    diff = jnp.where(mask, jnp.abs(old_logp - sampler_logp), 0.0)
    return jnp.sum(diff) / jnp.maximum(jnp.sum(mask), 1), jnp.max(diff)


def _fmt(result: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" if k != "prompts" else f"on {int(v)} prompts" for k, v in result.items())
