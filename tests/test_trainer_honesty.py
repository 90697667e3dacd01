"""The trainer never fails silently (issue "Every run honest"): empty optimiser steps, reward
failures, misconfigured rewards, the learning-rate warm-up's unit, bfloat16 master weights, the
KL reference across a preemption, and rows that stay sharded."""

import dataclasses
from dataclasses import replace
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reward_helpers import always_fails, fails_on_odd_length
from train_helpers import tiny_config

from gtpo_jax.config import ConfigError, from_dict
from gtpo_jax.models.sharding import make_mesh
from gtpo_jax.parallel.placement import Placement
from gtpo_jax.rewards.pool import RewardPool
from gtpo_jax.rewards.registry import RewardConfigError, RewardSpec
from gtpo_jax.training.collect import spread_fillers
from gtpo_jax.training.loop import RewardHealthError, Trainer
from gtpo_jax.training.state import make_schedule


def _arrays(tree):
    return jax.tree.map(np.asarray, tree)


def _equal(a, b):
    return jax.tree.all(jax.tree.map(np.array_equal, _arrays(a), _arrays(b)))


@pytest.fixture
def trainer(tmp_path):
    # Plain GRPO without KL or dynamic sampling: every response token is in the loss.
    cfg = tiny_config(
        tmp_path,
        **{"loss.algorithm": "grpo", "loss.kl_coef": 0.0, "train.prompts_per_step": 8, "train.mini_batches": 2},
    )
    t = Trainer(cfg)
    yield t
    t.close()


# ---- 3. A mini-batch without loss tokens takes no optimiser step ----------------------------
def test_a_mini_batch_without_loss_tokens_does_not_move_the_weights(trainer):
    trainer.warmup()
    _, groups, loss_batch, _ = trainer.rollout()
    trainer.update(groups, loss_batch)  # a real step: AdamW's momentum is now non-zero
    before = (_arrays(trainer.state.params), _arrays(trainer.state.opt_state))
    empty = loss_batch._replace(mask=jnp.zeros_like(loss_batch.mask))
    metrics = trainer.update(groups, empty)
    assert metrics["empty_updates"] == 2 and metrics["skipped_updates"] == 0 and np.isnan(metrics["loss"])
    assert _equal(before, (trainer.state.params, trainer.state.opt_state))


def test_filler_groups_are_spread_so_no_mini_batch_is_only_filler():
    kept, fillers = ["a", "b", "c", "d"], ["w", "x", "y", "z"]
    order = spread_fillers(kept, fillers, 8, 4)
    assert [set(order[i : i + 2]) & set(kept) for i in range(0, 8, 2)] == [{"a"}, {"b"}, {"c"}, {"d"}]
    assert sorted(order) == sorted(kept + fillers)
    assert spread_fillers(kept, [], 4, 2) == kept  # a full batch keeps its order


# ---- 4. Reward failures are counted, masked, and can stop the run -------------------------
def test_a_reward_given_an_option_it_does_not_take_fails_at_start_up(tmp_path):
    # configs/default.py sets reward.answer_pattern; DAPO's rule reads "Answer:" lines and takes none.
    with pytest.raises(RewardConfigError, match=r"reward\.answer_pattern='.*' is set but reward 'dapo' does not take"):
        Trainer(tiny_config(tmp_path, **{"reward.name": "dapo"}))


def test_records_without_the_field_the_reward_reads_fail_at_start_up(tmp_path):
    with pytest.raises(RewardConfigError, match=r"record 1 \(id .*\): reward 'countdown' needs .* field 'numbers'"):
        Trainer(tiny_config(tmp_path, **{"reward.name": "countdown", "reward.answer_pattern": ""}))


