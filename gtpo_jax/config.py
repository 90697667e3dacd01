"""The run configuration: frozen, validated dataclasses built once from an ml_collections config.

A config file (`configs/*.py`) returns a `ConfigDict` from `get_config()`; absl's `config_flags`
applies command-line overrides (`--config.loss.algorithm=gtpo`); `from_config_dict` turns the
result into a `Config`. An unknown (e.g. misspelled) field is an error naming the closest valid
one; a bad value is an error naming the field as the user wrote it (`rollout.top_p=1.5: ...`).

Sections (`config_sections.py`, each checks its own fields): `model`, `tokenizer`, `data`,
`rollout`, `reward`, `loss` (`losses.LossConfig`), `optim`, `warmup` (optional supervised
warm-up), `train`, `eval`, `mesh`, `metrics` (W&B and sample tables). `Config` checks the rules
across sections. Loss fields that follow from another section (`DERIVED_LOSS_FIELDS`) are set
here and refused from the user.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Mapping
from typing import Any

from gtpo_jax.config_sections import (
    ChatTemplate,
    CompareSection,
    DataSection,
    DataSource,
    DType,
    EvalSection,
    FieldPreset,
    MeshSection,
    MetricsSection,
    ModelSection,
    OptimSection,
    PromptStyle,
    Resume,
    RewardSection,
    RolloutSection,
    Schedule,
    Task,
    TokenizerKind,
    TokenizerSection,
    TrainSection,
    WandbMode,
    WarmupSection,
    hints,
    scalar_type,
)
from gtpo_jax.errors import ConfigError, did_you_mean
from gtpo_jax.losses import RECIPES, LossConfig

__all__ = [
    "DERIVED_LOSS_FIELDS",
    "IGNORED_WHEN",
    "REMOVED_FIELDS",
    "RESUMABLE",
    "SECTIONS",
    "ChatTemplate",
    "CompareSection",
    "Config",
    "ConfigError",
    "DType",
    "DataSection",
    "DataSource",
    "EvalSection",
    "FieldPreset",
    "MeshSection",
    "MetricsSection",
    "ModelSection",
    "OptimSection",
    "PromptStyle",
    "Resume",
    "RewardSection",
    "RolloutSection",
    "Schedule",
    "Task",
    "TokenizerKind",
    "TokenizerSection",
    "TrainSection",
    "WandbMode",
    "WarmupSection",
    "base_config",
    "check_overrides",
    "exit_on_unknown_overrides",
    "from_config_dict",
    "from_dict",
    "section_fields",
    "to_dict",
    "check_resume",
    "ignored_fields",
    "resume_changes",
]

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
    "metrics": MetricsSection,
    "compare": CompareSection,
}

# Loss fields whose value is another section's field: `from_dict` sets them when the chosen recipe
# reads them (the overlong penalty and filter read the response length limit), and a user who
# sets one gets an error naming the field to set instead.
DERIVED_LOSS_FIELDS: dict[str, tuple[str, str]] = {"max_response_len": ("rollout", "max_new_tokens")}


def section_fields() -> set[str]:
    """Every "Section.field" a training run reads: all sections but the loss (checked in its own
    tests) and `compare` (read by `python -m gtpo_jax.compare`, checked in its test)."""
    return {
        f"{cls.__name__}.{f.name}"
        for cls in SECTIONS.values()
        if cls is not CompareSection
        for f in dataclasses.fields(cls)
    }


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
    metrics: MetricsSection
    compare: CompareSection

    def __post_init__(self) -> None:
        """Rules across sections; each section has checked its own fields."""
        for name, (section, field) in DERIVED_LOSS_FIELDS.items():
            value, source = getattr(self.loss, name), getattr(getattr(self, section), field)
            if value and value != source:
                raise ConfigError(f"loss.{name}={value!r}: must equal {section}.{field}={source} (derived from it)")
        t, per_round = self.train, self.train.prompts_per_step * self.loss.group_size
        if t.max_sampled_responses % per_round:
            raise ConfigError(
                f"train.max_sampled_responses={t.max_sampled_responses}: must be a multiple of train.prompts_per_step "
                f"x loss.group_size = {per_round} (the responses of one sampling round)"
            )
        level = self.loss.recipe.ratio_level
        if self.model.lora_dropout > 0 and level != "token":
            raise ConfigError(
                f"model.lora_dropout={self.model.lora_dropout}: loss.algorithm={str(self.loss.algorithm)!r} clips one "
                f"{level}-level ratio per response; dropout in the update (not in scoring) moves every ratio off 1 "
                "and a narrow sequence clip would then silence the gradient. Use lora_dropout=0"
            )
        _check_batch_sizes(self.rollout, self.train, self.loss.group_size)
        size, e = self.rollout.batch_size, self.eval
        if size and e.temperature > 0 and e.samples > size:
            raise ConfigError(
                f"eval.samples={e.samples}: more than rollout.batch_size={size} sequences a sampler call (the "
                "evaluation draws a prompt's samples in one call); lower eval.samples or raise rollout.batch_size"
            )
        top = self.rollout.prompt_buckets[-1]
        if self.data.max_prompt_tokens > top:
            raise ConfigError(
                f"data.max_prompt_tokens={self.data.max_prompt_tokens}: must be <= the largest of "
                f"rollout.prompt_buckets={list(self.rollout.prompt_buckets)} (a longer prompt fits no bucket)"
            )


def _check_batch_sizes(r: RolloutSection, t: TrainSection, g: int) -> None:
    """Sampler calls hold whole groups of `g` sequences; a micro-batch (sequences, a group may
    straddle two: training/update.py) divides its mini-batch."""
    if r.batch_size % g:
        raise ConfigError(
            f"rollout.batch_size={r.batch_size}: must be 0 (the whole step in one sampler call) or a multiple of "
            f"loss.group_size={g} (the {g} samples of a prompt are drawn in one call)"
        )
    mini = t.prompts_per_step // t.mini_batches * g
    if t.micro_batch_size and mini % t.micro_batch_size:
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size}: must be 0 (the whole mini-batch) or divide a "
            f"mini-batch's {mini} sequences (train.prompts_per_step x loss.group_size / train.mini_batches)"
        )


# (field, the condition under which it has no effect, that condition in words). A field set away
# from its default while its condition holds is reported by `ignored_fields`.
IGNORED_WHEN = (
    ("rollout.max_refill_rounds", lambda c: not c.loss.dynamic_sampling, "loss.dynamic_sampling is off"),
    ("rollout.top_k", lambda c: c.rollout.temperature == 0, "rollout.temperature=0 samples greedily"),
    ("rollout.top_p", lambda c: c.rollout.temperature == 0, "rollout.temperature=0 samples greedily"),
    ("eval.samples", lambda c: c.eval.temperature == 0, "eval.temperature=0 draws one greedy response"),
    ("warmup.batch_size", lambda c: c.warmup.steps == 0, "warmup.steps=0"),
    ("warmup.learning_rate", lambda c: c.warmup.steps == 0, "warmup.steps=0"),
)


def ignored_fields(cfg: Config) -> list[str]:
    """One line per field set away from its default where it has no effect (the trainer logs them
    as warnings: a knob that is silently ignored would make a run mean something else)."""
    out = []
    for name, ignored, why in IGNORED_WHEN:
        section, field = name.split(".")
        values = vars(getattr(cfg, section))  # not a read of the field (tests/config_reads.py)
        value, default = values[field], type(getattr(cfg, section)).__dataclass_fields__[field].default
        if value != default and ignored(cfg):
            out.append(f"{name}={value!r} is ignored: {why}")
    return out


# Fields a resumed run may change (how long, how often, where and how it runs, and the warm-up,
# which runs only before step 0 and never on a resume); any other difference from the
# checkpoint's config would silently continue a different experiment.
# Sampler calls and length buckets change memory and compilations, not what is computed (the
# same draws; exact sums), so they are resumable too. train.micro_batch_size is not: the update
# splits its LoRA-dropout key into one key per micro-batch (training/update.py), so another size
# draws other dropout masks (and adds the gradients in another order).
RESUMABLE = ("train.steps", "train.stop_after", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
             "train.resume", "train.run_dir", "train.max_sampled_responses", "reward.num_workers", "reward.timeout_s",
             "rollout.batch_size", "train.length_buckets",
             "eval", "mesh", "metrics", "compare", "warmup")  # fmt: skip


def check_resume(saved: Mapping[str, Any], now: Mapping[str, Any], where: str) -> None:
    """Refuses to resume a checkpoint written under another experiment's config."""
    changes = resume_changes(saved, now)
    if changes:
        raise ConfigError(
            f"the checkpoint in {where} was written with a different config ({'; '.join(changes)}); resume "
            f"with the same values, or start the new experiment in a new train.run_dir"
        )


