"""Runs RL steps of Tunix's `GRPOLearner` (vanilla rollout) and prints their phase times as JSON.

Executed by `step_bench.py --tunix_python PYTHON` with the interpreter of an environment where
`google-tunix` is installed; it does not import gtpo_jax. Llama-architecture checkpoints only.

    PYTHON benchmarks/tunix_step_run.py CKPT_DIR --prompts PROMPTS.json --G 4 --T 128 --steps 5

`PROMPTS.json` holds the P prompts' token ids; each step trains on all of them, G samples each
(`num_generations`), one optimiser update (`num_iterations` 1, one mini-batch). The policy and the
reference are the checkpoint (the reference a separate copy, as Tunix's own CLI makes it), on a
one-device mesh shared by the actor, reference and rollout roles. Prompt ids reach the sampler
unchanged and no response stops early (`tunix_common.IdsTokenizer`).

Phases are timed by wrapping the `RLCluster` methods the learner calls, each ended by a device
sync: `rollout` (`generate`), `reference` (`get_ref_per_token_logps`) and `update`
(`update_actor`); a step's time runs from the end of the previous step's update to the end of its
own (the first step's from the start of training). Per step it reports the work: rows, response
width and the tokens the sampler returned, and the prompt token matrix it decoded from.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tunix_common import IdsTokenizer, as_text, load_llama, prompt_sha


def reward(prompts, completions, **kwargs) -> list[float]:
    """1 when the sum of a response's token ids is even (`step_bench.rewards_of`)."""
    return [float(sum(int(x) for x in c.split()) % 2 == 0) for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--prompts", required=True, help="JSON file: the P prompts' token ids")
    parser.add_argument("--G", type=int, required=True, help="samples per prompt")
    parser.add_argument("--T", type=int, required=True, help="new tokens per sample")
    parser.add_argument("--steps", type=int, required=True, help="RL steps (the first ones compile)")
    parser.add_argument("--pad_id", type=int, default=0)
    parser.add_argument("--kl_coef", type=float, default=0.04)
    parser.add_argument("--learning_rate", type=float, default=1e-6)
    args = parser.parse_args()

    from flax import nnx
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    ids = json.loads(Path(args.prompts).read_text())
    prompt_len = max(len(p) for p in ids)
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        reference, cfg = load_llama(args.checkpoint, mesh=mesh)
        graph, params = nnx.split(reference)
        actor = nnx.merge(graph, jax.tree.map(jnp.copy, params))
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(args.learning_rate, b1=0.9, b2=0.999, weight_decay=0.0)
    )
    roles = (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.ROLLOUT)
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={role: mesh for role in roles},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer, eval_every_n_steps=10**9, max_steps=args.steps
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=args.T,
            temperature=1.0,
            top_p=1.0,  # with no top-k: a plain categorical draw, as ours
            top_k=None,
            max_prompt_length=prompt_len,
            kv_cache_size=prompt_len + args.T,
        ),
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=actor, reference=reference, tokenizer=IdsTokenizer(args.pad_id), cluster_config=cluster_config
    )
    algo = grpo_learner.GRPOConfig(
        num_generations=args.G,
        num_iterations=1,
        beta=args.kl_coef,
        kl_loss_mode="low_var_kl",  # k3, as ours
        epsilon=0.2,
        loss_agg_mode="sequence-mean-token-mean",
    )
    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=reward)

    compiles = [0]  # XLA compilations so far

    def count(event: str, duration: float, **kwargs) -> None:
        compiles[0] += event == "/jax/core/compile/backend_compile_duration"  # jax/_src/dispatch.py

    jax.monitoring.register_event_duration_secs_listener(count)
    steps: list[dict] = []
    work: list[dict] = []
    seen: dict = {}
    marks = {"end": time.perf_counter(), "compiles": 0}

    def timed(name, method, sync):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = method(*a, **k)
            sync(out)
            phase = seen.setdefault(name, 0.0)
            seen[name] = phase + time.perf_counter() - start
            if name == "rollout":
                work.append(
                    {
                        "rows": len(out.tokens),
                        "T": int(max(len(t) for t in out.tokens)),  # the longest response
                        "decoded_tokens": int(sum(len(t) for t in out.tokens)),
                    }
                )
                seen["prompt"] = np.asarray(out.left_padded_prompt_tokens)
            if name == "update":
                now = time.perf_counter()
                steps.append({k: seen.get(k, 0.0) for k in ("rollout", "reference", "update")})
                steps[-1] |= {"step": now - marks["end"], "compiles": compiles[0] - marks["compiles"]}
                marks["end"], marks["compiles"] = now, compiles[0]
                for k in ("rollout", "reference", "update"):
                    seen.pop(k, None)
            return out

        return wrapper

    cluster.generate = timed("rollout", cluster.generate, lambda out: jax.block_until_ready(out.tokens))
    cluster.get_ref_per_token_logps = timed("reference", cluster.get_ref_per_token_logps, jax.block_until_ready)
    cluster.update_actor = timed(
        "update", cluster.update_actor, lambda _: jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
    )
    # A numpy array of strings: the learner repeats each prompt G times with `jax.tree.map`, which
    # would treat a list's strings as separate leaves.
    dataset = [{"prompts": np.asarray([as_text(p) for p in ids])} for _ in range(args.steps)]
    marks["end"] = time.perf_counter()
    learner.train(dataset)
    padded = seen["prompt"]
    moved = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)),
        nnx.state(cluster.actor_trainer.model, nnx.Param),
        nnx.state(reference, nnx.Param),
    )
    print(
        json.dumps(
            {
                "steps": steps,
                "work": work,
                "prompt_len": int((padded[0] != args.pad_id).sum()),
                "prompt_sha": prompt_sha(padded),
                "params_changed": any(jax.tree.leaves(moved)),
                "jax": jax.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
