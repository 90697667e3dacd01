"""Run configs: overrides, errors that name the field, and proof that every field is read."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
from train_helpers import ROOT, load_config_file

from gtpo_jax.config import (
    DERIVED_LOSS_FIELDS,
    SECTIONS,
    ConfigError,
    base_config,
    check_overrides,
    from_config_dict,
    from_dict,
    to_dict,
)
from gtpo_jax.losses import LossConfig


def test_unknown_fields_and_sections_name_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config field train\.stepz; did you mean 'steps'\?"):
        from_dict({"train": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"unknown config section 'trian'; did you mean 'train'\?"):
        from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"unknown field loss\.eps_hihg; did you mean 'eps_high'\?"):
        from_dict({"loss": {"eps_hihg": 0.3}})
    with pytest.raises(ConfigError, match=r"loss\.eps_high=-0\.1: must be >= 0"):
        from_dict({"loss": {"eps_high": -0.1}})
    with pytest.raises(ConfigError, match=r"train\.prompts_per_step=6: must split into mini_batches = 4 equal parts"):
        from_dict({"train": {"prompts_per_step": 6, "mini_batches": 4}})
    with pytest.raises(ConfigError, match=r"optim\.schedule='linear': expected 'constant' or 'cosine'"):
        from_dict({"optim": {"schedule": "linear"}})


def test_command_line_overrides_are_checked_before_absl():
    import subprocess
    import sys

    args = [sys.executable, "-m", "gtpo_jax.train", "--config=configs/default.py", "--config.train.stepz=3"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        "error: unknown config field train.stepz; did you mean 'steps'?"
    )
    check_overrides(["--config.loss.eps_high=0.3", "--config=x.py", "--other=1"])  # fine
    with pytest.raises(ConfigError, match=r"unknown config field trian\.steps; did you mean 'train\.steps'\?"):
        check_overrides(["--config.trian.steps=3"])


def test_swapping_the_algorithm_changes_only_the_recipe():
    c = load_config_file("configs/default.py")
    gtpo = from_config_dict(c)
    c.loss.algorithm = "grpo"
    grpo = from_config_dict(c)
    assert (gtpo.loss.eps_high, grpo.loss.eps_high, grpo.loss.kl_coef) == (0.28, 0.2, 0.04)
    assert grpo.loss == LossConfig(algorithm="grpo", group_size=8)
    a, b = to_dict(gtpo), to_dict(grpo)
    assert {k: v for k, v in a.items() if k != "loss"} == {k: v for k, v in b.items() if k != "loss"}


def test_every_override_path_exists_in_the_base_config():
    """`--config.section.field=...` works for every field: config files start from base_config()."""
    flat = {f"{s}.{k}" for s, section in base_config().items() for k in section}
    cfg = from_config_dict(base_config())
    assert flat == {f"{s}.{k}" for s, section in to_dict(cfg).items() for k in section}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.py")))
def test_shipped_configs_validate(path):
    cfg = from_config_dict(load_config_file(path))
    assert cfg.loss.group_size >= 2


def test_every_loss_field_is_read_by_the_loss_module():
    source = "".join(p.read_text() for p in Path(ROOT / "gtpo_jax" / "losses").glob("*.py"))
    unread = [f for f in LossConfig.__dataclass_fields__ if f != "algorithm" and not re.search(rf"cfg\.{f}\b", source)]
    assert unread == []


def _config_module(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.name)
def test_configs_set_only_documented_loss_fields_so_every_algorithm_gets_its_recipe(path):
    from gtpo_jax.losses import RECIPES

    module = _config_module(path)
    documented = module.LOSS_OVERRIDES  # field -> why this config sets it
    assert all(isinstance(why, str) and why for why in documented.values())
    c = module.get_config()
    set_here = {k for k, v in c.loss.items() if v is not None and k != "algorithm"}
    assert set_here == set(documented), f"{path.name} sets loss fields {sorted(set_here - set(documented))} silently"
    for algorithm in RECIPES:
        c.loss.algorithm = algorithm
        resolved = from_config_dict(c).loss
        # Derived fields (loss.max_response_len) come from their section when the recipe reads them.
        derived = {name: getattr(resolved, name) for name in DERIVED_LOSS_FIELDS if getattr(resolved, name) is not None}
        assert derived == {name: c[s][f] for name, (s, f) in DERIVED_LOSS_FIELDS.items() if name in derived}
        recipe = LossConfig(algorithm=algorithm, **{k: c.loss[k] for k in documented}, **derived)
        assert resolved == recipe
        plain = LossConfig(algorithm=algorithm)
        for name in LossConfig.__dataclass_fields__:
            if name not in documented and name not in derived:
                assert getattr(resolved, name) == getattr(plain, name), (path.name, algorithm, name)


# (section, field, a bad value, what the message says after "section.field=value: ").
BAD_VALUES = [
    ("model", "param_dtype", "float16", "expected 'float32' or 'bfloat16'; did you mean 'bfloat16'?"),
    ("model", "dtype", "fp32", "expected 'float32' or 'bfloat16'"),
    ("model", "remat", 1, "expected true or false"),
    ("model", "vocab_chunk", 0, "must be >= 1"),
    ("model", "token_chunk", 0, "must be >= 1"),
    ("tokenizer", "kind", "sentencepeice", "expected 'char', 'hf' or 'sentencepiece'; did you mean 'sentencepiece'?"),
    ("tokenizer", "chat_template", "chat_ml", "expected 'chatml', 'plain' or 'raw'; did you mean 'chatml'?"),
    ("data", "source", "json", "expected 'task', 'jsonl', 'parquet' or 'tfds'; did you mean 'jsonl'?"),
    ("data", "fields", "gsm8", "expected 'gsm8k', 'math' or 'dapo'; did you mean 'gsm8k'?"),
    ("data", "task", "countdwn", "expected 'arithmetic', 'countdown' or 'chain'; did you mean 'countdown'?"),
    ("data", "prompt_style", "compat", "expected 'instruction' or 'compact'; did you mean 'compact'?"),
    ("data", "difficulty", 0, "must be >= 1"),
    ("data", "num_train", 0, "must be >= 1"),
    ("data", "num_test", 0, "must be >= 1"),
    ("data", "operations", "+/", "expected a non-empty subset of '+-*'"),
    ("data", "max_prompt_tokens", 0, "must be >= 1"),
    ("rollout", "max_new_tokens", 0, "must be >= 1"),
    ("rollout", "temperature", -0.5, "must be >= 0 (0 = greedy)"),
    ("rollout", "top_k", -1, "must be >= 0 (0 = off)"),
    ("rollout", "top_p", 1.5, "must be in (0, 1]"),
    ("rollout", "top_p", 0.0, "must be in (0, 1]"),
    ("rollout", "top_p", "high", "expected a number"),
    ("rollout", "prompt_buckets", (), "must be a non-empty increasing list of lengths >= 1"),
    ("rollout", "prompt_buckets", (64, 32), "must be a non-empty increasing list of lengths >= 1"),
    ("rollout", "prompt_buckets", (16, "32"), "expected a list of integers"),
    ("rollout", "max_refill_rounds", -1, "must be >= 0"),
    ("rollout", "batch_size", -8, "must be >= 0 (0 = the whole step in one sampler call)"),
    ("reward", "num_workers", 0, "must be >= 1"),
    ("reward", "timeout_s", 0.0, "must be > 0"),
    ("reward", "max_invalid_frac", 1.5, "must be in [0, 1]"),
    ("reward", "rel_tol", -1e-9, "must be >= 0"),
    ("optim", "learning_rate", 0.0, "must be > 0"),
    ("optim", "warmup_steps", -1, "must be >= 0"),
    ("optim", "schedule", "cosin", "expected 'constant' or 'cosine'; did you mean 'cosine'?"),
    ("optim", "weight_decay", -0.1, "must be >= 0"),
    ("optim", "b1", 1.0, "must be in [0, 1)"),
    ("optim", "b2", -0.1, "must be in [0, 1)"),
    ("optim", "max_grad_norm", -1.0, "must be >= 0 (0 = off)"),
    ("warmup", "steps", -1, "must be >= 0 (0 = off)"),
    ("warmup", "batch_size", 0, "must be >= 1"),
    ("warmup", "learning_rate", 0.0, "must be > 0"),
    ("train", "steps", 0, "must be >= 1"),
    ("train", "steps", 2.5, "expected an integer"),
    ("train", "prompts_per_step", 0, "must be >= 1"),
    ("train", "ppo_epochs", 0, "must be >= 1"),
    ("train", "mini_batches", 0, "must be >= 1"),
    ("train", "micro_batch_size", -4, "must be >= 0 (0 = the whole mini-batch)"),
    ("train", "resume", "nevr", "expected 'auto' or 'never'; did you mean 'never'?"),
    ("train", "run_dir", "", "must name a directory"),
    ("train", "checkpoint_every", -1, "must be >= 0 (0 = only at the end)"),
    ("train", "keep_checkpoints", 0, "must be >= 1"),
    ("train", "log_every", 0, "must be >= 1"),
    ("train", "stop_after", -1, "must be >= 0 (0 = no limit)"),
    ("eval", "every", -1, "must be >= 0 (0 = only at start and end)"),
    ("eval", "every_responses", -1, "must be >= 0 (0 = off)"),
    ("eval", "num_prompts", 0, "must be >= 1"),
    ("eval", "samples", 0, "must be >= 1"),
    ("eval", "temperature", -1.0, "must be >= 0 (0 = greedy)"),
    ("mesh", "data", 0, "must be >= 1, or -1 (the rest)"),
    ("mesh", "fsdp", -2, "must be >= 1, or -1 (the rest)"),
    ("mesh", "tensor", 0, "must be >= 1, or -1 (the rest)"),
    ("mesh", "data", -1, "at most one of data, fsdp, tensor may be -1"),  # fsdp is -1 by default
    ("mesh", "dcn_data", 0, "must be >= 1"),
    ("loss", "group_size", 0, "must be >= 1"),
]


@pytest.mark.parametrize("section, field, value, what", BAD_VALUES, ids=lambda x: str(x)[:20])
def test_a_bad_value_is_an_error_naming_the_field_as_the_user_wrote_it(section, field, value, what):
    """Every check happens here, before sampler / pipeline / trainer see the value under another name."""
    with pytest.raises(ConfigError) as e:
        from_dict({section: {field: value}})
    assert str(e.value) == f"{section}.{field}={value!r}: {what}"


def test_checks_that_span_fields_name_the_field_to_change():
    def error(values):
        with pytest.raises(ConfigError) as e:
            from_dict(values)
        return str(e.value)

    assert error({"eval": {"every": 5, "every_responses": 4096}}) == (
        "eval.every_responses=4096: and eval.every=5 are both set: choose one cadence (steps or responses)"
    )
    assert error({"data": {"source": "jsonl"}}) == (
        "data.path='': data.source='jsonl' needs data.path (a file, or the tfds builder name)"
    )
    assert error({"data": {"max_prompt_tokens": 100}, "rollout": {"prompt_buckets": (32, 64)}}) == (
        "data.max_prompt_tokens=100: must be <= the largest of rollout.prompt_buckets=[32, 64] "
        "(a longer prompt fits no bucket)"
    )
    assert error({"rollout": {"max_new_tokens": 8}, "loss": {"overlong_buffer_len": 16}}).startswith(
        "loss.overlong_buffer_len=16: must be <= rollout.max_new_tokens=8"
    )
    assert error({"train": {"prompts_per_step": 6, "mini_batches": 4}}).startswith("train.prompts_per_step=6: ")
    assert error({"rollout": {"batch_size": 12}, "loss": {"group_size": 8}}) == (
        "rollout.batch_size=12: must be 0 (the whole step in one sampler call) or a multiple of "
        "loss.group_size=8 (the 8 samples of a prompt are drawn in one call)"
    )
    assert from_dict({"rollout": {"batch_size": 16}, "loss": {"group_size": 8}}).rollout.batch_size == 16
    micro = "train.micro_batch_size={}: must be 0 (the whole mini-batch) or divide a mini-batch's 32 sequences "
    micro += "(train.prompts_per_step x loss.group_size / train.mini_batches)"
    sizes = {"loss": {"group_size": 4}, "train": {"prompts_per_step": 16, "mini_batches": 2}}
    for bad in (6, 12):  # sizes that do not divide the mini-batch
        sizes["train"]["micro_batch_size"] = bad
        assert error(sizes) == micro.format(bad)
    for good in (8, 2):  # whole groups, or half a group (a group straddles two micro-batches)
        sizes["train"]["micro_batch_size"] = good
        assert from_dict(sizes).train.micro_batch_size == good


def test_the_removed_micro_batches_field_names_its_replacement():
    """`train.micro_batches` (a count) became `train.micro_batch_size` (sequences): an old flag or
    config file is told how to convert, not pointed at `mini_batches`."""
    import subprocess
    import sys

    replaced = (
        "unknown config field train.micro_batches: replaced by train.micro_batch_size, the sequences (prompts x "
        "loss.group_size) of one micro-batch of the scoring pass and of the update, not their count: "
        "micro_batches=k is micro_batch_size = train.prompts_per_step x loss.group_size / train.mini_batches / k "
        "(0 = the whole mini-batch)"
    )
    with pytest.raises(ConfigError) as e:
        from_dict({"train": {"micro_batches": 2}})
    assert str(e.value) == replaced
    with pytest.raises(ConfigError) as e:
        check_overrides(["--config.train.micro_batches=2"])
    assert str(e.value) == replaced
    args = [sys.executable, "-m", "gtpo_jax.train", "--config=configs/default.py", "--config.train.micro_batches=2"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == f"error: {replaced}"


def test_modes_are_enums_parsed_from_plain_strings():
    from absl import flags
    from ml_collections import config_flags

    from gtpo_jax.config import Resume, Schedule, TokenizerKind

    argv = ["prog", "--config.train.resume=never", "--config.optim.schedule=cosine", "--config.tokenizer.kind=hf"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", base_config(), flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    cfg = from_config_dict(flag_values.config)
    assert (cfg.train.resume, cfg.optim.schedule, cfg.tokenizer.kind) == (Resume.NEVER, Schedule.COSINE, "hf")
    assert cfg.train.resume == "never" and cfg.tokenizer.kind is TokenizerKind.HF
    # A section built directly (dataclasses.replace in the trainer and tests) parses strings too.
    assert dataclasses.replace(cfg.optim, schedule="constant").schedule is Schedule.CONSTANT
    saved = to_dict(cfg)  # what a checkpoint stores: plain JSON
    assert type(saved["train"]["resume"]) is str and json.loads(json.dumps(saved)) == saved
    assert from_dict(saved) == cfg


def test_enum_choices_match_what_the_data_code_accepts():
    from gtpo_jax.config import ChatTemplate, FieldPreset, Task
    from gtpo_jax.data.sources import PRESETS
    from gtpo_jax.data.tasks import TASKS
    from gtpo_jax.data.tokenizer import CHAT_TEMPLATES

    assert set(Task) == set(TASKS) and set(FieldPreset) == set(PRESETS) and set(ChatTemplate) == set(CHAT_TEMPLATES)


def test_the_response_length_limit_is_derived_not_set_twice():
    limit = {"rollout": {"max_new_tokens": 12}}
    assert from_dict(limit).loss.max_response_len is None  # no overlong shaping: not read, not set
    shaped = from_dict({**limit, "loss": {"algorithm": "dapo", "overlong_buffer_len": 4}})
    assert shaped.loss.max_response_len == 12 and to_dict(shaped)["loss"]["max_response_len"] == 12
    assert from_dict({**limit, "loss": {"mask_truncated": True}}).loss.max_response_len == 12
    with pytest.raises(ConfigError) as e:
        from_dict({**limit, "loss": {"overlong_buffer_len": 4, "max_response_len": 12}})
    assert str(e.value) == "loss.max_response_len=12: derived from rollout.max_new_tokens; set that instead"
    c = load_config_file("configs/qwen2_5_7b_dapo_math.py")
    c.rollout.max_new_tokens = 16384
    assert from_config_dict(c).loss.max_response_len == 16384  # one setting moves both


def test_placeholders_are_typed_from_the_annotations():
    c = base_config()
    types = {(s, k): c[s].get_type(k) for s in ("reward", "loss") for k in c[s] if c[s][k] is None}
    assert types[("reward", "strict")] is bool and types[("reward", "rel_tol")] is float
    assert types[("loss", "group_size")] is int and types[("loss", "eps_high")] is float
    assert types[("loss", "loss_agg")] is str and types[("loss", "mask_truncated")] is bool


def test_the_config_classes_carry_no_read_tracking():
    """The "every field is read" test (test_trainer.py) records reads with tests/config_reads.py."""
    import gtpo_jax.config as config

    assert all(cls.__getattribute__ is object.__getattribute__ for cls in SECTIONS.values())
    assert not {"track_reads", "_READS", "_Tracked"} & set(vars(config))


def test_config_reads_counts_only_the_packages_own_reads():
    """The every-field-read test would pass vacuously if hashing a section (jit static arguments do)
    or copying it counted as reading every field."""
    from config_reads import ConfigReads

    from gtpo_jax.training.loop import rounds_left

    reads = ConfigReads()
    cfg = reads.track(from_dict({}))
    with reads:
        hash(cfg.train)
        assert cfg.train == cfg.train
        dataclasses.replace(cfg.train)
        assert reads.fields == set()
        rounds_left(cfg, 0)  # the package's own code reads the section
    assert reads.fields == {"TrainSection.max_sampled_responses"}


def test_knobs_without_effect_are_reported():
    from gtpo_jax.config import ignored_fields

    assert ignored_fields(from_dict({})) == []
    cfg = from_dict(
        {
            "loss": {"algorithm": "grpo"},  # no dynamic sampling
            "rollout": {"max_refill_rounds": 4, "temperature": 0.0, "top_p": 0.9},
            "warmup": {"learning_rate": 1e-3},
        }
    )
    assert ignored_fields(cfg) == [
        "rollout.max_refill_rounds=4 is ignored: loss.dynamic_sampling is off",
        "rollout.top_p=0.9 is ignored: rollout.temperature=0 samples greedily",
        "warmup.learning_rate=0.001 is ignored: warmup.steps=0",
    ]
    assert ignored_fields(from_dict({"loss": {"algorithm": "dapo"}, "rollout": {"max_refill_rounds": 4}})) == []


def test_resuming_under_another_experiments_config_is_refused():
    from gtpo_jax.config import check_resume, resume_changes

    saved = to_dict(from_dict({"loss": {"algorithm": "dapo"}, "train": {"steps": 10}}))
    longer = to_dict(from_dict({"loss": {"algorithm": "dapo"}, "train": {"steps": 20}, "eval": {"every": 5}}))
    assert resume_changes(saved, longer) == []  # more steps, another evaluation schedule: the same experiment
    other = to_dict(
        from_dict({"loss": {"algorithm": "gtpo"}, "train": {"steps": 10}, "optim": {"learning_rate": 1e-5}})
    )
    changes = resume_changes(saved, other)
    assert "loss.algorithm: 'dapo' -> 'gtpo'" in changes and "optim.learning_rate: 1e-06 -> 1e-05" in changes
    with pytest.raises(ConfigError, match=r"runs/x was written with a different config \(.*loss\.algorithm"):
        check_resume(saved, other, "runs/x")
    older = {section: {k: v for k, v in fields.items() if k != "top_k"} for section, fields in saved.items()}
    assert resume_changes(older, saved) == []  # a field an older checkpoint lacks is not a change
    # The update splits its LoRA-dropout key per micro-batch: another micro-batch size draws other masks.
    lora = {"model": {"lora_rank": 8, "lora_dropout": 0.1}, "loss": {"algorithm": "dapo"}}
    before = to_dict(from_dict({**lora, "train": {"micro_batch_size": 16}}))
    after = to_dict(from_dict({**lora, "train": {"micro_batch_size": 32}}))
    assert resume_changes(before, after) == ["train.micro_batch_size: 16 -> 32"]
    batch = to_dict(from_dict({**lora, "train": {"micro_batch_size": 16}, "rollout": {"batch_size": 64}}))
    assert resume_changes(before, batch) == []  # sampler calls draw the same tokens (tests/test_sampler.py)


def test_more_evaluation_samples_than_a_sampler_call_holds_is_refused():
    assert from_dict({"rollout": {"batch_size": 64}, "eval": {"samples": 64}}).eval.samples == 64
    assert from_dict({"rollout": {"batch_size": 64}, "eval": {"samples": 96, "temperature": 0.0}})  # greedy: 1
    with pytest.raises(ConfigError, match=r"^eval.samples=96: more than rollout.batch_size=64 sequences a sampler"):
        from_dict({"rollout": {"batch_size": 64}, "eval": {"samples": 96}})


def test_lora_dropout_with_a_sequence_level_ratio_is_refused():
    """Dropout acts in the update but not in scoring, so no ratio starts at 1; GSPO's 3e-4 sequence
    clip would clip nearly every response and the gradient would vanish without a word."""
    assert from_dict({"model": {"lora_rank": 8, "lora_dropout": 0.1}, "loss": {"algorithm": "dapo"}})
    for algorithm in ("gspo", "grpo_s"):
        with pytest.raises(ConfigError, match=rf"^model.lora_dropout=0.1: loss.algorithm='{algorithm}' clips one"):
            from_dict({"model": {"lora_rank": 8, "lora_dropout": 0.1}, "loss": {"algorithm": algorithm}})
