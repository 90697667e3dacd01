"""The paper's setting at 32B: Qwen2.5-32B on DAPO-Math-17k, GTPO with the DAPO recipe.

    python -m gtpo_jax.train --config=configs/qwen2_5_32b_dapo_math.py \\
        --config.model.checkpoint=/ckpt/Qwen2.5-32B \\
        --config.data.path=dapo_math_17k/train.jsonl --config.data.test_path=aime24/test.jsonl

Everything as in `qwen2_5_7b_dapo_math.py` except the model and 4-way tensor parallelism: a
v5p-128 slice (64 chips of 95 GiB; v5p-N counts TensorCores, two per chip), mesh fsdp 16 x
tensor 4 (float32 parameters plus AdamW state and gradients need about 0.5 TB of HBM).
`benchmarks/memory_plan.py` on 64 fake CPU devices (`benchmarks/results/
memory_plan_qwen2_5_32b_v5p128.json`; peak = the program's bytes + what stays resident, e.g.
AdamW's state while sampling) puts the per-device peak at 73.3 GiB for a sampler call of
`rollout.batch_size` = 256 sequences, 8.8 GiB for the scoring pass and 53.3 GiB for an update,
in micro-batches of `train.micro_batch_size` = 16 sequences (the batch width, fsdp 16: one per
data-parallel group, none padded).
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("qwen2_5_7b", Path(__file__).with_name("qwen2_5_7b_dapo_math.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)
LOSS_OVERRIDES = _base.LOSS_OVERRIDES


def get_config():
    c = _base.get_config()
    c.model.update(preset="qwen2_5_32b", checkpoint="checkpoints/Qwen2.5-32B")
    c.train.update(micro_batch_size=16, run_dir="runs/qwen2_5_32b_dapo_math")
    c.mesh.update(data=1, fsdp=-1, tensor=4)
    return c
