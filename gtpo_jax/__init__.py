"""gtpo_jax: RL post-training of language models in JAX, built around GTPO and GRPO-S.

The loss module (`gtpo_jax.losses`) holds GRPO, DAPO, GTPO and GRPO-S as pure, jit-able
functions over group-aligned `[P, G, T]` arrays (P prompts, G responses each, T tokens).
"""

__version__ = "0.1.0"