def test_reward_errors_are_counted_and_left_out_of_the_loss(trainer):
    trainer.pool.close()
    trainer.pool = RewardPool(RewardSpec("flaky", fails_on_odd_length, needs=()), num_workers=1)
    batch, _, loss_batch, stats = trainer.rollout()
    tokens, mask = np.asarray(batch.rollout.tokens), np.asarray(batch.rollout.mask)
    odd = np.asarray(
        [
            [len(trainer.built.tok.decode(tokens[p, g][mask[p, g]])) % 2 for g in range(tokens.shape[1])]
            for p in range(tokens.shape[0])
        ],
        bool,
    )
    assert 0 < odd.mean() < 1
    assert np.array_equal(batch.valid, ~odd)
    assert (
        stats["reward_error_rate"] == pytest.approx(odd.mean())
        and stats["reward_invalid_rate"] == stats["reward_error_rate"]
    )
    assert stats["reward_timeout_rate"] == 0 and stats["reward_crash_rate"] == 0
    assert np.all(np.asarray(loss_batch.mask)[odd] == 0)  # not scored as wrong: not in the loss at all
    assert stats["valid_frac"] == pytest.approx(1 - odd.mean())


def test_a_step_with_too_many_invalid_rewards_stops_the_run(trainer):
    trainer.pool.close()
    trainer.pool = RewardPool(RewardSpec("broken", always_fails, needs=()), num_workers=1)
    why = r"100\.0% of the step's .*reward\.max_invalid_frac=0\.5.*first error: RuntimeError: verifier is broken"
    with pytest.raises(RewardHealthError, match=why):
        trainer.rollout()


# ---- 7. Smaller things ----------------------------------------------------------------------
def test_learning_rate_warm_up_counts_rl_steps():
    optim = replace(from_dict({}).optim, learning_rate=1.0, warmup_steps=10)
    schedule = make_schedule(optim, 16 * 100, updates_per_step=16)  # 16 mini-batches per RL step
    assert float(schedule(16 * 5)) == pytest.approx(0.5) and float(schedule(16 * 10)) == pytest.approx(1.0)


def test_bfloat16_parameters_are_refused_for_training():
    with pytest.raises(ConfigError, match=r"model\.param_dtype='bfloat16': training needs float32 master"):
        from_dict({"model": {"param_dtype": "bfloat16"}})
    from_dict({"model": {"dtype": "bfloat16"}})  # bf16 compute is fine


def test_kl_reference_survives_a_preemption_right_after_the_step_0_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, **{"loss.algorithm": "grpo", "train.steps": 1, "warmup.steps": 5})
    first = Trainer(cfg)
    real_save = Trainer.save

    def preempted(self):
        real_save(self)
        raise SystemExit("preempted")

    monkeypatch.setattr(Trainer, "save", preempted)
    with pytest.raises(SystemExit):
        first.run()
    first.close()
    monkeypatch.setattr(Trainer, "save", real_save)
    resumed = Trainer(cfg)
    try:
        result = resumed.run()  # restores step 0 and the reference
        assert int(resumed.state.step) == 1 and "final_eval" in result
        assert _equal(resumed.ref_params, first.state.params)
    finally:
        resumed.close()


def test_mini_batches_and_eval_chunks_stay_split_over_the_devices(tmp_path):
    assert jax.device_count() == 8
    cfg = tiny_config(tmp_path, **{"train.prompts_per_step": 8, "train.mini_batches": 2, "eval.num_prompts": 4})
    trainer = Trainer(cfg, mesh=make_mesh(fsdp=8))
    try:
        _, groups, loss_batch, _ = trainer.rollout()
        # The second mini-batch: prompts 4..7, not padded; the update re-splits its 16 sequence rows
        # into micro-batches padded to the 8 devices (tests/test_micro_batches.py).
        mini = trainer.built.fns.take((groups, loss_batch), jnp.int32(4))
        assert all(x.shape[0] == 4 for x in jax.tree.leaves(mini))
        assert np.array_equal(mini[0].tokens, groups.tokens[4:]) and np.array_equal(mini[1].mask, loss_batch.mask[4:])
        placed = []

        class Recording(Placement):
            def put(self, tree):
                placed.append(super().put(tree))
                return placed[-1]

        trainer.built = dataclasses.replace(trainer.built, place=Recording(trainer.built.mesh))
        result = trainer.evaluate(samples=2, num_prompts=4)
        assert result["prompts"] == 4 and placed
        assert all(not x.sharding.is_fully_replicated for x in jax.tree.leaves(placed))
    finally:
        trainer.close()


