"""Recipes, the validated config, reward shaping and dynamic sampling on the loss side."""

import ast
import contextlib
import dataclasses
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_invariants as invariants
import test_loss_honesty as honesty
from rollouts import make_rollout

import gtpo_jax.losses as losses_package
from gtpo_jax.losses import (
    RECIPES,
    ConfigError,
    GTPONorm,
    LossAgg,
    LossConfig,
    RatioLevel,
    Recipe,
    compute_loss,
    finalize_diagnostics,
    gtpo_advantages,
    informative_groups,
    mean_loss,
    overlong_penalty,
    prepare_batch,
    register,
)
from gtpo_jax.losses.config import BASE_DEFAULTS, FIELDS


def test_recipe_defaults():
    grpo, dapo, gtpo, grpo_s = (LossConfig(algorithm=a) for a in ("grpo", "dapo", "gtpo", "grpo_s"))
    assert (grpo.eps_low, grpo.eps_high, grpo.loss_agg, grpo.kl_coef) == (0.2, 0.2, "seq_mean_token_mean", 0.04)
    assert not grpo.dynamic_sampling
    for cfg in (dapo, gtpo, grpo_s):
        assert (cfg.eps_low, cfg.eps_high, cfg.kl_coef, cfg.dynamic_sampling) == (0.2, 0.28, 0.0, True)
    assert dapo.loss_agg == gtpo.loss_agg == LossAgg.TOKEN_MEAN
    assert grpo_s.loss_agg == LossAgg.SEQ_MEAN_TOKEN_MEAN and grpo_s.recipe.ratio_level is RatioLevel.SEQUENCE
    assert (gtpo.alpha1, gtpo.alpha2, gtpo.gtpo_norm, gtpo.norm_scope) == (1.0, 0.1, "paper", "group")
    assert (grpo_s.beta1, grpo_s.beta2, grpo_s.grpo_s_norm) == (1.0, 0.1, "paper")
    assert LossConfig().algorithm == "gtpo"
    # An explicit value beats the recipe default; the config is frozen and hashable (jit static arg).
    assert LossConfig(algorithm="grpo", eps_high=0.3).eps_high == 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        gtpo.eps_high = 1.0
    assert hash(gtpo) == hash(LossConfig(algorithm="gtpo"))


