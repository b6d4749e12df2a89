"""The catalogue's mistakes whose values are right and gradients wrong (a detached factor):
each has the library's value and another gradient, so only a check that compares gradients can
tell it from the right answer (the exercise checks do; tests/test_losses.py's value oracles
cannot, and skip them)."""

import pytest
import torch

from minirlhf.exercises import MISTAKES, get_reference


def random_logits(seed: int, shape=(3, 5, 11), scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


GRADIENT_ONLY = [(name, m) for name, mistakes in MISTAKES.items() for m in mistakes
                 if m.gradient_only]


def gradient_only_inputs(name: str) -> dict[str, torch.Tensor | float]:
    """Inputs of the exercise `name`, the first one the leaf to differentiate."""
    if name == "calc_kl_k3":
        return {"logprobs": -random_logits(0, (3, 5)).abs(),
                "ref_logprobs": -random_logits(1, (3, 5)).abs()}
    if name == "calc_kl_k3_is":  # an older sampling policy's log-probs last
        return {"logprobs": -random_logits(0, (3, 5)).abs(),
                "ref_logprobs": -random_logits(1, (3, 5)).abs(),
                "old_logprobs": -random_logits(3, (3, 5)).abs()}
    if name == "calc_entropy_bonus":
        return {"logits": random_logits(0), "ent_coef": 0.7}
    return {"logits": random_logits(0), "ref_logits": random_logits(1), "kl_coef": 0.7}


def test_there_are_gradient_only_mistakes():
    assert {name for name, _ in GRADIENT_ONLY} == {"calc_kl_penalty", "calc_entropy_bonus",
                                                  "calc_kl_k3", "calc_kl_k3_is"}


@pytest.mark.parametrize("name, mistake", GRADIENT_ONLY,
                         ids=[m.hint[:40] for _, m in GRADIENT_ONLY])
def test_a_gradient_only_mistake_has_the_right_value_and_a_wrong_gradient(name, mistake):
    """The library's loss and the mistake agree in value and differ in gradient: only a check
    that compares gradients can tell them apart."""
    first, *rest = gradient_only_inputs(name).values()
    results = []
    for fn in (get_reference(name), mistake.imitate):
        leaf = first.clone().requires_grad_(True)
        value = fn(leaf, *rest)
        weights = torch.randn(value.shape, generator=torch.Generator().manual_seed(2))
        results.append((value.detach(), torch.autograd.grad((value * weights).sum(), leaf)[0]))
    (value, grad), (wrong_value, wrong_grad) = results
    assert torch.allclose(value, wrong_value, atol=1e-6)
    assert not torch.allclose(grad, wrong_grad, atol=1e-4)
