"""The run configuration: frozen, validated dataclasses built once from an ml_collections config.

A config file (`configs/*.py`) returns a `ConfigDict` from `get_config()`; absl's `config_flags`
applies command-line overrides (`--config.loss.algorithm=gtpo`); `from_config_dict` turns the
result into a `Config`. An unknown (e.g. misspelled) field is an error naming the closest valid
one; a bad value is an error naming the field. `tests/test_config.py` proves every field is read.

Sections: `model`, `tokenizer`, `data`, `rollout`, `reward`, `loss` (`losses.LossConfig`),
`optim`, `warmup` (optional supervised warm-up), `train`, `eval`, `mesh`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from gtpo_jax.losses import ConfigError, LossConfig

__all__ = ["Config", "ConfigError", "from_config_dict", "from_dict", "to_dict"]


# Set of "Section.field" names read while tracking (see `track_reads`); None = not tracking.
_READS: set[str] | None = None


class _Tracked:
    """Records reads of public attributes while `track_reads` is active (proves fields are used)."""

    def __getattribute__(self, name: str) -> Any:
        if _READS is not None and not name.startswith("_"):
            _READS.add(f"{type(self).__name__}.{name}")
        return object.__getattribute__(self, name)


class track_reads:  # noqa: N801  (a context manager used like a function)
    """`with track_reads() as reads: ...` collects every config field the code reads."""

    def __enter__(self) -> set[str]:
        global _READS
        _READS = set()
        return _READS

    def __exit__(self, *exc: object) -> None:
        global _READS
        _READS = None


def section_fields() -> set[str]:
    """Every "Section.field" of the run config except the loss section (checked in its own tests)."""
    return {f"{cls.__name__}.{f.name}" for cls in SECTIONS.values() for f in dataclasses.fields(cls)}


def _check(ok: bool, section: str, field: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"{section}.{field}={value!r}: {what}")


@dataclasses.dataclass(frozen=True)
class ModelSection(_Tracked):
    # Named architecture from models/presets.py, used when `checkpoint` is empty (random init).
    preset: str = "tiny"
    # Hugging Face checkpoint directory (config.json + safetensors); overrides `preset`.
    checkpoint: str = ""
    # Storage dtype of the parameters and the dtype of activations ("float32" or "bfloat16").
    # Training keeps float32 parameters (the master copy AdamW updates: in bfloat16 an update of
    # lr 1e-6 rounds away for almost every weight); use dtype="bfloat16" for bf16 compute.
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Rematerialise each layer in the backward pass (less activation memory, ~30% more compute).
    remat: bool = False
    # Seed of the random initialisation (preset models only).
    init_seed: int = 0
    # Vocabulary chunk and token chunk of the log-prob / entropy op (ops/logprobs.py).
    vocab_chunk: int = 16384
    token_chunk: int = 1024


@dataclasses.dataclass(frozen=True)
class TokenizerSection(_Tracked):
    # "char" (built-in alphabet, synthetic tasks), "hf" (tokenizer.json) or "sentencepiece".
    kind: str = "char"
    # Checkpoint dir ("hf"), .model file ("sentencepiece"); empty = the model checkpoint (hf).
    path: str = ""
    # Plain template used when the tokenizer has no Jinja chat_template: "chatml", "plain", "raw".
    chat_template: str = "raw"
    # System message put before every prompt; empty = none.
    system_prompt: str = ""


@dataclasses.dataclass(frozen=True)
class DataSection(_Tracked):
    # "task" (built-in synthetic task), "jsonl", "parquet" or "tfds".
    source: str = "task"
    # Training file, or tfds builder name.
    path: str = ""
    # Held-out file / tfds split for evaluation; empty = the task's test split (source "task").
    test_path: str = ""
    # Field preset ("gsm8k", "math", "dapo") of the files.
    fields: str = "dapo"
    # Built-in task ("arithmetic", "countdown"), its difficulty, and how many problems to draw.
    task: str = "arithmetic"
    difficulty: int = 2
    # Operators the task draws from (a subset of "+-*").
    operations: str = "+-*"
    num_train: int = 4000
    num_test: int = 200
    # "instruction" (full sentence) or "compact" (the expression alone) task prompts.
    prompt_style: str = "compact"
    # Text appended to every prompt (e.g. an instruction to box the answer).
    prompt_suffix: str = ""
    # Shuffle seed of the training prompts.
    seed: int = 0
    # Prompts with more tokens than this are dropped (counted and logged).
    max_prompt_tokens: int = 64


@dataclasses.dataclass(frozen=True)
class RolloutSection(_Tracked):
    # Response length limit in tokens (T).
    max_new_tokens: int = 8
    # Sampling temperature (the scoring pass uses the same), top-k (0 = off), top-p (1 = off).
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # Prompt lengths are left-padded to one of these, bounding sampler compilations.
    prompt_buckets: tuple[int, ...] = (16, 32, 64)
    # Dynamic sampling: extra sampling rounds allowed to refill uninformative groups.
    max_refill_rounds: int = 2


@dataclasses.dataclass(frozen=True)
class RewardSection(_Tracked):
    # Reward function name (rewards/registry.py): "math", "dapo", "exact", "format", "countdown".
    name: str = "exact"
    # Regex whose group 1 is the answer when the completion has no \boxed{} (empty = none).
    answer_pattern: str = ""
    # Math reward only (unset = its default): strict answer grammar before any equivalence check
    # (True; False = the lenient math-verify check), and the relative tolerance of non-exact numbers
    # (1e-9). Setting either for a reward that does not take it is an error at start-up.
    strict: bool | None = None
    rel_tol: float | None = None
    # Worker processes and the hard per-item time limit.
    num_workers: int = 2
    timeout_s: float = 5.0
    # A response whose reward errored, timed out or crashed is invalid: left out of its group's
    # statistics and the loss (counted per step). The run stops with an error when more than this
    # fraction of a step's sampled responses are invalid (a broken verifier, not a hard prompt).
    max_invalid_frac: float = 0.5


@dataclasses.dataclass(frozen=True)
class OptimSection(_Tracked):
    # AdamW peak learning rate, then "constant" or "cosine" decay.
    learning_rate: float = 1e-6
    # Linear learning-rate warm-up, counted in RL steps (as DAPO's recipe counts it), not in
    # optimiser updates: each RL step makes ppo_epochs x mini_batches updates.
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    # Global gradient-norm clip (0 = off).
    max_grad_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class WarmupSection(_Tracked):
    # Supervised warm-up on reference answers before RL (0 steps = off): gives a random-init
    # policy the partial skill RL needs to get signal.
    steps: int = 0
    batch_size: int = 64
    learning_rate: float = 3e-3


@dataclasses.dataclass(frozen=True)
class TrainSection(_Tracked):
    # RL steps (one rollout batch each).
    steps: int = 100
    # Prompts per step (P); each gets loss.group_size responses.
    prompts_per_step: int = 16
    # Passes over each rollout batch, and optimiser steps per pass (mini-batches of whole groups).
    ppo_epochs: int = 1
    mini_batches: int = 1
    # Gradient accumulation inside a mini-batch (exact: sums and denominators add up).
    micro_batches: int = 1
    # Seed of sampling and everything random after initialisation.
    seed: int = 0
    # Where checkpoints, metrics.jsonl and TensorBoard events go.
    run_dir: str = "runs/default"
    # "auto" = continue from the latest checkpoint in run_dir if any; "never" = start fresh.
    resume: str = "auto"
    # Save every N steps (0 = only at the end and on SIGTERM); keep the last K.
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # Write a JSONL metrics record and console line every N steps.
    log_every: int = 1
    # Stop after this many steps in this process (0 = no limit); for tests and preemption drills.
    stop_after: int = 0


@dataclasses.dataclass(frozen=True)
class EvalSection(_Tracked):
    # Evaluate on held-out prompts every N steps (0 = only at start and end).
    every: int = 0
    # Held-out prompts, and samples per prompt (k of pass@k / avg@k).
    num_prompts: int = 128
    samples: int = 4
    # Sampling temperature of the evaluation (0 = greedy, then samples is forced to 1).
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class MeshSection(_Tracked):
    # Device mesh axis sizes; one may be -1 (the remaining devices).
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Multi-slice: data-parallel replicas across this many TPU slices (data-center network).
    dcn_data: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelSection
    tokenizer: TokenizerSection
    data: DataSection
    rollout: RolloutSection
    reward: RewardSection
    loss: LossConfig
    optim: OptimSection
    warmup: WarmupSection
    train: TrainSection
    eval: EvalSection
    mesh: MeshSection

    def __post_init__(self) -> None:
        t, g = self.train, self.loss.group_size
        _check(t.steps >= 1, "train", "steps", t.steps, "must be >= 1")
        _check(t.prompts_per_step >= 1, "train", "prompts_per_step", t.prompts_per_step, "must be >= 1")
        for name in ("ppo_epochs", "mini_batches", "micro_batches"):
            _check(getattr(t, name) >= 1, "train", name, getattr(t, name), "must be >= 1")
        _check(t.prompts_per_step % (t.mini_batches * t.micro_batches) == 0, "train", "prompts_per_step",
               t.prompts_per_step, f"must split into mini_batches x micro_batches = "
               f"{t.mini_batches} x {t.micro_batches} equal parts (groups are never split)")  # fmt: skip
        _check(t.resume in ("auto", "never"), "train", "resume", t.resume, "expected 'auto' or 'never'")
        _check(self.rollout.max_new_tokens >= 1, "rollout", "max_new_tokens", self.rollout.max_new_tokens, ">= 1")
        _check(self.rollout.max_refill_rounds >= 0, "rollout", "max_refill_rounds", self.rollout.max_refill_rounds,
               "must be >= 0")  # fmt: skip
        _check(self.optim.schedule in ("constant", "cosine"), "optim", "schedule", self.optim.schedule,
               "expected 'constant' or 'cosine'")  # fmt: skip
        _check(self.optim.learning_rate > 0, "optim", "learning_rate", self.optim.learning_rate, "must be > 0")
        _check(self.eval.samples >= 1, "eval", "samples", self.eval.samples, "must be >= 1")
        _check(self.data.source in ("task", "jsonl", "parquet", "tfds"), "data", "source", self.data.source,
               "expected 'task', 'jsonl', 'parquet' or 'tfds'")  # fmt: skip
        _check(self.data.prompt_style in ("instruction", "compact"), "data", "prompt_style", self.data.prompt_style,
               "expected 'instruction' or 'compact'")  # fmt: skip
        _check(self.tokenizer.kind in ("char", "hf", "sentencepiece"), "tokenizer", "kind", self.tokenizer.kind,
               "expected 'char', 'hf' or 'sentencepiece'")  # fmt: skip
        _check(g >= 1, "loss", "group_size", g, "must be >= 1")
        _check(self.model.param_dtype == "float32", "model", "param_dtype", self.model.param_dtype,
               "training needs float32 master parameters (bfloat16 ones lose updates smaller than their "
               "rounding step); keep param_dtype='float32', set model.dtype='bfloat16' for bf16 compute")  # fmt: skip
        _check(0 <= self.reward.max_invalid_frac <= 1, "reward", "max_invalid_frac", self.reward.max_invalid_frac,
               "must be in [0, 1]")  # fmt: skip
        _check(self.optim.warmup_steps >= 0, "optim", "warmup_steps", self.optim.warmup_steps, "must be >= 0")
        if self.loss.max_response_len:
            limit = self.rollout.max_new_tokens
            _check(self.loss.max_response_len == limit, "loss", "max_response_len", self.loss.max_response_len,
                   f"must equal rollout.max_new_tokens={limit}")  # fmt: skip


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "tokenizer": TokenizerSection,
    "data": DataSection,
    "rollout": RolloutSection,
    "reward": RewardSection,
    "optim": OptimSection,
    "warmup": WarmupSection,
    "train": TrainSection,
    "eval": EvalSection,
    "mesh": MeshSection,
}


def _closest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(known))})"


def _section(name: str, cls: type, values: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown config field {name}.{key}{_closest(key, list(fields))}")
    kwargs = {}
    for key, value in values.items():
        default = fields[key].default
        if isinstance(default, tuple) and isinstance(value, list | tuple):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def from_dict(values: Mapping[str, Any]) -> Config:
    """A validated `Config` from a nested mapping (e.g. `ConfigDict.to_dict()`)."""
    known = [*SECTIONS, "loss"]
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config section {key!r}{_closest(key, known)}")
    sections = {name: _section(name, cls, values.get(name, {})) for name, cls in SECTIONS.items()}
    try:
        loss = LossConfig.from_dict(dict(values.get("loss", {})))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Config(loss=loss, **sections)


def from_config_dict(config: Any) -> Config:
    """From an ml_collections `ConfigDict` (what `config_flags` returns)."""
    return from_dict(config.to_dict())


def _default(f: dataclasses.Field) -> Any:
    """A field's default; `None` ("unset") becomes a typed placeholder the command line can set."""
    if f.default is not None:
        return f.default
    from ml_collections import config_dict

    return config_dict.placeholder(next(t for t in (bool, int, float, str) if t.__name__ in str(f.type)))


