"""Building a run once: `build(cfg, mesh, train=...) -> Run`, the frozen bundle every phase uses.

A `Run` holds what does not change while a run goes on: the model's config and definition
(graph + shape-only state; the parameters themselves live in the `TrainState`), the tokenizer
and the prompt encoder, the row placement on the mesh, the sampling config, and, for training
only, the optimizer and the jitted step functions. Evaluation builds a run with `train=False`:
no optimizer, no Adam state, no step functions.

The parameters come separately (`initial_params`: the checkpoint's weights or a random
initialisation, created directly in their shardings), as do the records (`load_data`) and the
reward pool (`reward_pool`, which first checks that the reward can work with the records).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.nnx as nnx
import optax
from absl import logging
from jax.sharding import Mesh

from gtpo_jax.config import Config, ignored_fields
from gtpo_jax.data import tasks
from gtpo_jax.data.pipeline import PipelineConfig, PromptPipeline
from gtpo_jax.data.prompts import PromptEncoder
from gtpo_jax.data.sources import read_records
from gtpo_jax.data.tokenizer import Tokenizer, load_tokenizer
from gtpo_jax.errors import ConfigError
from gtpo_jax.models import presets
from gtpo_jax.models.families import family
from gtpo_jax.models.lora import add_adapters
from gtpo_jax.models.sharding import ModelDef, batch_width, create_sharded
from gtpo_jax.models.transformer import ModelConfig
from gtpo_jax.models.weights import load_hf, read_config
from gtpo_jax.parallel.mesh import mesh_from_config
from gtpo_jax.parallel.placement import Placement
from gtpo_jax.rewards.pool import RewardPool
from gtpo_jax.rewards.registry import check_reward, get_reward
from gtpo_jax.rollout.sampler import SamplingConfig
from gtpo_jax.training.state import make_optimizer
from gtpo_jax.training.update import StepFns, step_fns


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run is made of, built once (see the module docstring)."""

    cfg: Config
    mesh: Mesh
    model_cfg: ModelConfig
    model: ModelDef  # graph + abstract state; `model.merge(params)` is the policy
    tok: Tokenizer
    encode: PromptEncoder  # record -> prompt token ids (cached)
    place: Placement  # rows onto the mesh and back
    sampling: SamplingConfig  # the rollout section + G, stop and pad tokens
    optimizer: optax.GradientTransformation | None  # None when built for evaluation
    fns: StepFns | None  # the jitted scoring, loss preparation, update and mini-batch slicing
    sampler_shapes: set = dataclasses.field(default_factory=set)  # (P, prompt bucket, SamplingConfig) so far
    # (prompt bucket, response width) of the scoring pass and the update so far
    length_buckets: set = dataclasses.field(default_factory=set)

    def note_length_bucket(self, prompt_width: int, width: int) -> None:
        """Logs (at INFO) a `(prompt bucket, response length bucket)` shape seen for the first
        time: the scoring pass and the update compile once for each, so up to
        `len(rollout.prompt_buckets) x train.length_buckets` times."""
        if (prompt_width, width) not in self.length_buckets:
            self.length_buckets.add((prompt_width, width))
            logging.info(
                "scoring and update: compiling for prompt bucket %d and response length %d of T=%d (%d shapes so far)",
                prompt_width,
                width,
                self.cfg.rollout.max_new_tokens,
                len(self.length_buckets),
            )

    def note_sampler_shape(self, shape: tuple[int, ...], sampling: SamplingConfig, total_rows: int = 0) -> None:
        """Logs (at INFO) a sampler input seen for the first time: each is a compilation. A chunk
        of a larger draw (`rollout.batch_size`) also names the draw's `total_rows`."""
        if (*shape, sampling, total_rows) not in self.sampler_shapes:
            self.sampler_shapes.add((*shape, sampling, total_rows))
            r = sampling.rollout
            logging.info(
                "sampler: compiling for P=%d prompt bucket=%d G=%d T=%d temperature=%g (%s%d compilations so far)",
                *shape,
                sampling.group_size,
                r.max_new_tokens,
                r.temperature,
                f"a chunk of a {total_rows}-row draw; " if total_rows else "",
                len(self.sampler_shapes),
            )