def test_math_only_reward_options_are_refused_for_other_rewards(tmp_path):
    with pytest.raises(RewardConfigError, match=r"reward\.strict=False is set but reward 'exact' does not take it"):
        Trainer(tiny_config(tmp_path, **{"reward.strict": False}))


# ---- Review fixes -------------------------------------------------------------------------
def test_a_stop_after_the_rollout_skips_the_update_and_rewinds_the_prompts(trainer):
    before = (trainer.pipeline.get_state(), _arrays(trainer.state.params), int(trainer.state.step))
    assert trainer.step(lambda: True) is None
    assert trainer.pipeline.get_state() == before[0]  # the resumed run samples the same prompts
    assert _equal(before[1], trainer.state.params) and int(trainer.state.step) == before[2]


def test_a_mini_batch_whose_gradient_is_zero_takes_no_step(trainer):
    # GRPO without KL or dynamic sampling: all-zero advantages have loss tokens but no gradient.
    trainer.warmup()
    _, groups, loss_batch, _ = trainer.rollout()
    trainer.update(groups, loss_batch)
    before = (_arrays(trainer.state.params), _arrays(trainer.state.opt_state))
    zero = loss_batch._replace(advantages=jnp.zeros_like(loss_batch.advantages))
    assert float(zero.mask.sum()) > 0
    metrics = trainer.update(groups, zero)
    assert metrics["empty_updates"] == 2
    assert _equal(before, (trainer.state.params, trainer.state.opt_state))


def test_under_mask_truncated_a_group_informative_only_through_truncated_responses_is_refilled(monkeypatch):
    from types import SimpleNamespace

    from gtpo_jax.rollout.sampler import Rollout
    from gtpo_jax.training import collect as collect_lib

    def part(rewards, truncated):
        P, G = rewards.shape
        zeros = jnp.zeros((P, G, 2), jnp.int32)
        rollout = Rollout(zeros, zeros > 0, zeros.astype(jnp.float32), jnp.full((P, G), 2), jnp.asarray(truncated, int))
        prompts = jnp.ones((P, 1), jnp.int32)
        return collect_lib.GroupBatch(
            [{"prompt": str(i)} for i in range(P)],
            prompts,
            prompts > 0,
            rollout,
            np.full((P, G), 2),
            truncated,
            rewards,
            np.zeros((P, G), np.int8),
            np.ones(P, int),
        )

    # Group 0 is mixed only through its truncated (correct) response; group 1 is really mixed.
    first = part(np.array([[1.0, 0, 0], [1, 0, 0]]), np.array([[True, False, False], [False] * 3]))
    second = part(np.array([[1.0, 0, 0], [0, 1, 0]]), np.zeros((2, 3), bool))
    parts = iter([first, second])
    monkeypatch.setattr(collect_lib, "draw", lambda *a, **k: next(parts))
    batches = iter([[{}, {}], [{}, {}]])
    cfg = from_dict({"loss": {"algorithm": "dapo", "group_size": 3, "mask_truncated": True},
                     "train": {"prompts_per_step": 2}, "rollout": {"max_refill_rounds": 1}})  # fmt: skip
    run = SimpleNamespace(
        cfg=cfg, place=Placement(make_mesh(fsdp=1, devices=jax.devices()[:1])), tok=SimpleNamespace(pad_id=0)
    )
    batch, _, stats = collect_lib.collect(run, None, None, batches, jax.random.key(0))
    assert stats["sampling_rounds"] == 2 and stats["informative_groups"] == 2
    assert np.array_equal(batch.rewards, [[1, 0, 0], [1, 0, 0]]) and not batch.truncated.any()


