"""The grain prompt pipeline: exact resume across processes, disjoint host shards, filtering."""

import json
import subprocess
import sys
import textwrap

import pytest

from gtpo_jax.data.pipeline import PipelineConfig, PromptPipeline

RECORDS = [{"id": f"r{i}", "prompt": "x" * (i % 13), "answer": str(i)} for i in range(53)]
CFG = PipelineConfig(batch_size=4, seed=7, num_epochs=0)


def _ids(batches):
    return [[r["id"] for r in b] for b in batches]


def test_resume_in_a_new_process_continues_at_the_next_batch(tmp_path):
    # 30 records in batches of 4: 12 batches cross the first epoch boundary (after 30 records).
    straight = PromptPipeline(RECORDS[:30], CFG)
    twelve = _ids(next(straight) for _ in range(12))
    first = PromptPipeline(RECORDS[:30], CFG)
    seven = _ids(next(first) for _ in range(7))
    (tmp_path / "state.json").write_text(json.dumps(first.get_state()))
    script = textwrap.dedent(f"""
        import json, sys
        from gtpo_jax.data.pipeline import PipelineConfig, PromptPipeline
        records = [{{"id": f"r{{i}}", "prompt": "x" * (i % 13), "answer": str(i)}} for i in range(30)]
        p = PromptPipeline(records, PipelineConfig(batch_size=4, seed=7, num_epochs=0))
        p.set_state(json.load(open({str(tmp_path / "state.json")!r})))
        print(json.dumps([[r["id"] for r in next(p)] for _ in range(5)]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    five = json.loads(out.stdout.strip().splitlines()[-1])
    assert seven + five == twelve
    assert len({i for b in twelve[:7] for i in b}) == 28  # no repeats inside the first epoch


def test_epochs_reshuffle_and_cover_everything():
    p = PromptPipeline(RECORDS[:20], PipelineConfig(batch_size=5, seed=1))
    epoch1, epoch2 = _ids(next(p) for _ in range(4)), _ids(next(p) for _ in range(4))
    assert sorted(sum(epoch1, [])) == sorted(sum(epoch2, [])) == sorted(r["id"] for r in RECORDS[:20])
    assert epoch1 != epoch2 and p.epoch == 2


def test_finite_epochs_stop():
    p = PromptPipeline(RECORDS[:10], PipelineConfig(batch_size=3, num_epochs=2, shuffle=False))
    assert len(list(p)) == 6  # 20 records over 2 epochs, batches of 3, remainder dropped


def test_two_processes_get_disjoint_shards_that_cover_the_data():
    cfg = PipelineConfig(batch_size=2, seed=3, num_epochs=1)
    shards = [sum(_ids(PromptPipeline(RECORDS[:20], cfg, process_index=i, process_count=2)), []) for i in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(r["id"] for r in RECORDS[:20])


def test_long_prompts_are_filtered_counted_and_never_served():
    p = PromptPipeline(
        RECORDS,
        PipelineConfig(batch_size=2, max_prompt_tokens=10, num_epochs=1),
        prompt_tokens=lambda r: len(r["prompt"]),
    )
    served = sum(_ids(p), [])
    too_long = {r["id"] for r in RECORDS if len(r["prompt"]) > 10}
    assert p.stats == {"records": 53, "dropped_too_long": len(too_long), "kept": 53 - len(too_long)}
    assert len(too_long) == 8 and not too_long & set(served)


def test_state_of_another_pipeline_is_refused_and_bad_config_named():
    state = PromptPipeline(RECORDS, CFG).get_state()
    with pytest.raises(ValueError, match="seed: saved 7, now 8"):
        PromptPipeline(RECORDS, PipelineConfig(batch_size=4, seed=8)).set_state(state)
    with pytest.raises(ValueError, match="PipelineConfig.batch_size=0"):
        PipelineConfig(batch_size=0)
    with pytest.raises(ValueError, match="holds 3 prompts, fewer than one batch"):
        PromptPipeline(RECORDS[:3], PipelineConfig(batch_size=4))