def base_config() -> Any:
    """A `ConfigDict` holding every field at its default, so any field can be overridden from the
    command line. Config files start from it. Loss fields are typed placeholders (`None` = the
    chosen algorithm's recipe default), so `--config.loss.algorithm=grpo` changes only the recipe."""
    from ml_collections import config_dict

    root = config_dict.ConfigDict()
    for name, cls in SECTIONS.items():
        root[name] = config_dict.ConfigDict({f.name: _default(f) for f in dataclasses.fields(cls)})
    loss = config_dict.ConfigDict()
    for f in dataclasses.fields(LossConfig):
        if f.name == "algorithm":
            loss[f.name] = f.default
            continue
        kind = next(t for t in (bool, int, float, str) if t.__name__ in str(f.type))
        loss[f.name] = config_dict.placeholder(kind)
    root["loss"] = loss
    return root


def check_overrides(argv: list[str], flag: str = "config") -> None:
    """Rejects `--config.section.field=...` arguments naming no field, before absl parses them,
    with the closest valid name (absl would raise a bare AttributeError with a traceback)."""
    base = base_config()
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        path = arg[len(flag) + 3 :].split("=", 1)[0].split(".")
        if len(path) != 2 or path[0] not in base:
            known = [f"{s}.{k}" for s in base for k in base[s]]
            raise ConfigError(f"unknown config field {'.'.join(path)}{_closest('.'.join(path), known)}")
        if path[1] not in base[path[0]]:
            raise ConfigError(f"unknown config field {'.'.join(path)}{_closest(path[1], list(base[path[0]]))}")


def exit_on_unknown_overrides(argv: list[str]) -> None:
    """`check_overrides` for a CLI's `__main__`: a one-line error and exit status 1, no traceback."""
    try:
        check_overrides(argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    """JSON-able resolved config (recipe defaults filled in); saved with every checkpoint."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return list(v)
        return str(v) if hasattr(v, "value") and not isinstance(v, bool | int | float) else v

    # vars(), not dataclasses.asdict: saving the config must not count as reading every field.
    return {f.name: {k: plain(v) for k, v in vars(getattr(cfg, f.name)).items()} for f in dataclasses.fields(cfg)}
