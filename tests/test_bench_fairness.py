"""benchmarks/sampler_bench.py and step_bench.py: a ratio against Tunix only when both sides did the
same work; our GRPO and GTPO step sides decode the same shapes. Tunix itself is not needed."""

import importlib.util
import sys

import jax
import numpy as np
from train_helpers import ROOT

from gtpo_jax.models.sharding import make_mesh

sys.path.insert(0, str(ROOT / "benchmarks"))  # step_bench imports sampler_bench, the runners tunix_common


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sampler_bench, step_bench, tunix_common = _load("sampler_bench"), _load("step_bench"), _load("tunix_common")


def _sampler_record(**tunix):
    record = {
        "prompt_len": 32,
        "prompt_sha": "abc",
        "decoded_tokens": 1024,
        "kv_cache_tokens_per_s": 300.0,
        "tunix_prompt_len": 32,
        "tunix_prompt_sha": "abc",
        "tunix_decoded_tokens": 1024,
        "tunix_tokens_per_s": 200.0,
    }
    return record | tunix


def test_sampler_same_work_gives_the_ratio():
    assert sampler_bench.fairness(_sampler_record()) == {"valid": True, "speedup_vs_tunix": 1.5}


def test_sampler_longer_tunix_prompt_is_invalid_without_a_ratio():
    # Tunix's HF tokenizer adds a BOS: its prompts are one token longer, and a different matrix.
    out = sampler_bench.fairness(_sampler_record(tunix_prompt_len=33, tunix_prompt_sha="def"))
    assert out["valid"] is False and "speedup_vs_tunix" not in out
    assert out["invalid_reasons"] == [
        "prompt_len=32 but tunix_prompt_len=33",
        "prompt_sha='abc' but tunix_prompt_sha='def'",
    ]


def test_sampler_early_stop_is_invalid_without_a_ratio():
    out = sampler_bench.fairness(_sampler_record(tunix_decoded_tokens=702))
    assert out == {"valid": False, "invalid_reasons": ["decoded_tokens=1024 but tunix_decoded_tokens=702"]}


def test_sampler_without_tunix_is_invalid():
    record = {k: v for k, v in _sampler_record().items() if not k.startswith("tunix")}
    assert sampler_bench.fairness(record) == {"valid": False, "invalid_reasons": ["no Tunix measurement"]}


def test_issue18_workloads():
    expected = [("tiny", 2, 128), ("smollm2_135m", 2, 128), ("smollm2_135m", 16, 256)]
    assert sampler_bench.parse_workloads("issue18", 4) == expected
    assert sampler_bench.parse_workloads("tiny:16x8", 4) == [("tiny", 4, 8)]


def test_tunix_sees_our_prompt_ids():
    """The pass-through tokenizer adds no BOS, has no EOS, and both sides fingerprint alike."""
    tok = tunix_common.IdsTokenizer(pad_id=0)
    ids = sampler_bench.prompt_ids(2, 32, 49152)
    assert all(0 not in row for row in ids)  # the pad id marks padding in Tunix's sampler
    assert tok.encode(tunix_common.as_text(ids[1])) == ids[1]
    assert tok.bos_id() is None and tok.eos_id() == -1
    assert tunix_common.prompt_sha(np.repeat(ids, 4, axis=0)) == sampler_bench.prompt_sha(np.repeat(ids, 4, axis=0))
    assert sampler_bench.prompt_sha(ids) != sampler_bench.prompt_sha(np.repeat(ids, 4, axis=0))


def _step_sides(tunix_work):
    work = [{"rows": 8, "T": 4, "decoded_tokens": 32}] * 2
    ours = {"prompt_len": 32, "prompt_sha": "abc", "grpo": {"step": 2.0}, "grpo_work": work, "gtpo_work": work}
    tunix = {"prompt_len": 32, "prompt_sha": "abc", "step": 3.0, "work": tunix_work}
    return ours, tunix


def test_step_same_work_gives_the_ratio():
    ours, tunix = _step_sides([{"rows": 8, "T": 4, "decoded_tokens": 32}] * 2)
    assert step_bench.fairness(ours, tunix, rows=8, T=4) == {"valid": True, "step_speedup_vs_tunix": 1.5}


def test_step_fewer_tunix_tokens_is_invalid_without_a_ratio():
    ours, tunix = _step_sides([{"rows": 8, "T": 4, "decoded_tokens": 32}, {"rows": 8, "T": 4, "decoded_tokens": 30}])
    out = step_bench.fairness(ours, tunix, rows=8, T=4)
    assert out["valid"] is False and "step_speedup_vs_tunix" not in out
    assert len(out["invalid_reasons"]) == 1 and out["invalid_reasons"][0].startswith("Tunix step 1:")
    tunix["prompt_len"] = 33
    assert "prompt prompt_len: ours 32, Tunix 33" in step_bench.fairness(ours, tunix, rows=8, T=4)["invalid_reasons"]


def test_step_rewards_match_tunix_rule():
    tokens = np.array([[[1, 2, 3, 9], [2, 2, 5, 5]]])
    lengths = np.array([[2, 4]])
    # 1 + 2 = 3 (odd) -> 0; 2 + 2 + 5 + 5 = 14 (even) -> 1, as Tunix's reward on the decoded text
    assert step_bench.rewards_of(tokens, lengths).tolist() == [[0.0, 1.0]]
    assert _load("tunix_step_run").reward(None, ["1 2", "2 2 5 5"]) == [0.0, 1.0]


def test_grpo_and_gtpo_sides_decode_the_same_shapes(tmp_path):
    """A tiny smoke of our step bench side: both algorithms decode every row to T in every step."""
    step_bench.write_checkpoint("tiny", tmp_path)
    mesh = make_mesh(devices=jax.devices()[:1])
    out = step_bench.run_ours(str(tmp_path), P=2, G=2, prompt_len=8, T=4, steps=1, warmup=0, mesh=mesh)
    expected = [{"rows": 4, "T": 4, "decoded_tokens": 16}]
    assert out["grpo_work"] == expected and out["gtpo_work"] == expected
    assert out["prompt_len"] == 8
    assert out["grpo_compiles_timed"] > 0  # the one step compiled (no warm-up): the counter counts
    for alg in ("grpo", "gtpo"):
        assert set(out[alg]) == {*step_bench.PHASES, "step"}
        assert out[alg]["step"] >= sum(out[alg][p] for p in step_bench.PHASES) * 0.999