def model_overrides(m: Any) -> dict[str, Any]:
    """The `ModelConfig` fields the model section sets, whatever the preset or checkpoint says."""
    return dict(
        param_dtype=str(m.param_dtype),
        dtype=str(m.dtype),
        remat=m.remat,
        attention=str(m.attention),
        attention_block=m.attention_block,
        attention_auto_len=m.attention_auto_len,
    )


def _model_and_tokenizer(cfg: Config) -> tuple[ModelConfig, Tokenizer]:
    m, t = cfg.model, cfg.tokenizer
    lora = dict(
        lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, lora_targets=m.lora_targets, lora_dropout=m.lora_dropout
    )
    dtypes = model_overrides(m) | lora
    if m.checkpoint:
        model_cfg = read_config(m.checkpoint, **dtypes)
        # The checkpoint's family decides the end-of-turn tokens, wherever the tokenizer lives.
        stops = family(model_cfg.architecture).stop_tokens
        tok = load_tokenizer(str(t.kind), t.path or m.checkpoint, stop_tokens=stops)
        return model_cfg, tok
    tok = load_tokenizer(str(t.kind), t.path)
    # A randomly initialised model gets exactly the tokenizer's vocabulary.
    return presets.get_preset(m.preset, vocab_size=tok.vocab_size, **dtypes), tok


def build(cfg: Config, mesh: Mesh | None = None, *, train: bool) -> Run:
    """The run of `cfg` on `mesh` (default: the config's mesh); `train=False` for evaluation only."""
    mesh = mesh or mesh_from_config(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.dcn_data)
    model_cfg, tok = _model_and_tokenizer(cfg)
    model = ModelDef.of(model_cfg)
    t = cfg.tokenizer
    encode = PromptEncoder(
        tok, template=str(t.chat_template), system_prompt=t.system_prompt, suffix=cfg.data.prompt_suffix
    )
    sampling = SamplingConfig(cfg.rollout, cfg.loss.group_size, tuple(tok.stop_ids), tok.pad_id)
    optimizer = fns = None
    for line in [*(ignored_fields(cfg) if train else []), *_replicated_rows(cfg, mesh, train=train)]:
        logging.warning("config: %s", line)
    if train:
        _note_one_call(cfg)
        optimizer = run_optimizer(cfg)
        fns = step_fns(model, cfg, optimizer, mesh)
    return Run(cfg, mesh, model_cfg, model, tok, encode, Placement(mesh), sampling, optimizer, fns)


def run_optimizer(cfg: Config) -> optax.GradientTransformation:
    """The run's optimiser: its schedule counts `ppo_epochs x mini_batches` updates a step."""
    updates_per_step = cfg.train.ppo_epochs * cfg.train.mini_batches
    return make_optimizer(cfg.optim, cfg.train.steps * updates_per_step, updates_per_step=updates_per_step)


EVAL_CHUNK = 64  # held-out prompts per evaluation sampler call when rollout.batch_size is 0