def test_informative_groups_are_counted_without_dynamic_sampling_too(monkeypatch):
    """GRPO keeps every group; `informative_groups` must still say how many carry a signal."""
    from types import SimpleNamespace

    from gtpo_jax.rollout.sampler import Rollout
    from gtpo_jax.training import collect as collect_lib

    P, G = 2, 3
    zeros = jnp.zeros((P, G, 2), jnp.int32)
    rollout = Rollout(zeros, zeros > 0, zeros.astype(jnp.float32), jnp.full((P, G), 2), jnp.zeros((P, G), int))
    prompts = jnp.ones((P, 1), jnp.int32)
    rewards = np.array([[1.0, 0, 0], [0, 0, 0]])  # group 1 is all wrong: no signal
    part = collect_lib.GroupBatch(
        [{}, {}],
        prompts,
        prompts > 0,
        rollout,
        np.full((P, G), 2),
        np.zeros((P, G), bool),
        rewards,
        np.zeros((P, G), np.int8),
        np.ones(P, int),
    )
    monkeypatch.setattr(collect_lib, "draw", lambda *a, **k: part)
    cfg = from_dict({"loss": {"algorithm": "grpo", "group_size": G}, "train": {"prompts_per_step": P}})
    mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
    run = SimpleNamespace(cfg=cfg, place=Placement(mesh), tok=SimpleNamespace(pad_id=0))
    batch, verdicts, stats = collect_lib.collect(run, None, None, iter([[{}, {}]]), jax.random.key(0))
    assert stats["informative_groups"] == 1 and verdicts.informative.tolist() == [True, False]


def test_selected_groups_are_padded_to_the_bucket_of_their_own_longest_prompt():
    """A refill round padded to a wide bucket (one long prompt) must not widen a batch whose selected
    prompts are all short: the update would pay for padding no selected prompt needs."""
    from types import SimpleNamespace

    from gtpo_jax.data.prompts import pad_prompts
    from gtpo_jax.rollout.sampler import Rollout
    from gtpo_jax.training import collect as collect_lib

    buckets = (4, 8)

    def part(prompt_ids):
        tokens, valid = pad_prompts(prompt_ids, buckets, 0)
        P, G = len(prompt_ids), 2
        zeros = jnp.zeros((P, G, 2), jnp.int32)
        rollout = Rollout(zeros, zeros > 0, zeros.astype(jnp.float32), jnp.full((P, G), 2), jnp.zeros((P, G), int))
        lengths = np.asarray([len(i) for i in prompt_ids])
        return collect_lib.GroupBatch(
            [{}] * P,
            jnp.asarray(tokens),
            jnp.asarray(valid),
            rollout,
            np.full((P, G), 2),
            np.zeros((P, G), bool),
            np.zeros((P, G), np.float32),
            np.zeros((P, G), np.int8),
            lengths,
        )

    wide, narrow = part([[5] * 7, [1, 2]]), part([[3, 4, 5]])
    cfg = from_dict({"rollout": {"prompt_buckets": list(buckets)}, "data": {"max_prompt_tokens": 8}})
    run = SimpleNamespace(
        cfg=cfg, place=Placement(make_mesh(fsdp=1, devices=jax.devices()[:1])), tok=SimpleNamespace(pad_id=0)
    )
    batch = collect_lib.select(run, [wide, narrow], [(0, 1), (1, 0)])
    np.testing.assert_array_equal(batch.prompts, [[0, 0, 1, 2], [0, 3, 4, 5]])
    np.testing.assert_array_equal(batch.prompt_lengths, [2, 3])
    batch = collect_lib.select(run, [wide, narrow], [(1, 0), (0, 0)])
    np.testing.assert_array_equal(batch.prompts, [[0, 0, 0, 0, 0, 3, 4, 5], [0] + [5] * 7])


