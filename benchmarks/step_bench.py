"""One whole RL step of ours against Tunix's `GRPOLearner`, side by side on the same workload.

Prints one JSON line per model preset. The workload (issue 18): P = 2 prompts x G = 4 samples,
32-token prompts, T = 128 new tokens at temperature 1 (no stop token: every response runs to T),
a KL term of coefficient 0.04 (k3, Tunix's `low_var_kl`) against a reference model, the
sequence-mean-token-mean loss aggregation, and one optimiser update (AdamW, lr 1e-6, global-norm
clip 1) per step. Weights are random, exported with `export_hf` to HF safetensors; both sides
load that checkpoint. The reward is a cheap rule on the token ids (1 when their sum is even).

    python benchmarks/step_bench.py --presets=tiny,smollm2_135m --steps=5 \\
        --tunix_python /path/to/tunix-env/bin/python

Ours: the run's own phase functions (training/build.py `build`; the sampler, the scoring pass,
loss preparation and `update.train_on`), as `Trainer.step` calls them, on a config built in code,
timed phase by phase with a device sync after each: `rollout` (sampling and the rewards),
`score` (the policy's log-probs and entropies, the update's old log-probs; Tunix skips this pass
when it makes one update per rollout), `reference` (the reference model's log-probs) and
`update` (loss preparation and the optimiser step). GRPO and GTPO (the same rollout, loss
aggregation and KL, dynamic sampling off: only the advantage differs) alternate step by step in
one process; `gtpo_over_grpo_step` is the ratio of their median step times.

Tunix: `tunix_step_run.py` in Tunix's own environment (a subprocess), `GRPOLearner` with the
vanilla rollout, on the same prompt token ids (`tunix_common.IdsTokenizer`) and the same workload;
its phases are `rollout` (`RLCluster.generate`), `reference` (`get_ref_per_token_logps`) and
`update` (`update_actor`). Its step time is the time between the ends of consecutive updates.

Each side's step time is the median over the steps after `--warmup` steps (compilation). The
work is checked equal (`fairness`): the same prompt token matrix (length and fingerprint), rows
and decoded tokens in every timed step; otherwise the row is `"valid": false` and carries no
`step_speedup_vs_tunix` (= Tunix's median step time over ours, GRPO).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_bench import PAD_ID, prompt_ids, prompt_sha  # noqa: E402

from gtpo_jax.config import Config, from_dict  # noqa: E402
from gtpo_jax.data.prompts import pad_prompts  # noqa: E402
from gtpo_jax.models.presets import get_preset  # noqa: E402
from gtpo_jax.models.transformer import Transformer  # noqa: E402
from gtpo_jax.models.weights import export_hf  # noqa: E402
from gtpo_jax.rollout.sampler import sample  # noqa: E402
from gtpo_jax.training.build import Run, build, initial_params  # noqa: E402
from gtpo_jax.training.state import init_state  # noqa: E402
from gtpo_jax.training.update import Groups, train_on  # noqa: E402

PHASES = ("rollout", "score", "reference", "update")
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # one XLA compilation (jax/_src/dispatch.py)
COMPILES = [0]  # compilations in this process so far (`count_compiles`)


def count_compiles() -> None:
    """Counts every XLA compilation of this process into `COMPILES` (registered once)."""

    def listener(event: str, duration: float, **kwargs) -> None:
        COMPILES[0] += event == BACKEND_COMPILE

    if not getattr(count_compiles, "registered", False):
        jax.monitoring.register_event_duration_secs_listener(listener)
        count_compiles.registered = True


TUNIX_PHASES = ("rollout", "reference", "update")
KL_COEF = 0.04
LEARNING_RATE = 1e-6


def write_checkpoint(preset: str, directory: Path) -> None:
    """The preset's random model as a HF checkpoint (`export_hf`) with a word-level tokenizer of
    its vocabulary (`t0 ... t{V-1}`, pad `t0`, no BOS or EOS) that our run loads with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = Transformer(get_preset(preset), rngs=nnx.Rngs(0))
    export_hf(model, directory)
    V = model.cfg.vocab_size
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": f"t{PAD_ID}"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def our_config(checkpoint: str, algorithm: str, *, P: int, G: int, prompt_len: int, T: int, run_dir: str) -> Config:
    """The workload as our config: the same loss aggregation, KL and clipping for GRPO and GTPO."""
    return from_dict(
        {
            "model": {"checkpoint": checkpoint},
            "tokenizer": {"kind": "hf", "path": checkpoint},
            "rollout": {"max_new_tokens": T, "temperature": 1.0, "prompt_buckets": (prompt_len,)},
            "loss": {
                "algorithm": algorithm,
                "group_size": G,
                "kl_coef": KL_COEF,
                "kl_estimator": "k3",
                "loss_agg": "seq_mean_token_mean",
                "eps_low": 0.2,
                "eps_high": 0.2,
                "dynamic_sampling": False,
                "mask_truncated": False,
            },
            "optim": {"learning_rate": LEARNING_RATE, "max_grad_norm": 1.0, "weight_decay": 0.0},
            "train": {"prompts_per_step": P, "length_buckets": 1, "run_dir": run_dir},
            "data": {"max_prompt_tokens": prompt_len},
        }
    )


