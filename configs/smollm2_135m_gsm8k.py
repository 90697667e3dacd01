"""SmolLM2-135M-Instruct (the real checkpoint) on GSM8K-format data, GTPO; runs on CPU, faster on a GPU.

    python -m gtpo_jax.models.gguf fetch-smollm2          # once: ~/.cache/gtpo_jax/SmolLM2-135M-Instruct
    python -m gtpo_jax.train --config=configs/smollm2_135m_gsm8k.py \\
        --config.data.path=gsm8k/train.jsonl --config.data.test_path=gsm8k/test.jsonl

The prompt is rendered with the checkpoint's own ChatML template and asks for a boxed answer;
the reward is math-verify equivalence of the last \\boxed{} with the GSM8K `#### N` answer.
"""

from gtpo_jax.config import base_config
from gtpo_jax.models.gguf import SMOLLM2_DIR, default_cache_dir

# The loss fields this config sets on purpose (everything else is the chosen recipe's default).
LOSS_OVERRIDES = {"group_size": "G = 8 keeps a CPU step within minutes"}


def get_config():
    c = base_config()
    c.model.update(checkpoint=str(default_cache_dir() / SMOLLM2_DIR), param_dtype="float32", dtype="float32")
    c.tokenizer.update(kind="hf", chat_template="chatml")
    c.data.update(source="jsonl", path="data/gsm8k/train.jsonl", test_path="data/gsm8k/test.jsonl", fields="gsm8k",
                  prompt_suffix="\nPut the final answer in \\boxed{}.", max_prompt_tokens=256)  # fmt: skip
    c.rollout.update(max_new_tokens=256, temperature=1.0, prompt_buckets=(128, 256, 320), max_refill_rounds=2)
    c.reward.update(name="math", num_workers=2, timeout_s=5.0)
    c.loss.algorithm, c.loss.group_size = "gtpo", 8
    c.optim.update(learning_rate=1e-6, warmup_steps=5, weight_decay=0.0, max_grad_norm=1.0)
    c.train.update(steps=200, prompts_per_step=8, mini_batches=2, run_dir="runs/smollm2_gsm8k", checkpoint_every=20)
    c.eval.update(every=50, num_prompts=64, samples=4, temperature=1.0)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