def test_too_few_prompts_for_one_step_names_the_users_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.prompts_per_step=16: host 0 of 1 holds 4 prompts"):
        Trainer(tiny_config(tmp_path, **{"data.num_train": 4, "train.prompts_per_step": 16}))


def test_warmup_and_held_out_prompts_obey_the_prompt_length_limit(caplog):
    """RL drops prompts over `data.max_prompt_tokens`; the warm-up and the evaluation must see the same
    prompts (an over-long held-out prompt used to reach the padder and stop the run with a bare error)."""
    from gtpo_jax.training.build import load_data

    cfg = from_dict({"data": {"source": "task", "task": "countdown", "difficulty": 2, "num_train": 200,
                              "num_test": 100, "prompt_style": "compact", "max_prompt_tokens": 9}})  # fmt: skip
    encode = lambda record: list(record["prompt"])  # noqa: E731  (one token per character)
    train, test = load_data(cfg)
    fit_train, fit_test = load_data(cfg, encode)
    assert [r for r in train if len(r["prompt"]) <= 9] == fit_train and 0 < len(fit_train) < len(train)
    assert [r for r in test if len(r["prompt"]) <= 9] == fit_test and 0 < len(fit_test) < len(test)
    assert f"left out {len(test) - len(fit_test)} of {len(test)} held-out prompts longer than " in caplog.text


def test_prompts_per_step_the_batch_axes_cannot_split_are_warned_about():
    from gtpo_jax.training.build import _replicated_rows

    mesh = make_mesh(fsdp=8)
    assert _replicated_rows(from_dict({"train": {"prompts_per_step": 16}}), mesh) == []
    (line,) = _replicated_rows(from_dict({"train": {"prompts_per_step": 12}}), mesh)
    assert line.startswith("train.prompts_per_step=12 is not a multiple of the 8 devices along the batch axes")
    # Under jax.set_mesh a sampler call's rows (prompts x G) count, not its prompts: 4 x 4 on 8 devices is fine.
    one = {"train": {"prompts_per_step": 16}, "loss": {"algorithm": "dapo", "group_size": 4}}
    assert _replicated_rows(from_dict({**one, "rollout": {"batch_size": 16}}), mesh) == []
    (line,) = _replicated_rows(from_dict({**one, "rollout": {"batch_size": 12}}), mesh)
    assert line.startswith("rollout.batch_size=12 sequences a sampler call is not a multiple of the 8 devices")


# ---- Evaluation sampler calls split over the devices (issue 17) ------------------------------
def test_evaluation_chunks_keep_their_rows_a_multiple_of_the_batch_width():
    """The 7B config's evaluation (eval.samples = 32, rollout.batch_size = 256, 16 devices) draws
    8 prompts a call: 256 rows, split over the 16 devices under jax.set_mesh. 3 samples on 8
    devices need 8 prompts a call (24 rows), not the 10 that fit 32 sequences (30 rows)."""
    from gtpo_jax.training.build import eval_chunk

    seven_b = from_dict({"rollout": {"batch_size": 256}, "loss": {"algorithm": "dapo", "group_size": 16}})
    assert eval_chunk(seven_b, 16, 32, 30) == 8
    assert eval_chunk(seven_b, 16, 1, 30) == 32  # greedy: 30 prompts rounded up to 16 rows' multiple
    small = from_dict({"rollout": {"batch_size": 32}, "loss": {"algorithm": "dapo", "group_size": 4}})
    assert [eval_chunk(small, 8, k, 16) for k in (3, 4, 6, 8)] == [8, 8, 4, 4]
    assert eval_chunk(small, 8, 4, 3) == 4  # a few prompts: not more calls' worth than they need
    assert eval_chunk(from_dict({}), 8, 4, 100) == 64 and eval_chunk(from_dict({}), 8, 4, 3) == 8  # batch_size 0
    assert eval_chunk(small, 16, 3, 16) == 10  # 16 prompts x 3 > 32: none fits, the most that do (warned)
    four = from_dict({"rollout": {"batch_size": 4}, "loss": {"algorithm": "dapo", "group_size": 4}})
    with pytest.raises(ConfigError, match=r"^5 evaluation samples per prompt \(eval.samples, or evaluate's --samples"):
        eval_chunk(four, 8, 5, 8)


