"""Run configs: overrides, errors that name the field, and proof that every field is read."""

import re
from pathlib import Path

import pytest
from train_helpers import ROOT, load_config_file

from gtpo_jax.config import ConfigError, base_config, check_overrides, from_config_dict, from_dict, to_dict
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
    with pytest.raises(ConfigError, match=r"train\.prompts_per_step=6: must split into mini_batches x micro_batches"):
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
        recipe = LossConfig(algorithm=algorithm, **{k: c.loss[k] for k in documented})
        assert resolved == recipe
        plain = LossConfig(algorithm=algorithm)
        for name in LossConfig.__dataclass_fields__:
            if name not in documented:
                assert getattr(resolved, name) == getattr(plain, name), (path.name, algorithm, name)
