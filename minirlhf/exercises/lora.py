"""Checks for notebook 9: a LoRA adapter, and the reference with it off (attaching the adapter to
a model is checked in `lora_attach.py`).

The oracles never run an adapter: a LoRA model is the same model with the adapted weight
*replaced* by W + (alpha / rank) * B @ A (TransformerLens's forward through
`torch.func.functional_call`, no hook at all), and its reference is an untouched copy of the base
model, loaded again from the same seed. Mistakes are recognised by what the learner's code does
(a fresh adapter that changes the model, logits off by the factor alpha / rank, base weights that
still require grad, a reference whose logits are the policy's); tests/wrong_impls/lora.py holds a
wrong implementation for each.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from minirlhf.exercises.core import (
    agree,
    describe_difference,
    load_char_model,
    passed,
    single_threaded,
)
from minirlhf.exercises.reporting import call, crash_hint, describe_error, fail, learner_facing
from minirlhf.runtime import lora

# ---------------------------------------------------------------- the adapter module

SCALE_MISTAKES = [
    (lambda rank, alpha: (alpha / rank) ** 2, "alpha / rank is applied twice (in __init__ and "
     "again in forward, or in both forward and delta): multiply by it once."),
    (lambda rank, alpha: 1.0, "the scale alpha / rank is missing: multiply B(A(x)) by "
     "alpha / rank (compute it once in __init__, e.g. self.scale = alpha / rank)."),
    (lambda rank, alpha: alpha, "the scale is alpha / rank, not alpha: dividing by the rank "
     "keeps the first updates the same size whatever rank you pick."),
    (lambda rank, alpha: rank / alpha, "the scale is upside down: it is alpha / rank."),
    (lambda rank, alpha: alpha * rank, "the scale is alpha / rank: divide by the rank."),
]
"""(the factor a wrong scale uses, the hint): what a forward off by a factor is told."""

LORA_CASES = [dict(d_in=6, d_out=5, rank=2, alpha=3.0), dict(d_in=8, d_out=3, rank=4, alpha=2.0)]
"""Two adapters whose scales (1.5 and 0.5) tell every wrong scale above apart: with alpha 3 and
rank 2 the wrong factors are 2.25, 1, 3, 0.667 and 6, no two alike (alpha 4 and rank 2 made
(alpha / rank)^2 = alpha)."""


def _fail(case: dict, describe: str, problem: str, hint: str | None = None,
          error: BaseException | None = None) -> None:
    """Fail with the adapter's arguments as the case to re-run (by building it again)."""
    __tracebackhide__ = True
    fail("Lora", describe, problem, hint, inputs=dict(case), error=error,
         rerun="Lora(*exercises.last_failure().inputs.values())")


def _build(lora_class: Callable[..., nn.Module], case: dict) -> nn.Module:
    """The learner's adapter, built from a fixed seed; its A and B, checked for shape."""
    describe = ", ".join(f"{k}={v}" for k, v in case.items())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module, error = call(lora_class, dict(case), positional=True)
    if error is not None:
        _fail(case, describe, f"Building it failed. {describe_error(error)}", crash_hint(error),
              error=error)
    registered = {id(p) for p in module.parameters()}
    extra = [n for n, p in module.named_parameters() if n not in ("A", "B")]
    if extra:
        _fail(case, describe, f"The adapter has parameters besides A and B: {extra}.",
              "only A and B are trained; the scale alpha / rank is a fixed number (store it as "
              "a float), not an nn.Parameter that the optimiser would change.")
    for name, shape in (("A", (case["rank"], case["d_in"])), ("B", (case["d_out"], case["rank"]))):
        param = getattr(module, name, None)
        if not isinstance(param, nn.Parameter) or id(param) not in registered:
            _fail(case, describe, f"`self.{name}` is not a registered nn.Parameter.",
                 f"wrap the tensor in nn.Parameter (self.{name} = nn.Parameter(...)): only "
                 "parameters are trained and moved with the module.")
        if tuple(param.shape) != shape:
            _fail(case, describe, f"`self.{name}` has shape {tuple(param.shape)}, expected "
                 f"{shape}.", "A is (rank, d_in) and B is (d_out, rank): F.linear's (out, in) "
                 "layout, so x -> B(A(x)) maps d_in to rank to d_out.")
    return module