def test_an_evaluation_the_batch_axes_cannot_split_is_warned_about_at_build_time():
    from gtpo_jax.training.build import _replicated_rows

    dapo = {"loss": {"algorithm": "dapo", "group_size": 4}, "train": {"prompts_per_step": 16}}
    fits = from_dict({**dapo, "rollout": {"batch_size": 24}, "eval": {"samples": 3}})
    assert _replicated_rows(fits, make_mesh(fsdp=8), train=False) == []
    short = from_dict({**dapo, "rollout": {"batch_size": 12}, "eval": {"samples": 3}})
    (line,) = _replicated_rows(short, make_mesh(fsdp=8), train=False)  # greedy's 8 prompts x 1 fit
    assert line == (
        "eval.samples=3: no evaluation sampler call of whole prompts within rollout.batch_size=12 sequences is a "
        "multiple of the 8 devices along the batch axes (that takes 8 prompts x 3 samples = 24 sequences): the "
        "evaluation's decode is replicated on every device (8x the KV cache); raise rollout.batch_size to 24 or "
        "choose eval.samples so that it fits"
    )


def test_evaluation_draws_calls_of_rows_the_batch_axes_split(tmp_path):
    """3 samples of 16 held-out prompts on 8 devices with rollout.batch_size = 32: every sampler
    call holds a multiple of 8 rows (8 prompts x 3; greedy 16 x 1), none the 10 x 3 = 30 that
    fit the batch size; the result covers all 16 prompts."""
    from gtpo_jax.training.build import build, initial_params, load_data, reward_pool
    from gtpo_jax.training.evaluation import evaluate

    overrides = {"rollout.batch_size": 32, "eval.samples": 3, "eval.num_prompts": 16, "data.num_test": 16}
    cfg = tiny_config(tmp_path, **overrides)
    run = build(cfg, make_mesh(fsdp=8), train=False)
    _, test = load_data(cfg, run.encode)
    pool = reward_pool(cfg, [], test)
    try:
        result = evaluate(run, initial_params(run), pool, test)
    finally:
        pool.close()
    assert result["prompts"] == 16 and "avg@3" in result and "greedy_pass@1" in result
    calls = {(prompts, sampling.group_size) for prompts, _, sampling, _ in run.sampler_shapes}
    assert calls == {(8, 3), (16, 1)}, calls


def test_host_verdicts_follow_the_loss_rule():
    """The collector decides informativeness on the host (numpy); it must be the loss's own rule."""
    from gtpo_jax.losses.groups import informative_from_sets
    from gtpo_jax.training.collect import verdicts

    rng = np.random.default_rng(0)
    for _ in range(20):
        rewards = rng.choice([0.0, 0.3, 1.0], size=(6, 4)).astype(np.float32)
        status, truncated = rng.choice([0, 0, 0, 1], size=(6, 4)).astype(np.int8), rng.random((6, 4)) < 0.3
        batch = SimpleNamespace(rewards=rewards, valid=status == 0, truncated=truncated)
        for mask_truncated in (False, True):
            v = verdicts(batch, success_threshold=0.5, mask_truncated=mask_truncated)
            kept = (status == 0) & ~truncated if mask_truncated else status == 0
            np.testing.assert_array_equal(v.informative, informative_from_sets(rewards > 0.5, kept))
            assert v.informative.dtype == bool and isinstance(v.informative, np.ndarray)


