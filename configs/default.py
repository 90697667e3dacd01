"""The embedded default: GTPO on a built-in arithmetic task, a tiny policy, 2 CPU cores, minutes.

    python -m gtpo_jax.train --config=configs/default.py

A randomly initialised character-level model is warmed up on reference answers (supervised,
inside the run) until it solves part of the held-out problems, then trained with GTPO; the run
prints held-out avg@4 at the start and the end (15.2% -> 42.5% on a 2-core CPU, in about 5 minutes).
"""

from gtpo_jax.config import base_config

# The loss fields this config sets on purpose (everything else is the chosen recipe's default).
LOSS_OVERRIDES = {"group_size": "G = 8 keeps a CPU step at a fraction of a second"}


def get_config():
    c = base_config()
    c.model.preset = "tiny_task"
    c.tokenizer.kind, c.tokenizer.chat_template = "char", "raw"
    # "(3+5)-2" -> "6": two additions / subtractions of single digits, answers -17..27.
    c.data.update(source="task", task="arithmetic", difficulty=2, operations="+-", num_train=2400, num_test=200,
                  prompt_style="compact", max_prompt_tokens=16)  # fmt: skip
    c.rollout.update(max_new_tokens=5, temperature=1.0, prompt_buckets=(16,), max_refill_rounds=2)
    # The completion is the bare number.
    c.reward.update(name="exact", answer_pattern=r"^\s*(-?\d+)\s*$", num_workers=1, timeout_s=5.0)
    c.loss.algorithm, c.loss.group_size = "gtpo", 8
    c.optim.update(learning_rate=5e-4, warmup_steps=0, max_grad_norm=1.0)
    # Enough supervised steps to start RL at roughly 15% held-out accuracy.
    c.warmup.update(steps=600, batch_size=64, learning_rate=3e-3)
    c.train.update(steps=700, prompts_per_step=16, seed=0, run_dir="runs/default", checkpoint_every=100)
    c.eval.update(every=100, num_prompts=200, samples=4, temperature=1.0)
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # every local device along fsdp
    return c