def resume_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """`field: saved -> now` for each difference between a checkpoint's config (`to_dict`) and this
    run's, outside `RESUMABLE`. A field one side lacks (a config from an older version) is skipped."""
    out = []
    for section, values in now.items():
        for field, value in values.items():
            name, before = f"{section}.{field}", saved.get(section, {}).get(field, value)
            if section not in RESUMABLE and name not in RESUMABLE and _plain(before) != _plain(value):
                out.append(f"{name}: {before!r} -> {value!r}")
    return out


# Fields that no longer exist, and what replaced them: an old config file or flag gets this
# instead of a "did you mean" that could name a field of another meaning.
REMOVED_FIELDS = {
    "train.micro_batches": (
        "replaced by train.micro_batch_size, the sequences (prompts x loss.group_size) of one micro-batch "
        "of the scoring pass and of the update, not their count: micro_batches=k is micro_batch_size = "
        "train.prompts_per_step x loss.group_size / train.mini_batches / k (0 = the whole mini-batch)"
    ),
}


def _suggest(name: str, known: list[str], full_name: str = "") -> str:
    """What replaced a removed field, else the closest known name, else the list of known names."""
    if full_name in REMOVED_FIELDS:
        return f": {REMOVED_FIELDS[full_name]}"
    return did_you_mean(name, known, list_known=False) or did_you_mean(name, known)