# ---- Micro-batches mean the same thing everywhere (train.micro_batch_size) -----------------
@pytest.mark.parametrize(("micro_batch_size", "rows", "padded"), [(8, 8, 8), (2, 2, 8), (0, 16, 16)])
def test_scoring_chunks_and_update_micro_batches_hold_micro_batch_size_sequences(
    tmp_path, monkeypatch, micro_batch_size, rows, padded
):
    """8 prompts x G = 4, 2 mini-batches of 16 sequences: the scoring pass and the update's
    gradient accumulation both run the policy on `micro_batch_size` sequences (`rows`; 0 = a
    whole mini-batch), on 8 devices padded to a multiple of 8 sequences (`padded`), not of 8
    prompts (which made a micro-batch of 8 sequences 32)."""
    from gtpo_jax.training import update as update_module
    from gtpo_jax.training.build import build, initial_params
    from gtpo_jax.training.state import init_state

    seen, score = [], update_module.score

    def recording(model, prompts, prompt_valid, responses, *args, **kwargs):  # sequences at each trace
        seen.append(responses.shape[0] * responses.shape[1])
        return score(model, prompts, prompt_valid, responses, *args, **kwargs)

    monkeypatch.setattr(update_module, "score", recording)
    overrides = {"train.prompts_per_step": 8, "train.mini_batches": 2, "train.micro_batch_size": micro_batch_size}
    for mesh, width_rows in ((make_mesh(devices=jax.devices()[:1]), rows), (make_mesh(fsdp=8), padded)):
        seen.clear()
        run = build(tiny_config(tmp_path, **overrides), mesh, train=True)
        state = jax.eval_shape(lambda p: init_state(p, run.optimizer, 0), initial_params(run))  # noqa: B023
        P, G, T = 8, 4, run.cfg.rollout.max_new_tokens
        jax.eval_shape(run.fns.score, state.params, _groups(P, G, T))
        batch = (_groups(P, G, T), _loss_batch(P, G, T))
        mini = jax.eval_shape(run.fns.take, batch, jax.ShapeDtypeStruct((), jnp.int32))
        assert mini[0].prompts.shape[0] == 4  # the mini-batch's prompts; the update cuts their rows
        jax.eval_shape(run.fns.update, state, *mini)
        # The scoring pass's chunk, then the update's micro-batches (traced before and in the scan).
        assert seen == [width_rows] * 3, seen
        assert (run.fns.micro_rows, run.fns.padded_micro_rows) == (rows, width_rows)


def _groups(P, G, T):
    from gtpo_jax.training.update import Groups

    sds = jax.ShapeDtypeStruct
    return Groups(sds((P, 16), jnp.int32), sds((P, 16), bool), sds((P, G, T), jnp.int32), sds((P, G, T), bool))


def _loss_batch(P, G, T):
    from gtpo_jax.losses import LossBatch

    f = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    return LossBatch(f(P, G, T), f(P, G, T), f(P, G, T), f(P, G, T), jax.ShapeDtypeStruct((P, G), bool), None)


# ---- Length buckets (train.length_buckets) ---------------------------------------------------
def test_each_prompt_and_response_bucket_shape_is_counted_and_logged_once(caplog):
    """The scoring pass and the update compile once per (prompt bucket, response bucket): with
    rollout.prompt_buckets 16 / 32 and response widths 4 / 8, three shapes seen, three logged."""
    from gtpo_jax.training.build import Run

    run = Run(from_dict({}), *[None] * 9)
    with caplog.at_level("INFO"):
        for shape in [(16, 4), (32, 4), (16, 4), (16, 8), (32, 4)]:
            run.note_length_bucket(*shape)
    lines = [r.getMessage() for r in caplog.records if "scoring and update: compiling" in r.getMessage()]
    assert run.length_buckets == {(16, 4), (32, 4), (16, 8)}
    assert lines == [
        f"scoring and update: compiling for prompt bucket {p} and response length {w} of T=8 ({n} shapes so far)"
        for n, (p, w) in enumerate([(16, 4), (32, 4), (16, 8)], 1)
    ]