def rewards_of(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`[P, G]` rewards: 1 when the sum of a response's token ids is even (`tunix_step_run.reward`)."""
    T = tokens.shape[-1]
    kept = np.where(np.arange(T) < lengths[..., None], tokens, 0)
    return (kept.sum(axis=-1) % 2 == 0).astype(np.float32)


class OurSide:
    """One algorithm's run on the workload: its `Run`, train state and KL reference."""

    def __init__(self, cfg: Config, prompts: np.ndarray, valid: np.ndarray, mesh: Mesh | None = None):
        self.run: Run = build(cfg, mesh, train=True)
        params = initial_params(self.run)
        self.ref = jax.tree.map(jnp.copy, params)
        self.state = init_state(params, self.run.optimizer, cfg.train.seed, mesh=self.run.mesh)
        self.sampling = self.run.sampling._replace(stop_token_ids=())  # every response runs to T
        self.prompts, self.valid = self.run.place.put((prompts, valid))
        self.host_prompts = prompts

    def step(self, key: jax.Array) -> tuple[dict[str, float], dict]:
        """One RL step, as `Trainer.step` makes it: `(phase seconds, work)`."""
        run, cfg, marks, compiles = self.run, self.run.cfg, [time.perf_counter()], COMPILES[0]
        rollout = run.place.as_rows(sample(run.model, self.state.params, self.prompts, self.valid, key, self.sampling))
        tokens, lengths = jax.device_get((rollout.tokens, rollout.lengths))
        rewards = rewards_of(tokens, lengths)
        marks.append(time.perf_counter())
        groups = Groups(self.prompts, self.valid, rollout.tokens, rollout.mask)
        old_logp, entropy = jax.block_until_ready(run.fns.score(self.state.params, groups))
        marks.append(time.perf_counter())
        ref_logp = jax.block_until_ready(run.fns.score(self.ref, groups)[0])
        marks.append(time.perf_counter())
        correct = rewards > cfg.loss.success_threshold
        informative = correct.any(axis=-1) & (~correct).any(axis=-1)
        verdicts = run.place.put((rewards, np.ones_like(correct), correct, informative))
        loss_batch, _ = run.fns.prepare(
            verdicts, groups, rollout.lengths, rollout.finish_reason, old_logp, entropy, ref_logp
        )
        self.state, _ = train_on(run.fns, self.state, groups, loss_batch, cfg)  # blocks on the params
        self.state = self.state._replace(step=self.state.step + 1)
        marks.append(time.perf_counter())
        phases = {name: b - a for name, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True)}
        work = {
            "rows": int(tokens.shape[0] * tokens.shape[1]),
            "T": int(tokens.shape[-1]),
            "decoded_tokens": int(lengths.sum()),
        }
        return phases | {"step": marks[-1] - marks[0], "compiles": COMPILES[0] - compiles}, work


def median_phases(steps: list[dict[str, float]], names: tuple[str, ...]) -> dict[str, float]:
    return {name: statistics.median(s[name] for s in steps) for name in names}


def run_ours(
    checkpoint: str, *, P: int, G: int, prompt_len: int, T: int, steps: int, warmup: int, mesh: Mesh | None = None
) -> dict:
    """GRPO and GTPO alternating step by step: per algorithm, the median phase and step seconds
    over the steps after `warmup`, and the work of every step (on `mesh`; default: the config's,
    every device)."""
    count_compiles()
    ids = prompt_ids(P, prompt_len, json.loads((Path(checkpoint) / "config.json").read_text())["vocab_size"])
    prompts, valid = pad_prompts(ids, (prompt_len,), PAD_ID)
    out = {"prompt_len": int(valid.sum(axis=1).max()), "prompt_sha": prompt_sha(np.repeat(prompts, G, axis=0))}
    with tempfile.TemporaryDirectory() as tmp:
        sides = {
            alg: OurSide(
                our_config(checkpoint, alg, P=P, G=G, prompt_len=prompt_len, T=T, run_dir=tmp), prompts, valid, mesh
            )
            for alg in ("grpo", "gtpo")
        }
        timings: dict[str, list] = {alg: [] for alg in sides}
        work: dict[str, list] = {alg: [] for alg in sides}
        for i in range(warmup + steps):
            key = jax.random.fold_in(jax.random.key(0), i)
            for alg, side in sides.items():
                phases, did = side.step(key)
                work[alg].append(did)
                if i >= warmup:
                    timings[alg].append(phases)
    for alg in sides:
        out[alg] = median_phases(timings[alg], (*PHASES, "step"))
        out[f"{alg}_compiles_timed"] = sum(t["compiles"] for t in timings[alg])
        out[f"{alg}_work"] = work[alg]
    return out


