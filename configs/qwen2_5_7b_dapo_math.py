"""The paper's setting: Qwen2.5-7B on DAPO-Math-17k, GTPO with the DAPO recipe, for TPU pod slices.

    python -m gtpo_jax.train --config=configs/qwen2_5_7b_dapo_math.py \\
        --config.model.checkpoint=/ckpt/Qwen2.5-7B \\
        --config.data.path=dapo_math_17k/train.jsonl --config.data.test_path=aime24/test.jsonl

DAPO-style (arXiv 2503.14476, the paper's baseline and training recipe): G = 16 responses per
prompt, clip 0.2 / 0.28, token-mean loss, no KL, dynamic sampling, overlong reward shaping over
the last 4096 of 20480 response tokens, AdamW 1e-6 with 10 warm-up steps, 16 optimiser steps per
rollout batch of 512 prompts. `--config.loss.algorithm=grpo_s|dapo|grpo` swaps the algorithm and
takes that algorithm's own recipe (clip range, aggregation, KL, dynamic sampling): this file sets
only the loss fields in `LOSS_OVERRIDES`, which every algorithm shares.

Planned for a v5p-32 slice: 16 chips (v5p-N counts TensorCores, two per chip; JAX sees one
device per chip) of 95 GiB, FSDP over all 16; sampler calls of `rollout.batch_size` = 256
sequences (16 prompts: 8192 sequences of 22528 tokens at once would need a 10.6 TB KV cache),
micro-batches of `train.micro_batch_size` = 32 sequences (2 per chip; a multiple of the batch
width up to a v5p-64, so no micro-batch is padded), `remat`. `benchmarks/memory_plan.py`
(compiled on fake CPU devices; peak = the program's bytes + what stays resident, e.g. AdamW's
state while sampling) puts the per-device peak at 66.4 GiB for a sampler call, 14.0 GiB for
the scoring pass and 53.5 GiB for an update on 16 devices
(`benchmarks/results/memory_plan_qwen2_5_7b_v5p32.json`), and at 34.1, 7.9 and 27.1 GiB on
32 (a v5p-64, `memory_plan_qwen2_5_7b_v5p64.json`). The plan lowers under `jax.set_mesh`, so
the model keeps its activations' rows on the batch axes.
"""

from gtpo_jax.config import base_config

# The loss fields this config sets on purpose (everything else is the chosen recipe's default).
LOSS_OVERRIDES = {
    "overlong_buffer_len": "DAPO's soft overlong punishment over the last 4096 tokens, for every algorithm",
    "overlong_penalty": "reaching -1 at the length limit (DAPO)",
}
# The limit itself, loss.max_response_len, is derived from rollout.max_new_tokens (20480).


def get_config():
    c = base_config()
    c.model.update(preset="qwen2_5_7b", checkpoint="checkpoints/Qwen2.5-7B", param_dtype="float32",
                   dtype="bfloat16", remat=True, token_chunk=2048, vocab_chunk=16384)  # fmt: skip
    c.tokenizer.update(kind="hf", chat_template="chatml")
    c.data.update(source="jsonl", path="data/dapo_math_17k/train.jsonl", test_path="data/aime24/test.jsonl",
                  fields="dapo", max_prompt_tokens=2048,
                  prompt_suffix='\n\nRemember to put your answer on its own line after "Answer:".')  # fmt: skip
    c.rollout.update(max_new_tokens=20480, temperature=1.0, top_p=1.0, prompt_buckets=(512, 1024, 2048), batch_size=256,
                     max_refill_rounds=3)  # fmt: skip
    c.reward.update(name="dapo", num_workers=32, timeout_s=10.0)
    # G = 16 is every recipe's default; the rest of the loss is the algorithm's recipe.
    c.loss.update(algorithm="gtpo", overlong_buffer_len=4096, overlong_penalty=1.0)
    c.optim.update(learning_rate=1e-6, warmup_steps=10, weight_decay=0.1, max_grad_norm=1.0)
    c.train.update(steps=500, prompts_per_step=512, ppo_epochs=1, mini_batches=16, micro_batch_size=32,
                   run_dir="runs/qwen2_5_7b_dapo_math", checkpoint_every=10, keep_checkpoints=3)  # fmt: skip
    c.eval.update(every=20, num_prompts=30, samples=32, temperature=1.0)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