@pytest.mark.parametrize(  # grpo, grpo_s and dr_grpo (each ~17-25 s) run in the slow suite
    "algorithm",
    [
        pytest.param("grpo", marks=pytest.mark.slow),
        "dapo",
        "gtpo",
        pytest.param("grpo_s", marks=pytest.mark.slow),
        pytest.param("dr_grpo", marks=pytest.mark.slow),
    ],
)
def test_a_step_over_the_length_bucket_equals_one_over_the_full_length(tmp_path, algorithm):
    """Responses of at most 3 of T = 16 tokens: the scoring pass and the update run over the
    bucket of 4 tokens, and the loss, gradient norm and updated parameters equal those of the
    same step over all 16 (Dr.GRPO's constant divisor stays T; GTPO's per-position sums and the
    overlong shaping see only real tokens)."""
    from gtpo_jax.training.build import build
    from gtpo_jax.training.collect import collect, verdicts
    from gtpo_jax.training.loop import loss_inputs
    from gtpo_jax.training.state import init_state
    from gtpo_jax.training.update import train_on

    extra = {"loss.overlong_buffer_len": 4} if algorithm == "dapo" else {}
    common = {"loss.algorithm": algorithm, "rollout.max_new_tokens": 16, "train.prompts_per_step": 8, **extra}
    trainer = Trainer(tiny_config(tmp_path, **common, **{"loss.dynamic_sampling": False}))
    try:
        params = trainer.state.params
        batch, _, _ = collect(trainer.built, params, trainer.pool, trainer.pipeline, jax.random.key(1))
        T, keep = 16, np.arange(16) < np.asarray([3, 1, 2, 3])[np.arange(32) % 4].reshape(8, 4, 1)
        r = batch.rollout
        mask = np.asarray(r.mask) & keep
        short = dataclasses.replace(
            batch,
            rollout=r._replace(
                tokens=jnp.where(mask, r.tokens, 0), mask=jnp.asarray(mask), logp=jnp.where(mask, r.logp, 0.0)
            ),
            lengths=mask.sum(-1),
            rewards=np.tile([1.0, 0.0, 1.0, 0.0], (8, 1)).astype(np.float32),
        )
        rule = dict(success_threshold=trainer.cfg.loss.success_threshold, mask_truncated=False)
        results = []
        for buckets in (4, 1):
            cfg = dataclasses.replace(trainer.cfg, train=replace(trainer.cfg.train, length_buckets=buckets))
            run = build(cfg, trainer.built.mesh, train=True)
            # The reference is the starting policy, as at step 1 (GRPO's KL needs its log-probs).
            groups, loss_batch, _ = loss_inputs(run, params, params, short, verdicts(short, **rule))
            assert run.length_buckets == {(groups.prompts.shape[1], groups.tokens.shape[-1])}  # counted by both
            state = init_state(jax.tree.map(jnp.copy, params), run.optimizer, 0, mesh=run.mesh)  # donated
            state, metrics = train_on(run.fns, state, groups, loss_batch, run.cfg)
            results.append((groups.tokens.shape[-1], metrics, _arrays(state.params)))
        (width_on, on, params_on), (width_off, off, params_off) = results
        assert (width_on, width_off) == (4, T) and on["empty_updates"] == 0
        np.testing.assert_allclose(on["loss"], off["loss"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(on["grad_norm"], off["grad_norm"], rtol=1e-6)
        assert on["grad_norm"] > 0
        # Float32 rounding of matmuls over other shapes, through AdamW's first step (lr 5e-4, a
        # near-zero gradient element's update is ~lr * g / |g|): 2% of a step (1.4% measured on 1 of
        # 8192 elements once the scoring outputs were split by rows on the 8 devices).
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), params_on, params_off)
    finally:
        trainer.close()