def test_plain_strings_equal_enum_members():
    assert LossConfig(loss_agg="token_mean") == LossConfig(loss_agg=LossAgg.TOKEN_MEAN)
    assert isinstance(LossConfig(gtpo_norm="joint").gtpo_norm, GTPONorm)
    ro = make_rollout(seed=20)
    a = gtpo_advantages(ro.rewards, ro.entropy, ro.mask, norm="own_set", scope="batch")
    b = gtpo_advantages(ro.rewards, ro.entropy, ro.mask, norm=GTPONorm.OWN_SET, scope="batch")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"norm='papr'.*'paper', 'own_set', 'joint'"):
        gtpo_advantages(ro.rewards, ro.entropy, ro.mask, norm="papr")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(eps_high=-0.1), r"loss\.eps_high=-0\.1: must be >= 0"),
        (dict(eps_low=1.0), r"loss\.eps_low=1\.0"),
        (dict(group_size=1), r"loss\.group_size=1: gtpo compares responses within a group and needs group_size >= 2"),
        (dict(alpha2=-0.5), r"loss\.alpha2=-0\.5: must be >= 0"),
        (dict(beta2=-1.0), r"loss\.beta2"),
        (dict(kl_coef=-1.0), r"loss\.kl_coef"),
        (dict(dual_clip=0.5), r"loss\.dual_clip=0\.5: must be > 1"),
        (dict(eps=0.0), r"loss\.eps=0\.0"),
        (dict(algorithm="gtpoo"), r"unknown loss\.algorithm='gtpoo'; did you mean 'gtpo'\?"),
        (dict(loss_agg="mean"), r"loss\.loss_agg='mean' is not a valid choice"),
        (dict(overlong_buffer_len=512, max_response_len=256), r"loss\.overlong_buffer_len=512"),
        (dict(overlong_buffer_len=512), r"max_response_len \(= 0\)"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LossConfig(**kwargs)


def test_from_dict_rejects_unknown_fields_with_a_suggestion():
    cfg = LossConfig.from_dict({"algorithm": "dapo", "eps_high": 0.3})
    assert cfg == LossConfig(algorithm="dapo", eps_high=0.3)
    with pytest.raises(ConfigError, match=r"unknown field loss\.eps_hihg; did you mean 'eps_high'\?"):
        LossConfig.from_dict({"eps_hihg": 0.3})


def _rloo(cfg, x):
    """RLOO: leave-one-out baseline over the group's valid responses, A_i = r_i - mean_{j != i} r_j
    (= G/(G-1) (r_i - mean r)), with the overlong penalty in r."""
    v = x.valid.astype(x.rewards.dtype)
    r = (x.rewards + x.penalty) * v
    baseline = (r.sum(-1, keepdims=True) - r) / jnp.maximum(v.sum(-1, keepdims=True) - 1, 1)
    return ((r - baseline) * v)[..., None] * x.mask


@contextlib.contextmanager
def registered_rloo():
    """The throwaway RLOO recipe, registered for the block and removed afterwards."""
    recipe = register(name="loo_demo", advantages=_rloo, ratio_level=RatioLevel.TOKEN, doc="RLOO test recipe")
    try:
        yield recipe
    finally:
        del RECIPES["loo_demo"]


def test_adding_an_algorithm_is_one_function_and_one_entry():
    with registered_rloo():
        cfg = LossConfig(algorithm="loo_demo", group_size=4)
        rewards = np.array([[1.0, 0.0, 0.0, 0.0]])
        mask = np.ones((1, 4, 3), np.float32)
        batch, _ = prepare_batch(cfg, rewards=rewards, mask=mask, old_logp=np.zeros_like(mask), entropy=mask)
        # A_0 = 1 - 0 = 1, A_j = 0 - 1/3 for the others.
        np.testing.assert_allclose(batch.advantages[0, :, 0], [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)
        assert np.isfinite(mean_loss(cfg, jnp.zeros_like(mask), batch))
    with pytest.raises(ValueError, match="missing"):
        register(name="broken", advantages=_rloo, ratio_level=RatioLevel.TOKEN, defaults={"eps_lo": 0.2}, doc="typo")


def test_a_registered_recipe_is_resolved_by_loss_config_and_exercised_by_the_every_recipe_checks():
    with registered_rloo() as recipe:
        assert isinstance(recipe, Recipe) and RECIPES["loo_demo"] is recipe
        # Resolved: the base defaults (DAPO's objective), the fields it reads, None for the others.
        cfg = LossConfig(algorithm="loo_demo")
        assert cfg.recipe is recipe and dict(recipe.defaults) == dict(BASE_DEFAULTS)
        assert (cfg.eps_low, cfg.eps_high, cfg.loss_agg, cfg.kl_coef, cfg.dynamic_sampling) == (
            0.2,
            0.28,
            LossAgg.TOKEN_MEAN,
            0.0,
            True,
        )
        assert cfg.eps is None and cfg.alpha2 is None and cfg.scale_rewards is None
        with pytest.raises(ConfigError, match=r"loss\.alpha2=0\.2 is not read by algorithm 'loo_demo'.*\(gtpo\)"):
            LossConfig(algorithm="loo_demo", alpha2=0.2)
        # Exercised: the checks that run over every registered recipe take it like a built-in one.
        honesty.test_each_field_a_recipe_reads_changes_its_loss_or_gradient("loo_demo")
        honesty.test_setting_a_field_the_algorithm_does_not_read_is_an_error("loo_demo")
        honesty.test_longer_wrong_response_in_the_buffer_gets_a_lower_advantage("loo_demo")
        honesty.test_invalid_response_is_excluded_as_if_it_had_not_been_sampled("loo_demo")
        honesty.test_mask_truncated_decides_the_sets_on_the_responses_that_remain("loo_demo")
        honesty.test_wrong_sign_fractions_are_reported_exactly("loo_demo", 1)
        invariants.test_1_padding_garbage_changes_nothing({"algorithm": "loo_demo"})
        invariants.test_8_degenerate_inputs_are_finite({"algorithm": "loo_demo"})
        invariants.test_9_gradient_matches_finite_differences({"algorithm": "loo_demo"})
    assert "loo_demo" not in RECIPES
    with pytest.raises(ConfigError, match="unknown loss.algorithm='loo_demo'"):
        LossConfig(algorithm="loo_demo")


def test_register_refuses_a_bad_recipe_and_leaves_the_table_as_it_was():
    kw = dict(advantages=_rloo, ratio_level=RatioLevel.TOKEN, doc="bad")
    before = dict(RECIPES)
    with pytest.raises(ValueError, match="'gtpo' is already registered"):
        register(name="gtpo", **kw)
    with pytest.raises(ValueError, match=r"reads fields missing from LossConfig: \['alpha3'\]; did you mean 'alpha2'"):
        register(name="bad", reads=("alpha3",), **kw)
    with pytest.raises(ValueError, match=r"sets defaults for fields it does not read: \['alpha2'\]"):
        register(name="bad", defaults={"alpha2": 0.2}, **kw)
    with pytest.raises(ConfigError, match=r"recipe 'bad' defaults: loss\.eps_low=1\.5: must be in \[0, 1\)"):
        register(name="bad", defaults={"eps_low": 1.5}, **kw)
    with pytest.raises(ValueError, match=r"ratio_level='tokn' is not a valid choice"):
        register(name="bad", advantages=_rloo, ratio_level="tokn", doc="bad")
    assert RECIPES == before


def test_recipe_defaults_are_the_base_defaults_and_their_differences():
    for recipe in RECIPES.values():
        assert set(recipe.defaults) == FIELDS
    differences = {
        name: {k: v for k, v in recipe.defaults.items() if v != BASE_DEFAULTS[k]} for name, recipe in RECIPES.items()
    }
    assert differences == {
        "grpo": {"eps_high": 0.2, "loss_agg": "seq_mean_token_mean", "kl_coef": 0.04, "dynamic_sampling": False},
        "dapo": {},
        "gtpo": {},
        "grpo_s": {"loss_agg": "seq_mean_token_mean"},
        "rloo": {"eps_high": 0.2, "loss_agg": "seq_mean_token_sum_norm", "dynamic_sampling": False},
        "dr_grpo": {"eps_high": 0.2, "loss_agg": "seq_mean_token_sum_norm", "dynamic_sampling": False},
        "gspo": {"eps_low": 3e-4, "eps_high": 4e-4, "loss_agg": "seq_mean_token_mean", "dynamic_sampling": False},
    }
    # The pure functions take their keyword defaults from the same mapping.
    sig = inspect.signature(gtpo_advantages).parameters
    assert (sig["alpha1"].default, sig["alpha2"].default, sig["eps"].default) == tuple(
        BASE_DEFAULTS[k] for k in ("alpha1", "alpha2", "eps")
    )


def _imports(path: pathlib.Path) -> set[str]:
    """Every `gtpo_jax` module `path` imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in out if name.startswith("gtpo_jax")}


def test_the_loss_modules_import_each_other_without_a_cycle():
    package = pathlib.Path(losses_package.__file__).parent
    modules = {f"gtpo_jax.losses.{p.stem}": p for p in package.glob("*.py") if p.stem != "__init__"}
    graph = {name: _imports(path) & set(modules) for name, path in modules.items()}
    assert graph["gtpo_jax.losses.registry"] >= {"gtpo_jax.losses.config"}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for target in sorted(graph[name]):
                visit(target, (*path, name))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())
    # The package itself is imported by none of its modules (they import each other directly).
    assert all("gtpo_jax.losses" not in _imports(path) for path in modules.values())


def _host_sets(cfg, rewards, remaining):
    correct = (np.asarray(rewards) > cfg.success_threshold) & remaining
    informative = (correct & remaining).any(-1) & (~correct & remaining).any(-1)
    return correct, informative


@pytest.mark.parametrize("algorithm", sorted(RECIPES))
def test_given_correct_and_informative_give_bit_identical_outputs(algorithm):
    ro = make_rollout(seed=23, P=3, G=5, T=7, empty_response=False)
    ro.rewards[2] = 1.0  # an uninformative group
    ro.lengths[:, 0] = 7  # truncated responses, masked under mask_truncated
    mask = _mask(ro.lengths, 7)
    valid = np.ones((3, 5), bool)
    valid[1, 3] = False
    cfg = LossConfig(algorithm=algorithm, group_size=5, mask_truncated=True, max_response_len=7)
    kw = dict(rewards=ro.rewards, mask=mask, old_logp=ro.old_logp, entropy=ro.entropy, lengths=ro.lengths, valid=valid)
    computed = prepare_batch(cfg, **kw, ref_logp=ro.ref_logp)
    correct, informative = _host_sets(cfg, ro.rewards, valid & (ro.lengths < 7))
    assert informative.tolist() == [True, True, False]
    given = prepare_batch(cfg, **kw, ref_logp=ro.ref_logp, correct=correct, informative=informative)
    leaves_c, tree_c = jax.tree.flatten(computed)
    leaves_g, tree_g = jax.tree.flatten(given)
    assert tree_c == tree_g
    for a, b in zip(leaves_c, leaves_g, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("algorithm", ["gtpo", "grpo_s"])
def test_a_given_correct_is_used(algorithm):
    ro = make_rollout(seed=24, empty_response=False)
    cfg = LossConfig(algorithm=algorithm, group_size=6)
    correct, informative = _host_sets(cfg, ro.rewards, np.ones(ro.rewards.shape, bool))
    base, _ = prepare_batch(cfg, **ro.loss_inputs(), correct=correct, informative=informative)
    correct[:, 1] = ~correct[:, 1]  # move response 1 of every group to the other set ...
    moved, _ = prepare_batch(cfg, **ro.loss_inputs(), correct=correct, informative=informative)
    np.testing.assert_array_equal(moved.correct, correct)
    changed = np.asarray(moved.advantages) != np.asarray(base.advantages)
    assert (changed if changed.ndim == 2 else changed.any(-1))[:, 1].all()  # ... and its advantage moves
    # A given `informative` decides which groups dynamic sampling keeps.
    none, _ = prepare_batch(cfg, **ro.loss_inputs(), informative=np.zeros(4, bool))
    assert not np.asarray(none.mask).any()
    with pytest.raises(ValueError, match=r"correct must have shape \(4, 6\)"):
        prepare_batch(cfg, **ro.loss_inputs(), correct=correct[:, :5])


def test_overlong_penalty_golden():
    # max_len 10, buffer 4: free up to 6 tokens, then -(L - 6)/4, -1 at 10 and beyond.
    lengths = np.array([[3, 6, 7, 8, 10, 12]])
    np.testing.assert_allclose(
        overlong_penalty(lengths, max_len=10, buffer_len=4), [[0, 0, -0.25, -0.5, -1, -1]], atol=1e-7
    )
    np.testing.assert_allclose(overlong_penalty(lengths, max_len=10, buffer_len=4, penalty=0.5)[0, 3], -0.25)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, max_len=10, buffer_len=0)
    with pytest.raises(ValueError, match="must not exceed max_len"):
        overlong_penalty(lengths, max_len=10, buffer_len=11)


def test_informative_groups_decide_on_correctness_not_shaped_reward():
    rewards = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.9, 0.7, 0.6]])
    np.testing.assert_array_equal(informative_groups(rewards), [True, False, False, False])
    np.testing.assert_array_equal(informative_groups(rewards, success_threshold=0.65), [True, False, False, True])


def _mask(lengths, T):
    return (np.arange(T)[None, None, :] < np.asarray(lengths)[..., None]).astype(np.float32)


def test_overlong_shaping_keeps_success_on_the_verifier_reward():
    cfg = LossConfig(algorithm="dapo", group_size=3, overlong_buffer_len=4, max_response_len=8)
    lengths = np.array([[8, 2, 6]])  # 8 = limit: full penalty; 6: -(6 - 4)/4 = -0.5
    rewards = np.array([[1.0, 0.0, 1.0]])
    mask = _mask(lengths, 8)
    batch, diag = prepare_batch(cfg, rewards=rewards, mask=mask, old_logp=mask * 0, entropy=mask, lengths=lengths)
    np.testing.assert_array_equal(batch.correct, [[True, False, True]])  # 1 - 1 = 0 is still a success
    d = finalize_diagnostics(diag)
    np.testing.assert_allclose(d["shaped_reward_mean"], (0.0 + 0.0 + 0.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(d["pass_rate"], 2 / 3, rtol=1e-6)
    # GRPO advantages of the shaped rewards [0, 0, 0.5]: mean 1/6, std sqrt(1/18).
    std = np.sqrt(((1 / 6) ** 2 * 2 + (1 / 3) ** 2) / 3)
    np.testing.assert_allclose(batch.advantages[0, :, 0], np.array([-1 / 6, -1 / 6, 1 / 3]) / (std + 1e-6), rtol=1e-5)
    with pytest.raises(ValueError, match="lengths"):
        prepare_batch(cfg, rewards=rewards, mask=mask, old_logp=mask * 0, entropy=mask)


def test_mask_truncated_removes_truncated_responses_from_the_loss():
    cfg = LossConfig(algorithm="dapo", group_size=3, mask_truncated=True, max_response_len=8)
    lengths = np.array([[8, 2, 5]])
    mask = _mask(lengths, 8)
    batch, _ = prepare_batch(
        cfg, rewards=np.array([[1.0, 0.0, 1.0]]), mask=mask, old_logp=mask * 0, entropy=mask, lengths=lengths
    )
    assert np.all(batch.mask[0, 0] == 0) and batch.mask[0, 1].sum() == 2 and batch.mask[0, 2].sum() == 5
    # An explicit `truncated` flag wins over the length rule (the group stays informative).
    batch, _ = prepare_batch(
        cfg,
        rewards=np.array([[1.0, 0.0, 0.0]]),
        mask=mask,
        old_logp=mask * 0,
        entropy=mask,
        lengths=lengths,
        truncated=np.array([[False, True, False]]),
    )
    assert batch.mask[0, 0].sum() == 8 and batch.mask[0, 1].sum() == 0


@pytest.mark.parametrize(("algorithm", "drops"), [("dapo", True), ("grpo", False)])
def test_dynamic_sampling_removes_uninformative_groups_from_numerator_and_denominator(algorithm, drops):
    ro = make_rollout(seed=21, P=3)
    ro.rewards[2] = 1.0  # prompt 2: all correct -> uninformative
    cfg = LossConfig(algorithm=algorithm, group_size=6, kl_coef=0.0, loss_agg="token_mean")
    batch, diag = prepare_batch(cfg, **ro.loss_inputs(ref=False))
    out = compute_loss(cfg, jnp.asarray(ro.logp), batch)
    tokens_all, tokens_informative = ro.mask.sum(), ro.mask[:2].sum()
    assert float(out.denominator) == (tokens_informative if drops else tokens_all)
    np.testing.assert_allclose(finalize_diagnostics(diag)["informative_frac"], 2 / 3, rtol=1e-6)
    # The uninformative group's log-probs do not move the loss either way (its advantage is 0) ...
    grad = jax.grad(lambda lp: compute_loss(cfg, lp, batch).loss_sum)(jnp.asarray(ro.logp))
    assert np.all(np.asarray(grad)[2] == 0)


def test_group_size_must_match_the_rewards():
    ro = make_rollout(seed=22)
    with pytest.raises(ValueError, match=r"G = loss\.group_size = 8; got \(4, 6\)"):
        prepare_batch(LossConfig(group_size=8), **ro.loss_inputs(ref=False))
