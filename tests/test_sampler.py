"""The KV-cache sampler: greedy = argmax teacher forcing, log-probs = scoring pass, padding,
stop tokens, the sampling distribution (chi-square), determinism, sharding, compilations."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gtpo_jax.config import ConfigError, from_dict
from gtpo_jax.data.prompts import pad_prompts
from gtpo_jax.models.presets import get_preset
from gtpo_jax.models.sharding import create_sharded, make_mesh, split_model
from gtpo_jax.models.transformer import Transformer
from gtpo_jax.rollout.sampler import FINISH_LENGTH, FINISH_STOP, sample, sampling_config
from gtpo_jax.scoring import score

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]


@pytest.fixture(scope="module")
def model():
    return Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0))


def run(model, cfg, prompts=PROMPTS, key=0):
    tokens, valid = pad_prompts(prompts, cfg.rollout.prompt_buckets, cfg.pad_id)
    return sample(*split_model(model), jnp.asarray(tokens), jnp.asarray(valid), jax.random.key(key), cfg), tokens, valid


@nnx.jit
def _last_logits(model, seq, length):
    """Logits after the first `length` tokens of a right-padded sequence (padding comes later,
    so causal attention never sees it); one compilation for every length."""
    valid = jnp.arange(seq.shape[1])[None] < length
    hidden, _ = model(seq, jnp.arange(seq.shape[1])[None], valid)
    return model.logits(hidden)[0, length - 1]


def greedy_reference(model, prompt, n, width=32):
    """Argmax of teacher-forced full forward passes over the growing sequence (no cache)."""
    seq = np.zeros((1, width), np.int32)
    seq[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        seq[0, t] = int(jnp.argmax(_last_logits(model, jnp.asarray(seq), t)))
    return list(seq[0, len(prompt) : len(prompt) + n])


@pytest.mark.parametrize("greedy", [dict(temperature=0.0), dict(temperature=1.0, top_k=1)])
def test_greedy_equals_argmax_of_teacher_forced_passes(model, greedy):
    cfg = sampling_config(group_size=2, max_new_tokens=7, prompt_buckets=(8, 16), **greedy)
    out, _, _ = run(model, cfg)
    for p, prompt in enumerate(PROMPTS):
        expected = greedy_reference(model, prompt, 7)
        for g in range(2):
            assert list(np.asarray(out.tokens[p, g])) == expected
    assert np.all(np.asarray(out.finish_reason) == FINISH_LENGTH) and np.all(np.asarray(out.lengths) == 7)


@pytest.mark.parametrize("preset", ["tiny_qwen3", "tiny_gemma3"])
def test_greedy_equals_teacher_forcing_for_qk_norm_and_sliding_window_families(preset):
    """Qwen3's QK-norm and Gemma 3's local layers (window 4, shorter than prompt + response)
    give the same tokens through the cache as through full forward passes."""
    model = Transformer(get_preset(preset), rngs=nnx.Rngs(2))
    cfg = sampling_config(group_size=1, max_new_tokens=9, temperature=0.0, prompt_buckets=(8,))
    out, _, _ = run(model, cfg)
    for p, prompt in enumerate(PROMPTS):
        assert list(np.asarray(out.tokens[p, 0])) == greedy_reference(model, prompt, 9)


@pytest.mark.parametrize("filters", [dict(), dict(top_k=20), dict(top_p=0.8), dict(top_k=30, top_p=0.9)])
def test_sampler_logp_equals_scoring_logp(model, filters):
    cfg = sampling_config(
        group_size=4, max_new_tokens=9, temperature=0.7, stop_token_ids=(3,), prompt_buckets=(8,), **filters
    )
    out, tokens, valid = run(model, cfg, key=5)
    logp, _ = score(model, jnp.asarray(tokens), jnp.asarray(valid), out.tokens, out.mask, temperature=0.7)
    np.testing.assert_allclose(np.asarray(out.logp), np.asarray(logp), atol=1e-4)
    assert np.all(np.asarray(out.logp)[~np.asarray(out.mask)] == 0)


def test_left_padding_changes_nothing(model):
    short = sampling_config(group_size=2, max_new_tokens=6, temperature=0.0, prompt_buckets=(8,))
    long = sampling_config(group_size=2, max_new_tokens=6, temperature=0.0, prompt_buckets=(32,))
    a, _, _ = run(model, short)
    b, _, _ = run(model, long)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    alone, _, _ = run(model, short, prompts=[PROMPTS[1]])  # same prompt, no neighbours
    np.testing.assert_array_equal(alone.tokens[0], a.tokens[1])
    # Sampling too: the same rows and key give the same draws in either bucket.
    sampled = dict(group_size=3, max_new_tokens=6, temperature=1.0, top_p=0.95)
    c, _, _ = run(model, sampling_config(prompt_buckets=(8,), **sampled), key=3)
    d, _, _ = run(model, sampling_config(prompt_buckets=(32,), **sampled), key=3)
    np.testing.assert_array_equal(c.tokens, d.tokens)
    np.testing.assert_allclose(c.logp, d.logp, atol=1e-5)


def test_stop_tokens_end_responses_and_their_masks(model):
    # Draws depend only on (key, step, row), so with stop tokens every row repeats the stop-free
    # draws up to and including its first stop token, then pads.
    sampled = dict(group_size=2, max_new_tokens=8, temperature=1.0, prompt_buckets=(8,))
    reference = np.asarray(run(model, sampling_config(**sampled), key=7)[0].tokens).reshape(-1, 8)
    # A stop token that some row first emits at step j >= 1.
    r, j = next((r, j) for r in range(len(reference)) for j in range(1, 8) if reference[r, j] not in reference[r, :j])
    stops = (int(reference[r, j]), 127)
    cfg = sampling_config(stop_token_ids=stops, **sampled)
    out, _, _ = run(model, cfg, key=7)
    tokens, mask = np.asarray(out.tokens).reshape(-1, 8), np.asarray(out.mask).reshape(-1, 8)
    lengths, finish = np.asarray(out.lengths).reshape(-1), np.asarray(out.finish_reason).reshape(-1)
    for row in range(len(reference)):
        hits = np.flatnonzero(np.isin(reference[row], stops))
        length = hits[0] + 1 if len(hits) else 8
        assert lengths[row] == length
        assert finish[row] == (FINISH_STOP if len(hits) else FINISH_LENGTH)
        np.testing.assert_array_equal(mask[row], np.arange(8) < length)  # the stop token is kept
        np.testing.assert_array_equal(tokens[row, :length], reference[row, :length])
        assert np.all(tokens[row, length:] == cfg.pad_id)
    assert lengths[r] == j + 1 and finish[r] == FINISH_STOP
    assert np.any(finish == FINISH_LENGTH)  # both kinds of ending occur


def _expected_distribution(logits, temperature, top_k, top_p):
    """softmax(logits / T), cut to the top k, renormalised, then cut to the top-p nucleus of that
    (the order of HF's logits warpers and vLLM), in numpy, independently of the sampler's code."""
    probs = np.exp(logits / temperature - np.max(logits / temperature))
    order = np.argsort(-probs)
    if top_k:
        probs[order[top_k:]] = 0.0
    probs /= probs.sum()
    keep = np.zeros_like(probs, bool)
    mass = 0.0
    for v in order:
        if mass >= top_p or probs[v] == 0:
            break
        keep[v] = True
        mass += probs[v]
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum()


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (10, 1.0), (0, 0.8), (12, 0.9)])
def test_first_token_distribution_passes_chi_square(model, top_k, top_p):
    n, temperature = 10_000, 0.8
    cfg = sampling_config(
        group_size=n, max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, prompt_buckets=(4,)
    )
    out, tokens, valid = run(model, cfg, prompts=[[7, 8, 9]], key=11)
    hidden, _ = model(jnp.asarray([[7, 8, 9]]), jnp.arange(3)[None], jnp.ones((1, 3), bool))
    expected = _expected_distribution(np.asarray(model.logits(hidden)[0, -1], np.float64), temperature, top_k, top_p)
    counts = np.bincount(np.asarray(out.tokens).reshape(-1), minlength=expected.size)
    assert counts[expected == 0].sum() == 0  # nothing outside the filter is ever drawn
    support = np.flatnonzero(expected > 0)
    big = support[expected[support] * n >= 5]  # chi-square needs >= 5 expected per bin: pool the rest
    small = np.setdiff1d(support, big)
    observed = np.append(counts[big], counts[small].sum())
    predicted = np.append(expected[big], expected[small].sum()) * n
    keep = predicted > 0
    result = stats.chisquare(observed[keep], predicted[keep])
    assert len(big) >= 5 and result.pvalue > 1e-3, (len(big), result)


def test_deterministic_for_a_key_and_different_across_keys(model):
    cfg = sampling_config(group_size=4, max_new_tokens=6, temperature=1.0, prompt_buckets=(8,))
    a, b, c = run(model, cfg, key=1)[0], run(model, cfg, key=1)[0], run(model, cfg, key=2)[0]
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert np.any(np.asarray(a.tokens) != np.asarray(c.tokens))
    assert len({tuple(np.asarray(a.tokens[0, g])) for g in range(4)}) > 1  # the G samples differ


def test_sharded_sampling_equals_single_device():
    cfg_model = get_preset("tiny_qwen2")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded, single = create_sharded(cfg_model, mesh, seed=4), Transformer(cfg_model, rngs=nnx.Rngs(4))
    cfg = sampling_config(group_size=2, max_new_tokens=5, temperature=1.0, top_k=40, prompt_buckets=(8,))
    prompts = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10]]
    tokens, valid = pad_prompts(prompts, cfg.rollout.prompt_buckets, 0)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    placed = jax.device_put(tokens, batch), jax.device_put(valid, batch)
    a = sample(*split_model(sharded), *placed, jax.random.key(9), cfg)
    b = sample(*split_model(single), jnp.asarray(tokens), jnp.asarray(valid), jax.random.key(9), cfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)


def test_prompt_buckets_bound_compilations(model):
    cfg = sampling_config(group_size=2, max_new_tokens=3, prompt_buckets=(4, 8))
    model_def, params = split_model(model)
    traces = []

    def counted(*args, **kw):  # runs once per trace, i.e. once per compilation of a new shape
        traces.append(args[2].shape)
        return sample.__wrapped__(*args, **kw)

    fresh = jax.jit(counted, static_argnums=(0, 5))
    for prompts in ([[1, 2]], [[1, 2, 3]], [[5]], [[1, 2, 3, 4, 5]], [[1] * 8]):
        tokens, valid = pad_prompts(prompts, cfg.rollout.prompt_buckets, cfg.pad_id)
        rollout = fresh(model_def, params, jnp.asarray(tokens), jnp.asarray(valid), jax.random.key(0), cfg)
        assert tokens.shape[1] in (4, 8) and rollout.tokens.shape == (1, 2, 3)
    assert traces == [(1, 4), (1, 8)]  # one compilation per bucket
    with pytest.raises(ValueError, match="longer than the largest prompt bucket 8"):
        pad_prompts([[1] * 9], cfg.rollout.prompt_buckets, cfg.pad_id)


def test_bad_sampling_config():
    with pytest.raises(ConfigError, match=r"^rollout\.top_p=0\.0"):
        from_dict({"rollout": {"top_p": 0.0}})
    with pytest.raises(ConfigError, match=r"^rollout\.temperature=-1"):
        from_dict({"rollout": {"temperature": -1}})
    with pytest.raises(ValueError, match="group_size=0"):
        sampling_config(group_size=0)


def test_each_sampler_compilation_is_logged_once(caplog):
    """Every new (P, bucket, sampling setting) is a compilation; evaluation's greedy sampling is one too."""
    from types import SimpleNamespace

    from gtpo_jax.training.build import Run

    run = Run(*[SimpleNamespace()] * 2, None, None, None, None, None, None, None, None)
    train, greedy = sampling_config(group_size=8), sampling_config(group_size=1, temperature=0.0)
    with caplog.at_level("INFO"):
        for shape, cfg in [((16, 32), train), ((16, 32), train), ((16, 32), greedy), ((16, 64), train)]:
            run.note_sampler_shape(shape, cfg)
    lines = [r.getMessage() for r in caplog.records if "sampler: compiling" in r.getMessage()]
    assert [line.split(" (")[0] for line in lines] == [
        "sampler: compiling for P=16 prompt bucket=32 G=8 T=8 temperature=1",
        "sampler: compiling for P=16 prompt bucket=32 G=1 T=8 temperature=0",
        "sampler: compiling for P=16 prompt bucket=64 G=8 T=8 temperature=1",
    ]


@pytest.mark.parametrize("chunk", [1, 2])
def test_a_draw_in_chunks_equals_one_call(model, chunk):
    """`rollout.batch_size`: prompts drawn `chunk` at a time (the last chunk padded), each call
    told the whole draw's rows and its offset, give the tokens, masks, lengths and finish flags
    (and, to float32 rounding, the log-probs) of one call with the same key (G > 1, left-padded
    prompts of different lengths, temperature 1 with top-k and top-p, a stop token)."""
    from types import SimpleNamespace

    from gtpo_jax.parallel.placement import Placement
    from gtpo_jax.training.collect import sample_chunks

    cfg = sampling_config(
        group_size=3, max_new_tokens=7, temperature=1.0, top_k=40, top_p=0.95, stop_token_ids=(5,), prompt_buckets=(8,)
    )
    one, tokens, valid = run(model, cfg, key=13)
    assert len({tuple(np.asarray(one.tokens[0, g])) for g in range(3)}) > 1  # real draws, not argmax
    model_def, params = split_model(model)
    mesh = make_mesh(devices=jax.devices()[:1])
    shapes = []
    fake = SimpleNamespace(
        cfg=SimpleNamespace(rollout=SimpleNamespace(batch_size=chunk * 3)),
        model=model_def,
        place=Placement(mesh),
        note_sampler_shape=lambda shape, sampling, total_rows=0: shapes.append((shape, total_rows)),
    )
    placed = fake.place.put((tokens, valid))
    chunked = sample_chunks(fake, params, (tokens, valid), placed, jax.random.key(13), cfg)
    assert shapes == [((chunk, 8), 9)]  # calls of `chunk` prompts within a 9-row draw
    for name in ("tokens", "mask", "lengths", "finish_reason"):
        np.testing.assert_array_equal(np.asarray(getattr(chunked, name)), np.asarray(getattr(one, name)), err_msg=name)
    # The same tokens; the log-probs to float32 rounding (a matmul over fewer rows may round apart).
    np.testing.assert_allclose(np.asarray(chunked.logp), np.asarray(one.logp), rtol=0, atol=2e-6)
    # Without the whole draw's row keys, a chunk would draw other tokens.
    alone = sample(model_def, params, jnp.asarray(tokens[1:2]), jnp.asarray(valid[1:2]), jax.random.key(13), cfg)
    assert np.any(np.asarray(alone.tokens[0]) != np.asarray(one.tokens[1]))


def test_row_keys_slice_the_whole_draws_keys():
    from gtpo_jax.rollout.sampler import row_keys

    key = jax.random.key(3)
    whole = jax.random.key_data(jax.random.split(key, 10))
    np.testing.assert_array_equal(jax.random.key_data(row_keys(key, 10, 10, 0)), whole)
    np.testing.assert_array_equal(jax.random.key_data(row_keys(key, 4, 10, jnp.int32(4))), whole[4:8])
    padded = jax.random.key_data(row_keys(key, 4, 10, jnp.int32(8)))  # a last chunk past the draw's rows
    np.testing.assert_array_equal(padded[:2], whole[8:])


def test_the_kv_cache_is_in_the_compute_dtype():
    """A bfloat16-compute model keeps its cache in bfloat16 (half the memory of float32), before
    and after a prefill, while its parameters stay float32."""
    bf16 = Transformer(get_preset("tiny_qwen2", dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert jax.tree.leaves(nnx.state(bf16))[0].dtype == jnp.float32
    from gtpo_jax.models.transformer import KVCache, positions_from_valid

    cache = KVCache.empty(bf16.cfg, 2, 12)
    assert cache.k.dtype == cache.v.dtype == jnp.bfloat16
    tokens, valid = pad_prompts(PROMPTS[:2], (8,), 0)
    _, cache = bf16(jnp.asarray(tokens), positions_from_valid(jnp.asarray(valid)), jnp.asarray(valid), cache)
    assert cache.k.dtype == cache.v.dtype == jnp.bfloat16
    assert KVCache.empty(get_preset("tiny_qwen2"), 2, 12).k.dtype == jnp.float32