def _check_fresh(module: nn.Module, case: dict, describe: str) -> None:
    """A fresh adapter adds nothing (B = 0), can learn (A random), and passes gradients to B."""
    A, B = module.A, module.B
    if not torch.all(B == 0):
        _fail(case, describe, "B is not zero in a fresh adapter, so adding it changes the model "
             "before any training.", "B must start at zero (A random): then W + scale * B @ A = "
             "W and training starts from exactly the base model (Hu et al. 2021).")
    if torch.all(A == 0):
        _fail(case, describe, "A and B are both zero in a fresh adapter.", "with both zero "
             "every gradient is zero (dB needs A x, dA needs B) and the adapter never learns: "
             "initialise A randomly (nn.init.kaiming_uniform_, as nn.Linear does).")
    x = torch.randn(2, 4, case["d_in"], generator=torch.Generator().manual_seed(1))
    out, error = call(module, {"x": x}, positional=True)
    if error is not None:
        _fail(case, describe, f"forward(x) failed. {describe_error(error)}", crash_hint(error),
             error=error)
    problem = describe_difference(torch.zeros(2, 4, case["d_out"]), out)
    if problem is not None:
        _fail(case, describe, f"A fresh adapter's output should be zero. {problem}",
             "forward returns only the low-rank term scale * B(A(x)), which the model adds to W x.")
    if not out.requires_grad:
        _fail(case, describe, "forward's output has no gradient.", "did you compute it under "
             "torch.no_grad() or .detach() it?")
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    if B.grad is None or not B.grad.abs().sum() > 0:
        _fail(case, describe, "A loss on a fresh adapter's output sends no gradient to B.")
    module.zero_grad()


def randomise_adapter(module: nn.Module, seed: int) -> tuple[Tensor, Tensor]:
    """Give the adapter's A and B seeded non-zero values (as after some training); return them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (module.A, module.B):
            param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    return module.A.detach().clone(), module.B.detach().clone()


def _scale_hint(got: Any, x: Tensor, weight: Tensor, low_rank: Tensor, case: dict) -> str | None:
    """The hint of the wrong scale that reproduces `got`, if one does."""
    for factor, hint in SCALE_MISTAKES:
        wrong = F.linear(x, weight + factor(case["rank"], case["alpha"]) * low_rank)
        if describe_difference(wrong, got) is None:
            return hint
    return None


def _check_forward_and_delta(module: nn.Module, case: dict, describe: str) -> None:
    """W x + forward(x) and W + delta() against the replaced weight W + (alpha / rank) B @ A."""
    A, B = randomise_adapter(module, seed=3)
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(case["d_out"], case["d_in"], generator=gen)
    x = torch.randn(3, 2, case["d_in"], generator=gen)
    replaced = weight + case["alpha"] / case["rank"] * (B @ A)
    out, error = call(module, {"x": x}, positional=True)
    if error is not None:
        _fail(case, describe, f"forward(x) failed. {describe_error(error)}", crash_hint(error),
             error=error)
    got = F.linear(x, weight) + out
    problem = describe_difference(F.linear(x, replaced), got, dims="batch, pos, d_out")
    if problem is not None:
        _fail(case, f"{describe}, A and B random", "W x + forward(x) is not the output of the "
             f"replaced weight (W + alpha / rank * B @ A) x. {problem}",
             _scale_hint(got, x, weight, B @ A, case))
    delta, error = call(module.delta, {})
    if error is not None:
        _fail(case, describe, f"delta() failed. {describe_error(error)}", crash_hint(error),
             error=error)
    if isinstance(delta, Tensor) and delta.shape == (case["d_in"], case["d_out"]) != delta.T.shape:
        _fail(case, describe, f"delta() has shape {tuple(delta.shape)}, expected "
             f"{(case['d_out'], case['d_in'])}.", "delta is in F.linear's (out, in) layout, the "
             "layout of W: scale * B @ A.")
    problem = describe_difference(replaced - weight, delta, dims="d_out, d_in")
    if problem is not None:
        got_weight = weight + delta if isinstance(delta, Tensor) else delta
        hint = _scale_hint(F.linear(x, got_weight), x, weight, B @ A, case)
        _fail(case, f"{describe}, A and B random", f"delta() is not (alpha / rank) * B @ A. "
             f"{problem}", hint)


@learner_facing
@single_threaded
def check_lora(lora_class: Callable[..., nn.Module]) -> None:
    """Check a LoRA adapter class: `Lora(d_in, d_out, rank, alpha)` with parameters A (rank, d_in)
    random and B (d_out, rank) zero, `forward(x)` = (alpha / rank) * B(A(x)) and `delta()` =
    (alpha / rank) * B @ A."""
    for case in LORA_CASES:
        describe = ", ".join(f"{k}={v}" for k, v in case.items())
        module = _build(lora_class, case)
        _check_fresh(module, case, describe)
        _check_forward_and_delta(module, case, describe)
    passed("Lora", "fresh adapters add nothing and pass gradients to B; W x + forward(x) and "
           "W + delta() equal the replaced weight W + (alpha / rank) B @ A (ranks 2 and 4)")


# ---------------------------------------------------------------- the reference: adapters off

REF_CASE = ("a 2-layer random model with the library's adapters on q, v and out (rank 2, alpha "
            "4, A and B random)")


def _ref_models() -> tuple[HookedTransformer, HookedTransformer, Tensor]:
    """A LoRA policy (the library's adapters, randomised), the untouched base model, tokens."""
    model, base = (load_char_model(n_layers=2, d_model=16, n_heads=2, seed=2) for _ in range(2))
    adapters = lora.add_lora(model, rank=2, alpha=4.0, targets=["q", "v", "out"])
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for param in adapters.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(0))
    return model, base, tokens


