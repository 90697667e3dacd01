"""The sections of the run config (`gtpo_jax.config` assembles them): frozen dataclasses whose
modes are `StrEnum`s and which check their own fields.

A mode given as a plain string (a config file, `--config.train.resume=never`) is parsed into its
enum, which still equals the string (`cfg.train.resume == "auto"`). A bad value is a `ConfigError`
naming the field as the user wrote it: `train.resume='nevr': expected 'auto' or 'never'; did you
mean 'never'?`, `rollout.top_p=1.5: must be in (0, 1]`. Rules across sections are `config.Config`'s.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import numbers
import types
import typing
from typing import Any

from gtpo_jax.errors import ConfigError, did_you_mean

# The projections a LoRA adapter can wrap (models/transformer.py LORA_TARGETS).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class DType(enum.StrEnum):  # of model.param_dtype and model.dtype
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class AttentionKind(enum.StrEnum):  # of model.attention (models/attention.py KINDS)
    DENSE = "dense"
    BLOCKWISE = "blockwise"
    AUTO = "auto"


class TokenizerKind(enum.StrEnum):
    CHAR = "char"  # built-in alphabet (synthetic tasks)
    HF = "hf"  # tokenizer.json of a checkpoint
    SENTENCEPIECE = "sentencepiece"  # a .model file


class ChatTemplate(enum.StrEnum):  # data/tokenizer.py CHAT_TEMPLATES, for tokenizers without a Jinja one
    CHATML = "chatml"
    PLAIN = "plain"
    RAW = "raw"


class DataSource(enum.StrEnum):
    TASK = "task"  # a built-in synthetic task (data/tasks.py)
    JSONL = "jsonl"
    PARQUET = "parquet"
    TFDS = "tfds"


class FieldPreset(enum.StrEnum):  # field names of a data file (data/sources.py PRESETS)
    GSM8K = "gsm8k"
    MATH = "math"
    DAPO = "dapo"


class Task(enum.StrEnum):  # the built-in synthetic tasks (data/tasks.py TASKS)
    ARITHMETIC = "arithmetic"
    COUNTDOWN = "countdown"
    CHAIN = "chain"


class PromptStyle(enum.StrEnum):
    INSTRUCTION = "instruction"  # a full sentence
    COMPACT = "compact"  # the expression alone


class Schedule(enum.StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"


class Resume(enum.StrEnum):
    AUTO = "auto"  # continue from the latest checkpoint in run_dir, if any
    NEVER = "never"  # start fresh


class WandbMode(enum.StrEnum):  # of metrics.wandb_mode (wandb.init's `mode`)
    ONLINE = "online"  # sync to the W&B server as the run goes
    OFFLINE = "offline"  # write the run under run_dir/wandb; `wandb sync` uploads it later
    DISABLED = "disabled"  # wandb.init is a no-op (the samples still go to run_dir/samples.jsonl)


def show(value: Any) -> str:
    """How a value is quoted in an error: as the user wrote it (an enum as its plain string)."""
    return repr(value.value if isinstance(value, enum.Enum) else value)


def parse_enum(cls: type[enum.StrEnum], value: Any, where: str) -> enum.StrEnum:
    """`value` (a member or its string) as a member of `cls`; else a ConfigError naming `where`."""
    if isinstance(value, str) and value in cls._value2member_map_:
        return cls(value)
    choices = [m.value for m in cls]
    listed = " or ".join(", ".join(repr(c) for c in choices).rsplit(", ", 1))
    raise ConfigError(f"{where}={show(value)}: expected {listed}{did_you_mean(value, choices, list_known=False)}")


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """A dataclass's field types (`typing.get_type_hints`: annotations are never parsed as text)."""
    return typing.get_type_hints(cls)


