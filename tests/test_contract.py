"""The public signatures of the advantage module are a contract (issue: the loss module)."""

import inspect

import pytest

from gtpo_jax.losses import advantages

CONTRACT = {
    "grpo_advantages": "(rewards, mask, *, scale_rewards=True, eps=1e-06, valid=None, penalty=None)",
    "gtpo_advantages": (
        "(rewards, entropy, mask, *, alpha1=1.0, alpha2=0.1, success_threshold=0.5, eps=1e-06, "
        "norm='paper', scope='group', valid=None, penalty=None)"
    ),
    "grpo_s_advantages": (
        "(rewards, entropy, mask, *, beta1=1.0, beta2=0.1, success_threshold=0.5, eps=1e-06, norm='paper', "
        "valid=None, penalty=None)"
    ),
    "informative_groups": "(rewards, *, success_threshold=0.5)",
    "overlong_penalty": "(lengths, *, max_len, buffer_len, penalty=1.0)",
}


def _plain(sig: inspect.Signature) -> str:
    """The signature without annotations."""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_public_signature(name):
    assert _plain(inspect.signature(getattr(advantages, name))) == CONTRACT[name]