def run_tunix(
    python: str, checkpoint: str, *, P: int, G: int, prompt_len: int, T: int, steps: int, warmup: int
) -> dict:
    """`tunix_step_run.py` on the checkpoint and our prompt ids, in Tunix's environment."""
    vocab = json.loads((Path(checkpoint) / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "prompts.json").write_text(json.dumps(prompt_ids(P, prompt_len, vocab)))
        cmd = [
            python,
            str(Path(__file__).with_name("tunix_step_run.py")),
            checkpoint,
            f"--prompts={tmp}/prompts.json",
            f"--G={G}",
            f"--T={T}",
            f"--steps={warmup + steps}",
            f"--pad_id={PAD_ID}",
            f"--kl_coef={KL_COEF}",
            f"--learning_rate={LEARNING_RATE}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-2000:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    timed = result["steps"][warmup:]
    return {
        "prompt_len": result["prompt_len"],
        "prompt_sha": result["prompt_sha"],
        "work": result["work"],
        **median_phases(timed, (*TUNIX_PHASES, "step")),
        "compiles_timed": sum(t["compiles"] for t in timed),
        "jax": result["jax"],
        "params_changed": result["params_changed"],
    }


def fairness(ours: dict, tunix: dict, *, rows: int, T: int) -> dict:
    """`valid` (and `step_speedup_vs_tunix`) when both sides decoded from the same prompt tokens and
    every step of both decoded `rows x T` tokens; else `valid: false` and the reasons."""
    if "error" in tunix or "step" not in tunix:
        return {"valid": False, "invalid_reasons": ["no Tunix measurement"]}
    reasons = [
        f"prompt {key}: ours {ours[key]!r}, Tunix {tunix[key]!r}"
        for key in ("prompt_len", "prompt_sha")
        if ours[key] != tunix[key]
    ]
    expected = {"rows": rows, "T": T, "decoded_tokens": rows * T}
    for side, steps in (("ours grpo", ours["grpo_work"]), ("ours gtpo", ours["gtpo_work"]), ("Tunix", tunix["work"])):
        reasons += [f"{side} step {i}: {w} != {expected}" for i, w in enumerate(steps) if w != expected]
    if reasons:
        return {"valid": False, "invalid_reasons": reasons}
    return {"valid": True, "step_speedup_vs_tunix": tunix["step"] / ours["grpo"]["step"]}


def measure(preset: str, args) -> dict:
    P, G, L, T = args.P, args.G, args.prompt_len, args.T
    shape = dict(P=P, G=G, prompt_len=L, T=T, steps=args.steps, warmup=args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(preset, Path(tmp))
        ours = run_ours(tmp, **shape)
        tunix = run_tunix(args.tunix_python, tmp, **shape) if args.tunix_python else {}
    record = {
        "benchmark": "rl_step",
        "preset": preset,
        "rows": P * G,
        "P": P,
        "G": G,
        "prompt_len": L,
        "T": T,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        **{f"ours_grpo_{k}_s": v for k, v in ours["grpo"].items()},
        **{f"ours_gtpo_{k}_s": v for k, v in ours["gtpo"].items()},
        "gtpo_over_grpo_step": ours["gtpo"]["step"] / ours["grpo"]["step"],
        # XLA compilations inside the timed steps (0 = steady state)
        "ours_grpo_compiles_timed": ours["grpo_compiles_timed"],
        "ours_gtpo_compiles_timed": ours["gtpo_compiles_timed"],
        "backend": jax.default_backend(),
        "jax": jax.__version__,
    }
    if args.tunix_python:
        record |= {f"tunix_{k}_s": tunix[k] for k in (*TUNIX_PHASES, "step") if k in tunix}
        if "error" in tunix:
            record["tunix_error"] = tunix["error"]
        else:  # the learner did update the policy (it kept a reference copy apart)
            record |= {
                "tunix_compiles_timed": tunix["compiles_timed"],
                "tunix_jax": tunix["jax"],
                "tunix_params_changed": tunix["params_changed"],
            }
        record |= fairness(ours, tunix, rows=P * G, T=T)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,smollm2_135m", help="comma-separated model presets")
    parser.add_argument("--P", type=int, default=2, help="prompts per step")
    parser.add_argument("--G", type=int, default=4, help="responses per prompt")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--T", type=int, default=128, help="new tokens per response")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after the warm-up ones)")
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed (compilation)")
    parser.add_argument("--tunix_python", default="", help="python of an environment with google-tunix")
    args = parser.parse_args()
    for preset in args.presets.split(","):
        print(json.dumps(measure(preset, args)), flush=True)


if __name__ == "__main__":
    main()
