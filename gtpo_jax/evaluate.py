"""Evaluate a checkpoint: avg@k and pass@k on held-out prompts, with the training verifiers.

    python -m gtpo_jax.evaluate --config=configs/default.py --checkpoint=runs/default [--step=N]

Builds the run for evaluation only (`training.build.build(train=False)`: no optimizer), reads
only the checkpoint's parameters, and prints one JSON line. The metrics are defined in
`training/evaluation.py`; they are drawn under `jax.set_mesh(mesh)`, as in training.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Run directory to evaluate (default: the config's run_dir).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (default: the latest).")
_SAMPLES = flags.DEFINE_integer("samples", 0, "Samples per prompt, k (default: eval.samples).")
_PROMPTS = flags.DEFINE_integer("prompts", 0, "Held-out prompts (default: eval.num_prompts).")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; set fields with --config.section.field=value")
    from gtpo_jax.config import from_config_dict
    from gtpo_jax.data.sources import DataError
    from gtpo_jax.errors import ConfigError
    from gtpo_jax.training.build import build, load_data, reward_pool
    from gtpo_jax.training.checkpoint import Checkpointer, abstract_params
    from gtpo_jax.training.evaluation import evaluate

    try:
        cfg = from_config_dict(_CONFIG.value)
        run = build(cfg, train=False)
        _, test = load_data(cfg, run.encode)
        pool = reward_pool(cfg, [], test)
    except (ConfigError, DataError) as e:
        raise SystemExit(f"error: {e}") from None
    checkpointer = Checkpointer(f"{(_CHECKPOINT.value or cfg.train.run_dir).rstrip('/')}/checkpoints")
    step = checkpointer.latest_step() if _STEP.value < 0 else _STEP.value
    if step is None:
        raise SystemExit(f"error: no checkpoint in {checkpointer.directory}")
    try:
        params, _ = checkpointer.restore_params(step, abstract_params(run.model, run.mesh))
        result = evaluate(run, params, pool, test, samples=_SAMPLES.value or None, num_prompts=_PROMPTS.value or None)
    except ConfigError as e:  # --samples more than a sampler call holds (training.build.eval_chunk)
        raise SystemExit(f"error: {e}") from None
    finally:
        pool.close()
        checkpointer.close()
    print(json.dumps({"step": step, **result}))


if __name__ == "__main__":
    from gtpo_jax.config import exit_on_unknown_overrides

    exit_on_unknown_overrides(sys.argv[1:])
    app.run(main)
