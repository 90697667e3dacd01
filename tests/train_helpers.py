"""A tiny variant of the embedded default for trainer tests, usable in-process and as CLI flags."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from gtpo_jax.config import Config, from_config_dict

ROOT = Path(__file__).resolve().parents[1]

# Overrides of configs/default.py that make a run take seconds.
TINY = {
    "model.preset": "tiny",
    "data.num_train": 200,
    "data.num_test": 8,
    "rollout.max_new_tokens": 4,
    "rollout.max_refill_rounds": 1,
    "loss.group_size": 4,
    "warmup.steps": 100,
    "warmup.batch_size": 16,
    "train.steps": 2,
    "train.prompts_per_step": 4,
    "train.checkpoint_every": 0,
    "eval.every": 0,
    "eval.num_prompts": 4,
    "eval.samples": 4,
}


def load_config_file(path: str | Path):
    spec = importlib.util.spec_from_file_location("config_file", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(run_dir, file: str = "configs/default.py", **overrides) -> Config:
    c = load_config_file(file)
    for key, value in {**TINY, "train.run_dir": str(run_dir), **overrides}.items():
        section, field = key.split(".")
        c[section][field] = value
    return from_config_dict(c)


def cli(run_dir, **overrides) -> list[str]:
    """`python -m gtpo_jax.train` with the same settings as `tiny_config(run_dir, **overrides)`."""
    flags = [f"--config.{k}={v}" for k, v in {**TINY, "train.run_dir": str(run_dir), **overrides}.items()]
    return [sys.executable, "-m", "gtpo_jax.train", f"--config={ROOT / 'configs/default.py'}", *flags]


def popen(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=dict(os.environ))