def _section(name: str, cls: type, values: Mapping[str, Any]) -> Any:
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown config field {name}.{key}{_suggest(key, fields, f'{name}.{key}')}")
    return cls(**values)


def _reads(values: Mapping[str, Any], name: str) -> bool:
    """Whether the recipe chosen by the (unresolved) loss `values` reads the loss field `name`."""
    recipe = RECIPES.get(values.get("algorithm", LossConfig.algorithm))
    if recipe is None:  # LossConfig names the unknown algorithm
        return False
    resolved = {**recipe.defaults, **{k: v for k, v in values.items() if v is not None}}
    return name in recipe.live_fields(types.SimpleNamespace(**resolved))


def _loss(values: Mapping[str, Any], sections: Mapping[str, Any]) -> LossConfig:
    """The loss section, with the fields of `DERIVED_LOSS_FIELDS` taken from their source."""
    values = dict(values)
    for name, (section, field) in DERIVED_LOSS_FIELDS.items():
        given = values.pop(name, None)
        if given is not None:
            raise ConfigError(f"loss.{name}={given!r}: derived from {section}.{field}; set that instead")
        if _reads(values, name):
            values[name] = getattr(sections[section], field)
    limit, buffer = values.get("max_response_len"), values.get("overlong_buffer_len")
    if limit and isinstance(buffer, int) and buffer > limit:
        raise ConfigError(
            f"loss.overlong_buffer_len={buffer}: must be <= rollout.max_new_tokens={limit} "
            "(the penalty ramps up over the last overlong_buffer_len tokens of a response)"
        )
    try:
        return LossConfig.from_dict(values)
    except ValueError as e:  # a ConfigError, or a check of the loss module's own
        raise ConfigError(str(e)) from None


def from_dict(values: Mapping[str, Any]) -> Config:
    """A validated `Config` from a nested mapping (e.g. `ConfigDict.to_dict()`)."""
    known = [*SECTIONS, "loss"]
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config section {key!r}{_suggest(key, known)}")
    sections = {name: _section(name, cls, values.get(name, {})) for name, cls in SECTIONS.items()}
    return Config(loss=_loss(values.get("loss", {}), sections), **sections)


def from_config_dict(config: Any) -> Config:
    """From an ml_collections `ConfigDict` (what `config_flags` returns)."""
    return from_dict(config.to_dict())


def _plain(value: Any) -> Any:
    """A value as a config file writes it: enums as their strings, tuples as lists (JSON)."""
    if isinstance(value, enum.Enum):
        return value.value
    return list(value) if isinstance(value, tuple) else value


def _default(cls: type, f: dataclasses.Field) -> Any:
    """A field's default; `None` ("unset") becomes a placeholder typed from the field's annotation."""
    if f.default is not None:
        value = _plain(f.default)
        return tuple(value) if isinstance(value, list) else value
    from ml_collections import config_dict

    return config_dict.placeholder(scalar_type(hints(cls)[f.name]))


def base_config() -> Any:
    """A `ConfigDict` holding every field at its default, so any field can be overridden from the
    command line. Config files start from it. Loss fields are typed placeholders (`None` = the
    chosen algorithm's recipe default), so `--config.loss.algorithm=grpo` changes only the recipe."""
    from ml_collections import config_dict

    root = config_dict.ConfigDict()
    for name, cls in [*SECTIONS.items(), ("loss", LossConfig)]:
        root[name] = config_dict.ConfigDict({f.name: _default(cls, f) for f in dataclasses.fields(cls)})
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
            raise ConfigError(f"unknown config field {'.'.join(path)}{_suggest('.'.join(path), known)}")
        if path[1] not in base[path[0]]:
            name = ".".join(path)
            raise ConfigError(f"unknown config field {name}{_suggest(path[1], list(base[path[0]]), name)}")


def exit_on_unknown_overrides(argv: list[str]) -> None:
    """`check_overrides` for a CLI's `__main__`: a one-line error and exit status 1, no traceback."""
    try:
        check_overrides(argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    """JSON-able resolved config (recipe defaults and derived fields filled in, enums as strings);
    saved with every checkpoint."""
    # vars(), not dataclasses.asdict: saving the config must not count as reading every field.
    return {f.name: {k: _plain(v) for k, v in vars(getattr(cfg, f.name)).items()} for f in dataclasses.fields(cfg)}