def reference_get_ref_logits(model: HookedTransformer, tokens: Tensor) -> Tensor:
    """minirlhf's solution: the policy's forward with its adapters off, without gradient."""
    with lora.adapters_off(model), torch.no_grad():
        return model(tokens)


def _check_adapters_back_on(model: HookedTransformer, tokens: Tensor, policy: Tensor,
                            case: str) -> None:
    with torch.no_grad():
        after = model(tokens)
    if not lora.lora_active(model) or describe_difference(policy, after) is not None:
        fail("get_ref_logits", case, inputs={"model": model, "tokens": tokens}, problem=
             "After your function returned, the model computes the base "
             "model's logits, not the policy's.", hint="the adapters are left off: the policy "
             "would "
             "then sample and train without them. Turn them back on when the reference's "
             "forward is done (`with adapters_off(model):` does it for you).")


@learner_facing
@single_threaded
def check_get_ref_logits(fn: Callable[..., Tensor]) -> None:
    """Check `fn(model, tokens)`: the reference model's logits, computed as the LoRA policy's
    forward with its adapters off, leaving the adapters on afterwards."""
    model, base, tokens = _ref_models()
    with torch.no_grad():
        expected, policy = base(tokens), model(tokens)
    agree("get_ref_logits", REF_CASE, reference_get_ref_logits(model, tokens), expected)
    got, error = call(fn, {"model": model, "tokens": tokens}, positional=True)
    if error is not None:
        fail("get_ref_logits", REF_CASE, describe_error(error), crash_hint(error), error=error,
             inputs={"model": model, "tokens": tokens})
    problem = describe_difference(expected, got, dims="batch, seq, d_vocab")
    if problem is not None:
        hint = ("the adapters were left on: those are the policy's logits. The reference is the "
                "base model, the policy with its adapters off; with them on, the KL penalty "
                "compares the policy with itself and is always zero."
                if describe_difference(policy, got) is None else None)
        fail("get_ref_logits", REF_CASE, f"The logits are not the base model's. {problem}", hint,
             inputs={"model": model, "tokens": tokens}, expected=expected, got=got)
    _check_adapters_back_on(model, tokens, policy, REF_CASE)
    bad = tokens.clone()
    bad[0, 0] = model.cfg.d_vocab + 5  # out of the vocabulary: the embedding raises
    case = "a batch with a token outside the vocabulary, so the forward pass raises"
    _, error = call(fn, {"model": model, "tokens": bad}, positional=True)
    if error is not None and not lora.lora_active(model):
        fail("get_ref_logits", case, inputs={"model": model, "tokens": bad}, problem=
             "After the forward pass raised, the adapters stayed off.", hint=
             "turn them back on in a `finally:` block (or use `with adapters_off(model):`), so "
             "an error, or an interrupted cell, does not leave the policy without them.")
    passed("get_ref_logits", "the base model's logits (an untouched copy as the oracle), and the "
           "adapters back on afterwards, even when the forward pass raised")


REFERENCES: dict[str, Callable[..., Any]] = {
    "Lora": lora.Lora,
    "get_ref_logits": reference_get_ref_logits,
}
"""minirlhf's solutions to this notebook's exercises (`get_reference` reads them)."""