def scalar_type(hint: Any) -> Any:
    """The type of a field's values without `None`: `float | None` -> float, `LossAgg | str | None` -> str."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    if any(_subclass(a, str) for a in args):
        return args[0] if len(args) == 1 and _subclass(args[0], enum.StrEnum) else str
    return args[0]


def _subclass(hint: Any, cls: type) -> bool:
    return isinstance(hint, type) and typing.get_origin(hint) is None and issubclass(hint, cls)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {int: "integers", str: "strings"}


def _typed(where: str, hint: Any, value: Any) -> Any:
    """`value` checked against the field type `hint`; enums parsed, lists of a tuple field made tuples."""
    if value is None and type(None) in typing.get_args(hint):
        return None
    kind = scalar_type(hint)
    if _subclass(kind, enum.StrEnum):
        return parse_enum(kind, value, where)
    if typing.get_origin(kind) is tuple:  # tuple[int, ...], tuple[str, ...]
        item = typing.get_args(kind)[0]
        if isinstance(value, list | tuple) and all(_is(item, v) for v in value):
            return tuple(value)
        raise ConfigError(f"{where}={show(value)}: expected a list of {_PLURALS[item]}")
    if not _is(kind, value):
        raise ConfigError(f"{where}={show(value)}: expected {_TYPE_NAMES[kind]}")
    return value


def _is(kind: type, value: Any) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, {int: numbers.Integral, float: numbers.Real}.get(kind, kind))


class Section:
    """Base of the sections: types and enums are checked on construction, then `_validate`."""

    _name = ""  # the section's key in a config file ("rollout")

    def __post_init__(self) -> None:
        annotations = hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _typed(f"{self._name}.{f.name}", annotations[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        """Checks of this section's own values (each raises a ConfigError naming the field)."""

    def _check(self, ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{self._name}.{field}={show(getattr(self, field))}: {what}")

    def _at_least(self, low: float, *fields: str, why: str = "") -> None:
        for field in fields:
            self._check(getattr(self, field) >= low, field, f"must be >= {low}{why}")

    def _positive(self, *fields: str) -> None:
        for field in fields:
            self._check(getattr(self, field) > 0, field, "must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
    _name = "model"
    # Named architecture from models/presets.py, used when `checkpoint` is empty (random init).
    preset: str = "tiny"
    # Hugging Face checkpoint directory (config.json + safetensors); overrides `preset`.
    checkpoint: str = ""
    # Storage dtype of the parameters and the dtype of activations ("float32" or "bfloat16").
    # Training keeps float32 parameters (the master copy AdamW updates: in bfloat16 an update of
    # lr 1e-6 rounds away for almost every weight); use dtype="bfloat16" for bf16 compute.
    param_dtype: DType = DType.FLOAT32
    dtype: DType = DType.FLOAT32
    # Rematerialise each layer in the backward pass (less activation memory, ~30% more compute).
    remat: bool = False
    # Attention: "dense" (float32 [T, S] scores), "blockwise" (online softmax over
    # attention_block x attention_block tiles, memory O(T) per head) or "auto" (blockwise when
    # T * S > attention_auto_len**2: training, scoring and long prefills; decoding stays dense).
    attention: AttentionKind = AttentionKind.AUTO
    attention_block: int = 512
    attention_auto_len: int = 2048
    # Seed of the random initialisation (preset models only).
    init_seed: int = 0
    # Vocabulary chunk and token chunk of the log-prob / entropy op (ops/logprobs.py).
    vocab_chunk: int = 16384
    token_chunk: int = 1024
    # LoRA adapter rank; 0 = off (every weight is trained). With a rank, only the adapters are
    # trained and held in the optimizer state; the base is frozen (and may be bfloat16), and the
    # KL reference is the base with the adapters off (models/lora.py).
    lora_rank: int = 0
    # Adapter scale alpha / rank ("LoRA Without Regret", Thinking Machines 2025: alpha 32 at any rank).
    lora_alpha: float = 32.0
    # Projections that get an adapter: any of q, k, v, o (attention) and gate, up, down (MLP).
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # Dropout on the adapters' input in the update's forward passes (never in sampling or scoring).
    lora_dropout: float = 0.0

    def _validate(self) -> None:
        why = (
            "training needs float32 master parameters (bfloat16 ones lose updates smaller than their "
            "rounding step); keep param_dtype='float32', set model.dtype='bfloat16' for bf16 compute, "
            "or train LoRA adapters (model.lora_rank > 0: they are float32, the base is frozen)"
        )
        self._check(self.param_dtype == DType.FLOAT32 or self.lora_rank > 0, "param_dtype", why)
        self._at_least(1, "vocab_chunk", "token_chunk", "attention_block", "attention_auto_len")
        self._check(bool(self.preset or self.checkpoint), "preset", "name a preset, or set model.checkpoint")
        self._at_least(0, "lora_rank")
        self._positive("lora_alpha")
        self._check(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        for target in self.lora_targets:
            hint = did_you_mean(target, LORA_TARGETS, list_known=False)
            what = f"unknown target {target!r}{hint}; expected any of {', '.join(LORA_TARGETS)}"
            self._check(target in LORA_TARGETS, "lora_targets", what)
        self._check(bool(self.lora_targets) or not self.lora_rank, "lora_targets", "name at least one projection")


@dataclasses.dataclass(frozen=True)
class TokenizerSection(Section):
    _name = "tokenizer"
    # "char" (built-in alphabet, synthetic tasks), "hf" (tokenizer.json) or "sentencepiece".
    kind: TokenizerKind = TokenizerKind.CHAR
    # Checkpoint dir ("hf"), .model file ("sentencepiece"); empty = the model checkpoint (hf).
    path: str = ""
    # Plain template used when the tokenizer has no Jinja chat_template: "chatml", "plain", "raw".
    chat_template: ChatTemplate = ChatTemplate.RAW
    # System message put before every prompt; empty = none.
    system_prompt: str = ""


@dataclasses.dataclass(frozen=True)
class DataSection(Section):
    _name = "data"
    # "task" (built-in synthetic task), "jsonl", "parquet" or "tfds".
    source: DataSource = DataSource.TASK
    # Training file, or tfds builder name (needed unless source is "task").
    path: str = ""
    # Held-out file / tfds split for evaluation; empty = the task's test split (source "task").
    test_path: str = ""
    # Field preset ("gsm8k", "math", "dapo") of the files.
    fields: FieldPreset = FieldPreset.DAPO
    # Built-in task ("arithmetic", "countdown", "chain"), its difficulty, and how many problems to draw.
    task: Task = Task.ARITHMETIC
    difficulty: int = 2
    # Operators the task draws from (a subset of "+-*").
    operations: str = "+-*"
    num_train: int = 4000
    num_test: int = 200
    # "instruction" (full sentence) or "compact" (the expression alone) task prompts.
    prompt_style: PromptStyle = PromptStyle.COMPACT
    # Text appended to every prompt (e.g. an instruction to box the answer).
    prompt_suffix: str = ""
    # Shuffle seed of the training prompts.
    seed: int = 0
    # Prompts with more tokens than this are dropped (counted and logged).
    max_prompt_tokens: int = 64

    def _validate(self) -> None:
        self._at_least(1, "difficulty", "num_train", "num_test", "max_prompt_tokens")
        self._check(
            bool(self.operations) and not set(self.operations) - set("+-*"),
            "operations",
            "expected a non-empty subset of '+-*'",
        )
        why = f"data.source={self.source.value!r} needs data.path (a file, or the tfds builder name)"
        self._check(self.source == DataSource.TASK or bool(self.path), "path", why)


@dataclasses.dataclass(frozen=True)
class RolloutSection(Section):
    _name = "rollout"
    # Response length limit in tokens (T); the loss's max_response_len is derived from it.
    max_new_tokens: int = 8
    # Sampling temperature (the scoring pass uses the same), top-k (0 = off), top-p (1 = off).
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # Prompt lengths are left-padded to one of these, bounding sampler compilations.
    prompt_buckets: tuple[int, ...] = (16, 32, 64)
    # Dynamic sampling: extra sampling rounds allowed to refill uninformative groups.
    max_refill_rounds: int = 2
    # Sequences (prompts x their G samples) per sampler call, bounding the KV cache and the
    # decode activations: a step's prompts are drawn in chunks of batch_size / G prompts (the same
    # tokens as one call). 0 = the whole step in one call. A multiple of loss.group_size. The
    # evaluation's sampler calls hold at most batch_size sequences too (eval.samples per prompt).
    batch_size: int = 0

    def _validate(self) -> None:
        self._at_least(1, "max_new_tokens")
        self._at_least(0, "batch_size", why=" (0 = the whole step in one sampler call)")
        self._at_least(0, "temperature", why=" (0 = greedy)")
        self._at_least(0, "top_k", why=" (0 = off)")
        self._check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        b = self.prompt_buckets
        self._check(
            len(b) > 0 and b[0] >= 1 and all(x < y for x, y in zip(b, b[1:], strict=False)),
            "prompt_buckets",
            "must be a non-empty increasing list of lengths >= 1",
        )
        self._at_least(0, "max_refill_rounds")


@dataclasses.dataclass(frozen=True)
class RewardSection(Section):
    _name = "reward"
    # Reward function name (rewards/registry.py): "math", "dapo", "exact", "format", "countdown", "chain".
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

    def _validate(self) -> None:
        self._at_least(1, "num_workers")
        self._positive("timeout_s")
        self._check(0 <= self.max_invalid_frac <= 1, "max_invalid_frac", "must be in [0, 1]")
        self._check(self.rel_tol is None or self.rel_tol >= 0, "rel_tol", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class OptimSection(Section):
    _name = "optim"
    # AdamW peak learning rate, then "constant" or "cosine" decay.
    learning_rate: float = 1e-6
    # Linear learning-rate warm-up, counted in RL steps (as DAPO's recipe counts it), not in
    # optimiser updates: each RL step makes ppo_epochs x mini_batches updates.
    warmup_steps: int = 0
    schedule: Schedule = Schedule.CONSTANT
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    # Global gradient-norm clip (0 = off).
    max_grad_norm: float = 1.0

    def _validate(self) -> None:
        self._positive("learning_rate")
        self._at_least(0, "warmup_steps", "weight_decay")
        self._at_least(0, "max_grad_norm", why=" (0 = off)")
        for name in ("b1", "b2"):
            self._check(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class WarmupSection(Section):
    _name = "warmup"
    # Supervised warm-up on reference answers before RL (0 steps = off): gives a random-init
    # policy the partial skill RL needs to get signal.
    steps: int = 0
    batch_size: int = 64
    learning_rate: float = 3e-3

    def _validate(self) -> None:
        self._at_least(0, "steps", why=" (0 = off)")
        self._at_least(1, "batch_size")
        self._positive("learning_rate")


@dataclasses.dataclass(frozen=True)
class TrainSection(Section):
    _name = "train"
    # RL steps (one rollout batch each).
    steps: int = 100
    # Prompts per step (P); each gets loss.group_size responses.
    prompts_per_step: int = 16
    # Passes over each rollout batch, and optimiser steps per pass (mini-batches of whole groups).
    ppo_epochs: int = 1
    mini_batches: int = 1
    # Sequences (prompts x loss.group_size) per micro-batch, 0 = the whole mini-batch: the
    # scoring pass runs over the rollout in chunks of this size, and the update accumulates each
    # mini-batch's gradient over micro-batches of this size (exact: sums and denominators add up;
    # a group may straddle two micro-batches). Divides a mini-batch's sequences; a multiple of the
    # mesh's batch width (data x fsdp devices), else each micro-batch is padded to one (logged).
    micro_batch_size: int = 0
    # The scoring pass and the update run over the batch's longest response rounded up to one of
    # this many lengths, rollout.max_new_tokens / 2**k for k < length_buckets (rounded up): at 4,
    # T/8, T/4, T/2 and T (one compilation each per rollout.prompt_buckets width: up to
    # len(prompt_buckets) x length_buckets, each logged). 1 = always the full max_new_tokens (off).
    length_buckets: int = 4
    # Seed of sampling and everything random after initialisation.
    seed: int = 0
    # Where checkpoints, metrics.jsonl and TensorBoard events go.
    run_dir: str = "runs/default"
    # "auto" = continue from the latest checkpoint in run_dir if any; "never" = start fresh.
    resume: Resume = Resume.AUTO
    # Save every N steps (0 = only at the end and on SIGTERM); keep the last K.
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # Write a JSONL metrics record and console line every N steps.
    log_every: int = 1
    # Stop after this many steps in this process (0 = no limit); for tests and preemption drills.
    stop_after: int = 0
    # Sampling budget: the run ends once this many responses have been generated, refills of
    # dynamic sampling included (0 = no budget; train.steps alone ends the run). A multiple of
    # prompts_per_step x loss.group_size; the last step's refills are capped to stay within it.
    max_sampled_responses: int = 0

    def _validate(self) -> None:
        self._at_least(1, "steps", "prompts_per_step", "ppo_epochs", "mini_batches")
        self._at_least(0, "micro_batch_size", why=" (0 = the whole mini-batch)")
        self._at_least(1, "length_buckets", why=" (1 = off: the full rollout.max_new_tokens)")
        self._check(
            self.prompts_per_step % self.mini_batches == 0,
            "prompts_per_step",
            f"must split into mini_batches = {self.mini_batches} equal parts (groups are never split)",
        )
        self._check(bool(self.run_dir), "run_dir", "must name a directory")
        self._at_least(0, "checkpoint_every", why=" (0 = only at the end)")
        self._at_least(1, "keep_checkpoints", "log_every")
        self._at_least(0, "stop_after", why=" (0 = no limit)")
        self._at_least(0, "max_sampled_responses", why=" (0 = no budget)")


@dataclasses.dataclass(frozen=True)
class EvalSection(Section):
    _name = "eval"
    # Evaluate on held-out prompts every N steps (0 = only at start and end).
    every: int = 0
    # Or each time the run's sampled responses (refills included) pass a multiple of N (0 = off;
    # exclusive with `every`): the same x for algorithms that sample different amounts per step.
    every_responses: int = 0
    # Held-out prompts, and samples per prompt (k of pass@k / avg@k).
    num_prompts: int = 128
    samples: int = 4
    # Sampling temperature of the evaluation (0 = greedy, then samples is forced to 1).
    temperature: float = 1.0
    # Also measure greedy pass@1 (one argmax response per prompt), beside the sampled metrics:
    # a policy that only gets sharper raises avg@k at temperature 1 without solving more.
    greedy: bool = True

    def _validate(self) -> None:
        self._at_least(0, "every", why=" (0 = only at start and end)")
        self._at_least(0, "every_responses", why=" (0 = off)")
        self._check(
            not (self.every and self.every_responses),
            "every_responses",
            f"and eval.every={self.every} are both set: choose one cadence (steps or responses)",
        )
        self._at_least(1, "num_prompts", "samples")
        self._at_least(0, "temperature", why=" (0 = greedy)")


@dataclasses.dataclass(frozen=True)
class MetricsSection(Section):
    """Where the metrics go besides run_dir/metrics.jsonl, TensorBoard and the console
    (training/metrics.py), and the tables of sampled completions (training/samples.py)."""

    _name = "metrics"
    # Weights & Biases project; empty = W&B off (wandb is then never imported). Process 0 only.
    wandb_project: str = ""
    # W&B entity (user or team; empty = the account's default) and run name (empty = W&B's own).
    wandb_entity: str = ""
    wandb_run_name: str = ""
    # "online", "offline" (files under run_dir/wandb, for `wandb sync`) or "disabled".
    wandb_mode: WandbMode = WandbMode.ONLINE
    # Every N steps, write samples_per_step sampled completions (prompt, response, reward, O+,
    # mean token entropy and advantage, length, finish reason) to run_dir/samples.jsonl and, with
    # W&B on, as a wandb.Table (0 = off).
    samples_every: int = 0
    samples_per_step: int = 4

    def _validate(self) -> None:
        self._at_least(0, "samples_every", why=" (0 = off)")
        self._at_least(1, "samples_per_step")


@dataclasses.dataclass(frozen=True)
class CompareSection(Section):
    """Read by `python -m gtpo_jax.compare` only (a training run ignores it)."""

    _name = "compare"
    # The grid's variants: "name" (the registered recipe of that name) or
    # "name:algorithm:field=value,field=value" (a recipe with loss fields changed).
    variants: tuple[str, ...] = ("grpo", "dapo", "gtpo", "grpo_s", "gtpo_joint:gtpo:gtpo_norm=joint")
    # Seeds: each has its own initialisation, warm-up, prompt order and sampling, shared by its variants.
    seeds: tuple[int, ...] = (0, 1, 2)

    def _validate(self) -> None:
        names = [v.split(":", 1)[0] for v in self.variants]
        self._check(bool(names) and all(names), "variants", "must name at least one variant, none empty")
        self._check(len(set(names)) == len(names), "variants", "variant names must be distinct")
        self._check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "seeds", "must be distinct, >= 1")


@dataclasses.dataclass(frozen=True)
class MeshSection(Section):
    _name = "mesh"
    # Device mesh axis sizes; one may be -1 (the remaining devices).
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Multi-slice: data-parallel replicas across this many TPU slices (data-center network).
    dcn_data: int = 1

    def _validate(self) -> None:
        axes = ("data", "fsdp", "tensor")
        for name in axes:
            self._check(getattr(self, name) >= 1 or getattr(self, name) == -1, name, "must be >= 1, or -1 (the rest)")
        rest = [name for name in axes if getattr(self, name) == -1]
        self._check(len(rest) <= 1, rest[0] if rest else "data", "at most one of data, fsdp, tensor may be -1")
        self._at_least(1, "dcn_data")
