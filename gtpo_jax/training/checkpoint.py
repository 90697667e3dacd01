"""Checkpoints: orbax `CheckpointManager` holding everything needed to continue bit-for-bit.

Each checkpoint (`run_dir/checkpoints/<step>/`) has three items:

- `state`: the `TrainState` pytree (params, optimiser state, step, rng, skipped-update count),
  saved by all processes cooperatively (each writes its own shards);
- `data`: the prompt pipeline's JSON position (`PromptPipeline.get_state()`);
- `meta`: the resolved config and run facts (start-of-run evaluation, ...), JSON.

Restoring takes an abstract target whose leaves carry the *current* shardings, so a checkpoint
written on one mesh restores onto another (8 devices -> 4 -> 1 is tested).

`PreemptionGuard` turns SIGTERM (what a TPU VM gets before preemption) into a flag; the loop
shares it among processes (`training.loop.agreed`) after the rollout and after each step, so
that every process saves the same step and exits cleanly instead of dying mid-write.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh

from gtpo_jax.models.sharding import ModelDef, param_shardings
from gtpo_jax.training.state import TrainState


def _abstract(tree: Any) -> Any:
    """Shape, dtype and sharding of each leaf: the target a checkpoint is restored into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def abstract_params(model: ModelDef, mesh: Mesh) -> Any:
    """Shape, dtype and sharding of each parameter of `model` on `mesh`: a restore target that
    allocates nothing."""
    shardings = param_shardings(model.abstract, mesh)
    shapes = nnx.to_pure_dict(
        jax.tree.map(
            lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
            model.abstract,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    )
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2):
        # Local paths, or URLs such as gs://bucket/run that every host of a pod slice can reach.
        d = str(directory)
        self.directory = epath.Path(d) if "://" in d else epath.Path(Path(d).absolute())
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state._asdict()),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        logging.info("checkpoint: saved step %d to %s", step, self.directory)

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
        """Restores step `step` into the shapes, dtypes and shardings of `like` (arrays or abstract)."""
        target = _abstract(like._asdict())
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
            ),
        )
        state = TrainState(**restored.state)
        state = state._replace(
            opt_state=jax.tree.unflatten(jax.tree.structure(like.opt_state), jax.tree.leaves(state.opt_state))
        )
        return state, restored.data, restored.meta

    def restore_params(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Only the parameters of step `step` (no optimiser state is read or held), into the shapes,
        dtypes and shardings of `like`, and the checkpoint's meta: what evaluation needs."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": _abstract(like)},
                    restore_args={"params": ocp.checkpoint_utils.construct_restore_args(_abstract(like))},
                    partial_restore=True,
                ),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.state["params"], restored.meta

    def reference(self, params: Any, *, save: bool) -> Any:
        """The KL reference policy, kept once beside the step checkpoints (`<dir>/../reference`):
        written when a run starts (`save`), read back with `params`' shardings when it resumes."""
        path = self.directory.parent / "reference"
        if not save and not path.exists():
            raise FileNotFoundError(
                f"{path}: the KL reference policy of this run is missing (loss.kl_coef > 0). It is written "
                "before the step-0 checkpoint, so it was deleted or the run predates that order; start a new "
                "train.run_dir, or set loss.kl_coef=0"
            )
        with ocp.StandardCheckpointer() as ckptr:
            if save:
                if path.exists():
                    path.rmtree()
                ckptr.save(path, params)
                ckptr.wait_until_finished()
                # A copy: the update donates the policy's buffers (training/update.py).
                return jax.tree.map(jnp.copy, params)
            return ckptr.restore(path, _abstract(params))

    def close(self) -> None:
        self.manager.close()


class PreemptionGuard:
    """Sets `requested` on SIGTERM (and SIGINT when `catch_interrupt`); restores handlers on exit."""

    def __init__(self, catch_interrupt: bool = False):
        self.requested = False
        self._signals = [signal.SIGTERM] + ([signal.SIGINT] if catch_interrupt else [])
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        logging.warning("received signal %d: will checkpoint after the current step and stop", signum)
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