def eval_chunk(cfg: Config, width: int, samples: int, num_prompts: int) -> int:
    """Held-out prompts per evaluation sampler call of `samples` samples each, on a mesh whose
    batch axes split rows `width` ways. Under `jax.set_mesh` the decode's rows (prompts x
    samples) stay split over the devices when `width` divides them, whatever the prompts' own
    count; otherwise the call is replicated on every device (`width` x the KV cache). So: the
    most prompts whose rows fit `rollout.batch_size` and are a multiple of `width` (no more than
    `num_prompts` rounded up); without such a call (`_replicated_rows` warns) the most that fit.
    With `rollout.batch_size` 0, `EVAL_CHUNK` prompts (fewer for fewer), a multiple of `width`."""
    size = cfg.rollout.batch_size
    if not size:
        return -(-min(EVAL_CHUNK, num_prompts) // width) * width
    if samples > size:
        raise ConfigError(
            f"{samples} evaluation samples per prompt (eval.samples, or evaluate's --samples) exceed "
            f"rollout.batch_size={size} sequences a sampler call (a prompt's samples are drawn in one call): "
            "lower them or raise rollout.batch_size"
        )
    step = width // math.gcd(width, samples)  # prompts whose samples fill whole rows of the mesh
    most = size // samples
    if most < step:
        return most
    return min(most // step * step, -(-num_prompts // step) * step)


def _eval_samples(cfg: Config) -> list[tuple[str, int]]:
    """(what, samples per prompt) of each evaluation pass: the sampled one and the greedy one."""
    e = cfg.eval
    if e.temperature == 0:
        return [("eval.temperature=0 (one greedy sample per prompt)", 1)]
    return [(f"eval.samples={e.samples}", e.samples)] + (
        [("eval.greedy (one sample per prompt)", 1)] if e.greedy else []
    )


def _replicated_rows(cfg: Config, mesh: Mesh, *, train: bool = True) -> list[str]:
    """Rows that the batch axes cannot split are replicated on every device: N times the work.
    Sampler calls (the rollout's and the evaluation's) count their rows, prompts x samples."""
    width, p, out = batch_width(mesh), cfg.train.prompts_per_step, []
    size, g = cfg.rollout.batch_size, cfg.loss.group_size
    if train and p % width:
        out.append(
            f"train.prompts_per_step={p} is not a multiple of the {width} devices along the batch axes: the rollout "
            f"and scoring rows are replicated on every device ({width}x the work); use a multiple of {width}"
        )
    if train and size and size < p * g and size % width:
        out.append(
            f"rollout.batch_size={size} sequences a sampler call is not a multiple of the {width} devices along the "
            f"batch axes: the decode is replicated on every device; use a multiple of {math.lcm(width, g)}"
        )
    for what, k in _eval_samples(cfg) if size else []:
        rows = eval_chunk(cfg, width, k, cfg.eval.num_prompts) * k
        if rows % width:
            need = math.lcm(width, k)
            out.append(
                f"{what}: no evaluation sampler call of whole prompts within rollout.batch_size={size} sequences is "
                f"a multiple of the {width} devices along the batch axes (that takes {need // k} prompts x {k} "
                f"samples = {need} sequences): the evaluation's decode is replicated on every device ({width}x "
                f"the KV cache); raise rollout.batch_size to {need} or choose eval.samples so that it fits"
            )
    return out


def _note_one_call(cfg: Config) -> None:
    """Says (INFO) when `rollout.batch_size` holds a whole sampling round: chunking then has no effect."""
    size, p, g = cfg.rollout.batch_size, cfg.train.prompts_per_step, cfg.loss.group_size
    if size >= p * g:
        logging.info(
            "config: rollout.batch_size=%d holds a sampling round's train.prompts_per_step x loss.group_size = %d "
            "sequences: each round is one sampler call (the field bounds only the evaluation's calls)",
            size,
            p * g,
        )


def initial_params(run: Run) -> Any:
    """The policy's starting parameters, on the mesh: the checkpoint's weights, or a random init
    (with LoRA, plus fresh adapters: B = 0, so the policy starts as the base)."""
    m = run.cfg.model
    if not m.checkpoint:
        return nnx.to_pure_dict(nnx.state(create_sharded(run.model_cfg, run.mesh, seed=m.init_seed)))
    policy = load_hf(m.checkpoint, mesh=run.mesh, **model_overrides(m))
    return add_adapters(nnx.to_pure_dict(nnx.state(policy)), run.model_cfg, run.mesh, seed=m.init_seed)


def load_data(cfg: Config, encode: PromptEncoder | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, held-out records) as the config names them. With `encode`, records whose
    prompt is longer than `data.max_prompt_tokens` (0: the largest of `rollout.prompt_buckets`)
    are left out of both, counted in a warning: the warm-up and the evaluation see the prompts
    RL can see. A run without held-out records is warned about (it evaluates nothing)."""
    d = cfg.data
    if d.source == "task":
        common = dict(seed=d.seed, difficulty=d.difficulty, prompt_style=str(d.prompt_style), operations=d.operations)
        train = tasks.generate(d.task, d.num_train, split="train", **common)
        test = tasks.generate(d.task, d.num_test, split="test", **common)
    elif not d.path:
        raise ConfigError(f"data.source={str(d.source)!r} needs data.path (a file, or the tfds builder name)")
    else:
        train = list(read_records(str(d.source), d.path, str(d.fields), split="train"))
        test = list(read_records(str(d.source), d.test_path, str(d.fields), split="test")) if d.test_path else []
    if not test:
        logging.warning("data: no held-out records (data.test_path is empty): the run evaluates nothing")
    if encode is None:
        return train, test
    return _fitting(cfg, train, encode, "training"), _fitting(cfg, test, encode, "held-out")


def _fitting(cfg: Config, records: list[dict[str, Any]], encode: PromptEncoder, what: str) -> list[dict[str, Any]]:
    limit = cfg.data.max_prompt_tokens or cfg.rollout.prompt_buckets[-1]
    kept = [r for r in records if len(encode(r)) <= limit]
    if len(kept) < len(records):
        field = "data.max_prompt_tokens" if cfg.data.max_prompt_tokens else "the largest of rollout.prompt_buckets"
        logging.warning(
            "data: left out %d of %d %s prompts longer than %s=%d tokens",
            len(records) - len(kept),
            len(records),
            what,
            field,
            limit,
        )
    return kept


def prompt_pipeline(cfg: Config, records: list[dict[str, Any]], encode: PromptEncoder) -> PromptPipeline:
    """The training prompts, `train.prompts_per_step` a step, shuffled by `data.seed`, resumable.
    Every process walks the same global order and holds the step's records (small text); the
    rollout itself is split over the processes' devices (training/collect.py)."""
    settings = PipelineConfig(
        batch_size=cfg.train.prompts_per_step, seed=cfg.data.seed, max_prompt_tokens=cfg.data.max_prompt_tokens
    )
    try:
        return PromptPipeline(records, settings, prompt_tokens=lambda r: len(encode(r)))
    except ValueError as e:  # too few prompts for one step, named as the user wrote it
        if "fewer than one batch" not in str(e):
            raise
        n, limit = cfg.train.prompts_per_step, cfg.data.max_prompt_tokens
        raise ConfigError(f"train.prompts_per_step={n}: {e} (data.max_prompt_tokens={limit})") from None


def reward_pool(cfg: Config, train: list[dict[str, Any]], test: list[dict[str, Any]]) -> RewardPool:
    """The reward workers, after checking the reward takes its options and finds its fields in every
    record: a reward that cannot work fails here, naming the field, instead of scoring every
    response as a failure."""
    r = cfg.reward
    options = {"answer_pattern": r.answer_pattern} if r.answer_pattern else {}
    options |= {k: v for k, v in (("strict", r.strict), ("rel_tol", r.rel_tol)) if v is not None}
    where = cfg.data.path or f"task {cfg.data.task!r}"
    named = [(f"{where} record {i + 1} (id {x.get('id')})", x) for i, x in enumerate(train)]
    named += [
        (f"{cfg.data.test_path or where} held-out record {i + 1} (id {x.get('id')})", x) for i, x in enumerate(test)
    ]
    check_reward(get_reward(r.name), options, named, prefix="reward")
    return RewardPool(r.name, num_workers=r.num_workers, timeout_s=r.timeout_s, options=options)
