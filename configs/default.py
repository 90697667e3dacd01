"""The embedded default: GTPO on a built-in arithmetic task, a tiny policy, 2 CPU cores, minutes.

    python -m gtpo_jax.train --config=configs/default.py

A randomly initialised character-level model is warmed up on reference answers (supervised,
inside the run) until it solves part of the held-out problems, then trained with GTPO; the run
prints held-out avg@4 at the start and the end.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.model = dict(preset="tiny", init_seed=0)
    c.tokenizer = dict(kind="char", chat_template="raw")
    # "(3+5)*2" -> "16": two operations on single digits, answers -17..729.
    c.data = dict(source="task", task="arithmetic", difficulty=2, num_train=4000, num_test=200,
                  prompt_style="compact", max_prompt_tokens=16)
    c.rollout = dict(max_new_tokens=5, temperature=1.0, prompt_buckets=(16,), max_refill_rounds=2)
    # The completion is the bare number.
    c.reward = dict(name="exact", answer_pattern=r"^\s*(-?\d+)\s*$", num_workers=1, timeout_s=5.0)
    c.loss = dict(algorithm="gtpo", group_size=8)
    c.optim = dict(learning_rate=2e-4, warmup_steps=0, max_grad_norm=1.0)
    c.warmup = dict(steps=300, batch_size=64, learning_rate=3e-3)
    c.train = dict(steps=60, prompts_per_step=16, seed=0, run_dir="runs/default", checkpoint_every=20)
    c.eval = dict(num_prompts=200, samples=4, temperature=1.0)
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    return c
