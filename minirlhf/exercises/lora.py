"""Checks for notebook 9: a LoRA adapter, attaching it to a model, and the reference with it off.

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
from torch.func import functional_call
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
    (lambda rank, alpha: 1.0, "the scale alpha / rank is missing: multiply B(A(x)) by "
     "alpha / rank (compute it once in __init__, e.g. self.scale = alpha / rank)."),
    (lambda rank, alpha: alpha, "the scale is alpha / rank, not alpha: dividing by the rank "
     "keeps the first updates the same size whatever rank you pick."),
    (lambda rank, alpha: rank / alpha, "the scale is upside down: it is alpha / rank."),
    (lambda rank, alpha: alpha * rank, "the scale is alpha / rank: divide by the rank."),
]
"""(the factor a wrong scale uses, the hint): what a forward off by a factor is told."""

LORA_CASES = [dict(d_in=6, d_out=5, rank=2, alpha=4.0), dict(d_in=8, d_out=3, rank=4, alpha=2.0)]
"""Two adapters whose scales (2 and 0.5) tell every wrong scale above apart."""


def _build(lora_class: Callable[..., nn.Module], case: dict) -> nn.Module:
    """The learner's adapter, built from a fixed seed; its A and B, checked for shape."""
    describe = ", ".join(f"{k}={v}" for k, v in case.items())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module, error = call(lora_class, dict(case), positional=True)
    if error is not None:
        fail("Lora", describe, f"Building it failed. {describe_error(error)}", crash_hint(error),
             inputs=dict(case), error=error, rerun="Lora(*exercises.last_failure().inputs."
             "values())")
    registered = {id(p) for p in module.parameters()}
    for name, shape in (("A", (case["rank"], case["d_in"])), ("B", (case["d_out"], case["rank"]))):
        param = getattr(module, name, None)
        if not isinstance(param, nn.Parameter) or id(param) not in registered:
            fail("Lora", describe, f"`self.{name}` is not a registered nn.Parameter.",
                 f"wrap the tensor in nn.Parameter (self.{name} = nn.Parameter(...)): only "
                 "parameters are trained and moved with the module.")
        if tuple(param.shape) != shape:
            fail("Lora", describe, f"`self.{name}` has shape {tuple(param.shape)}, expected "
                 f"{shape}.", "A is (rank, d_in) and B is (d_out, rank): F.linear's (out, in) "
                 "layout, so x -> B(A(x)) maps d_in to rank to d_out.")
    return module


def _check_fresh(module: nn.Module, case: dict, describe: str) -> None:
    """A fresh adapter adds nothing (B = 0), can learn (A random), and passes gradients to B."""
    A, B = module.A, module.B
    if not torch.all(B == 0):
        fail("Lora", describe, "B is not zero in a fresh adapter, so adding it changes the model "
             "before any training.", "B must start at zero (A random): then W + scale * B @ A = "
             "W and training starts from exactly the base model (Hu et al. 2021).")
    if torch.all(A == 0):
        fail("Lora", describe, "A and B are both zero in a fresh adapter.", "with both zero "
             "every gradient is zero (dB needs A x, dA needs B) and the adapter never learns: "
             "initialise A randomly (nn.init.kaiming_uniform_, as nn.Linear does).")
    x = torch.randn(2, 4, case["d_in"], generator=torch.Generator().manual_seed(1))
    out, error = call(module, {"x": x}, positional=True)
    if error is not None:
        fail("Lora", describe, f"forward(x) failed. {describe_error(error)}", crash_hint(error),
             error=error)
    problem = describe_difference(torch.zeros(2, 4, case["d_out"]), out)
    if problem is not None:
        fail("Lora", describe, f"A fresh adapter's output should be zero. {problem}",
             "forward returns only the low-rank term scale * B(A(x)), which the model adds to W x.")
    if not out.requires_grad:
        fail("Lora", describe, "forward's output has no gradient.", "did you compute it under "
             "torch.no_grad() or .detach() it?")
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    if B.grad is None or not B.grad.abs().sum() > 0:
        fail("Lora", describe, "A loss on a fresh adapter's output sends no gradient to B.")
    module.zero_grad()


def _randomise(module: nn.Module, seed: int) -> tuple[Tensor, Tensor]:
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
    A, B = _randomise(module, seed=3)
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(case["d_out"], case["d_in"], generator=gen)
    x = torch.randn(3, 2, case["d_in"], generator=gen)
    replaced = weight + case["alpha"] / case["rank"] * (B @ A)
    out, error = call(module, {"x": x}, positional=True)
    if error is not None:
        fail("Lora", describe, f"forward(x) failed. {describe_error(error)}", crash_hint(error),
             error=error)
    got = F.linear(x, weight) + out
    problem = describe_difference(F.linear(x, replaced), got, dims="batch, pos, d_out")
    if problem is not None:
        fail("Lora", f"{describe}, A and B random", "W x + forward(x) is not the output of the "
             f"replaced weight (W + alpha / rank * B @ A) x. {problem}",
             _scale_hint(got, x, weight, B @ A, case))
    delta, error = call(module.delta, {})
    if error is not None:
        fail("Lora", describe, f"delta() failed. {describe_error(error)}", crash_hint(error),
             error=error)
    if isinstance(delta, Tensor) and delta.shape == (case["d_in"], case["d_out"]) != delta.T.shape:
        fail("Lora", describe, f"delta() has shape {tuple(delta.shape)}, expected "
             f"{(case['d_out'], case['d_in'])}.", "delta is in F.linear's (out, in) layout, the "
             "layout of W: scale * B @ A.")
    problem = describe_difference(replaced - weight, delta, dims="d_out, d_in")
    if problem is not None:
        got_weight = weight + delta if isinstance(delta, Tensor) else delta
        hint = _scale_hint(F.linear(x, got_weight), x, weight, B @ A, case)
        fail("Lora", f"{describe}, A and B random", f"delta() is not (alpha / rank) * B @ A. "
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


# ---------------------------------------------------------------- attaching it to a model

ATTACH = dict(layer=1, rank=2, alpha=4.0)
ATTACH_CASE = ("a 2-layer random model (d_model 16, d_mlp 64), attach_lora(model, layer=1, "
               "rank=2, alpha=4.0)")


def _attach_models() -> tuple[HookedTransformer, HookedTransformer, Tensor]:
    """Two copies of the same tiny model (the learner's, and the oracle's, never hooked) and a
    batch of tokens."""
    model, oracle = (load_char_model(n_layers=2, d_model=16, n_heads=2, seed=1) for _ in range(2))
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(0))
    return model, oracle, tokens


def replaced_logits(oracle: HookedTransformer, tokens: Tensor, layer: int, A: Tensor, B: Tensor,
                    scale: float) -> Tensor:
    """The oracle: the model with blocks.{layer}.mlp.W_out replaced by W_out + (scale B @ A)^T
    (TransformerLens keeps W_out as (d_mlp, d_model), the transpose of F.linear's layout)."""
    name = f"blocks.{layer}.mlp.W_out"
    weight = dict(oracle.named_parameters())[name]
    return functional_call(oracle, {name: weight + (scale * B @ A).T}, (tokens,))


def _hooked_adapter(oracle: HookedTransformer, tokens: Tensor, A: Tensor, B: Tensor,
                    scale: float, read: str, replace: bool) -> Tensor:
    """The oracle's logits with an adapter hooked on W_out of block `layer` that reads
    `mlp.hook_{read}` and adds its term to `hook_mlp_out` (or, with `replace`, returns the term
    alone): how two usual wrong attachments compute."""
    block, inputs = f"blocks.{ATTACH['layer']}", {}

    def store(activation: Tensor, hook: Any) -> None:
        inputs["x"] = activation

    def add_term(mlp_out: Tensor, hook: Any) -> Tensor:
        term = F.linear(F.linear(inputs["x"], A), B) * scale
        return term if replace else mlp_out + term

    return oracle.run_with_hooks(tokens, fwd_hooks=[(f"{block}.mlp.hook_{read}", store),
                                                    (f"{block}.hook_mlp_out", add_term)])


def _wrong_attachments(oracle: HookedTransformer, tokens: Tensor, A: Tensor, B: Tensor,
                       scale: float) -> list[tuple[Tensor, str]]:
    """The logits of the usual wrong attachments, each with its hint."""
    layer = ATTACH["layer"]
    with torch.no_grad():
        return [
            (oracle(tokens), "the adapter changes nothing: hook f'blocks.{layer}.hook_mlp_out' and "
             "return activation + term (a hook that returns None leaves the activation as it is)."),
            (replaced_logits(oracle, tokens, 0, A, B, scale), "the adapter sits in block 0: use "
             "the `layer` argument in the hook names."),
            (_hooked_adapter(oracle, tokens, A, B, scale, read="pre", replace=False), "the adapter "
             "read mlp.hook_pre, before the activation function; W_out's input is the MLP's "
             "hidden activation after it, mlp.hook_post."),
            (_hooked_adapter(oracle, tokens, A, B, scale, read="post", replace=True), "the hook "
             "returned the adapter's term alone, which replaced the MLP's output: return "
             "activation + term."),
            (replaced_logits(oracle, tokens, layer, A, B, 1.0), "the scale alpha / rank is "
             "missing (is your Lora's forward right? Exercise 1's check says)."),
        ]


def _logits(model: HookedTransformer, tokens: Tensor, problem: str = "") -> Tensor:
    """The learner's model's logits (a failure that shows the learner's line if a hook raised)."""
    logits, error = call(model, {"tokens": tokens}, positional=True)
    if error is not None:
        fail("attach_lora", ATTACH_CASE, f"The model's forward pass failed{problem}. "
             f"{describe_error(error)}", crash_hint(error), error=error)
    return logits


def _call_attach(fn: Callable[..., Any], model: HookedTransformer) -> nn.Module:
    """Run the learner's attach_lora; the adapter it returns, with A and B of the right shapes."""
    adapter, error = call(fn, {"model": model, **ATTACH}, positional=True)
    if error is not None:
        fail("attach_lora", ATTACH_CASE, describe_error(error), crash_hint(error), error=error)
    d_model, d_mlp, rank = model.cfg.d_model, model.cfg.d_mlp, ATTACH["rank"]
    A, B = getattr(adapter, "A", None), getattr(adapter, "B", None)
    if not isinstance(A, Tensor) or not isinstance(B, Tensor):
        fail("attach_lora", ATTACH_CASE, "Return the adapter (your Lora module, with A and B).")
    if A.shape == (rank, d_model) and B.shape == (d_mlp, rank):
        fail("attach_lora", ATTACH_CASE, f"The adapter maps d_model ({d_model}) to d_mlp "
             f"({d_mlp}).", "W_out maps the MLP's hidden activation (d_mlp) to the residual "
             "stream (d_model): Lora(d_in=model.cfg.d_mlp, d_out=model.cfg.d_model, ...).")
    if A.shape != (rank, d_mlp) or B.shape != (d_model, rank):
        fail("attach_lora", ATTACH_CASE, f"The adapter's A and B have shapes {tuple(A.shape)} "
             f"and {tuple(B.shape)}, expected {(rank, d_mlp)} and {(d_model, rank)}.")
    return adapter


def _check_what_trains(model: HookedTransformer, adapter: nn.Module) -> None:
    """Exactly A and B require grad, and both are among model.parameters()."""
    adapter_ids = {id(adapter.A), id(adapter.B)}
    if not adapter_ids <= {id(p) for p in model.parameters()}:
        fail("attach_lora", ATTACH_CASE, "The adapter's A and B are not among "
             "model.parameters(), so an optimiser built from them (as the trainer's is) would "
             "never train it.", "make the adapter a submodule of the model: assign it as an "
             "attribute, e.g. model.lora_out = adapter (after freezing the base).")
    base = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_ids]
    if base:
        fail("attach_lora", ATTACH_CASE, f"{len(base)} base parameters still require grad "
             f"(e.g. {base[0]!r}).", "the base weights are left trainable: freeze every "
             "parameter of the model (param.requires_grad_(False)) before you attach the "
             "adapter. Then only A and B train, and the optimiser keeps states for them alone.")
    if not (adapter.A.requires_grad and adapter.B.requires_grad):
        fail("attach_lora", ATTACH_CASE, "The adapter's A and B do not require grad.",
             "the adapter is frozen too: freeze the model's parameters before you attach the "
             "adapter to it.")


def _check_against_oracle(model: HookedTransformer, oracle: HookedTransformer, tokens: Tensor,
                          adapter: nn.Module, after_reset: bool = False) -> None:
    """The model's logits are the replaced-weight oracle's; a mismatch is explained if it can be."""
    A, B = adapter.A.detach(), adapter.B.detach()
    scale = ATTACH["alpha"] / ATTACH["rank"]
    with torch.no_grad():
        got = _logits(model, tokens)
        expected = replaced_logits(oracle, tokens, ATTACH["layer"], A, B, scale)
    problem = describe_difference(expected, got, dims="batch, seq, d_vocab")
    if problem is None:
        return
    wrong = _wrong_attachments(oracle, tokens, A, B, scale)
    hint = next((h for logits, h in wrong if describe_difference(logits, got) is None), None)
    if after_reset and hint == wrong[0][1]:
        hint = ("your hooks are not permanent: model.reset_hooks(), which run_with_hooks and "
                "run_with_cache call when they finish, removed them. Add them with "
                "model.add_hook(name, hook, is_permanent=True).")
    case = ATTACH_CASE + (", then model.reset_hooks()" if after_reset else "") + ", A, B random"
    fail("attach_lora", case, "The logits differ from the oracle's (the model with W_out replaced "
         f"by W_out + (alpha / rank) (B @ A)^T). {problem}", hint)


def _some_loss(logits: Tensor) -> Tensor:
    return logits.log_softmax(-1)[..., :5].sum()


def _check_gradients(model: HookedTransformer, oracle: HookedTransformer, tokens: Tensor,
                     adapter: nn.Module) -> None:
    """d(loss)/dA and d(loss)/dB equal autograd's through the replaced weight."""
    logits = _logits(model, tokens)
    if not logits.requires_grad:
        fail("attach_lora", ATTACH_CASE, "The logits have no gradient, so the adapter cannot "
             "learn.", "did the hook detach the adapter's term, or run under torch.no_grad()?")
    got = torch.autograd.grad(_some_loss(logits), [adapter.A, adapter.B], allow_unused=True)
    A, B = (p.detach().clone().requires_grad_(True) for p in (adapter.A, adapter.B))
    scale = ATTACH["alpha"] / ATTACH["rank"]
    expected = torch.autograd.grad(
        _some_loss(replaced_logits(oracle, tokens, ATTACH["layer"], A, B, scale)), [A, B])
    for name, g, e in zip("AB", got, expected):
        problem = "it gets none" if g is None else describe_difference(e, g, atol=1e-5)
        if problem is not None:
            fail("attach_lora", ATTACH_CASE, f"The gradient of a loss with respect to {name} is "
                 f"not the oracle's: {problem}")


@learner_facing
@single_threaded
def check_attach_lora(fn: Callable[..., nn.Module]) -> None:
    """Check `fn(model, layer, rank, alpha)`: attaches a LoRA adapter to block `layer`'s W_out
    through TransformerLens hooks (input at mlp.hook_post, its term added at hook_mlp_out),
    freezes the base model, and returns the adapter."""
    model, oracle, tokens = _attach_models()
    adapter = _call_attach(fn, model)
    _check_what_trains(model, adapter)
    with torch.no_grad():
        fresh = _logits(model, tokens)
        problem = describe_difference(oracle(tokens), fresh, dims="batch, seq, d_vocab")
    if problem is not None:
        hint = ("B is not zero at the start (exercise 1's check says more)."
                if not torch.all(adapter.B == 0) else "with a zero adapter your hook should "
                "change nothing: does it return activation + term?")
        fail("attach_lora", ATTACH_CASE + ", fresh adapter", f"A fresh adapter changed the "
             f"model's logits. {problem}", hint)
    _randomise(adapter, seed=5)
    _check_against_oracle(model, oracle, tokens, adapter)
    _check_gradients(model, oracle, tokens, adapter)
    model.reset_hooks()
    _check_against_oracle(model, oracle, tokens, adapter, after_reset=True)
    passed("attach_lora", "only A and B train; a fresh adapter changes nothing; the logits and "
           "the gradients of A and B equal those of the model with W_out + (alpha / rank) "
           "(B @ A)^T, also after model.reset_hooks()")


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
        fail("get_ref_logits", case, "After your function returned, the model computes the base "
             "model's logits, not the policy's.", "the adapters are left off: the policy would "
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
        fail("get_ref_logits", REF_CASE, describe_error(error), crash_hint(error), error=error)
    problem = describe_difference(expected, got, dims="batch, seq, d_vocab")
    if problem is not None:
        hint = ("the adapters were left on: those are the policy's logits. The reference is the "
                "base model, the policy with its adapters off; with them on, the KL penalty "
                "compares the policy with itself and is always zero."
                if describe_difference(policy, got) is None else None)
        fail("get_ref_logits", REF_CASE, f"The logits are not the base model's. {problem}", hint)
    _check_adapters_back_on(model, tokens, policy, REF_CASE)
    bad = tokens.clone()
    bad[0, 0] = model.cfg.d_vocab + 5  # out of the vocabulary: the embedding raises
    case = "a batch with a token outside the vocabulary, so the forward pass raises"
    _, error = call(fn, {"model": model, "tokens": bad}, positional=True)
    if error is not None and not lora.lora_active(model):
        fail("get_ref_logits", case, "After the forward pass raised, the adapters stayed off.",
             "turn them back on in a `finally:` block (or use `with adapters_off(model):`), so "
             "an error, or an interrupted cell, does not leave the policy without them.")
    passed("get_ref_logits", "the base model's logits (an untouched copy as the oracle), and the "
           "adapters back on afterwards, even when the forward pass raised")


REFERENCES: dict[str, Callable[..., Any]] = {
    "Lora": lora.Lora,
    "attach_lora": lambda model, layer, rank, alpha: lora.add_lora(
        model, rank, alpha, ["out"], [layer]).get(layer, "out"),
    "get_ref_logits": reference_get_ref_logits,
}
"""minirlhf's solutions to this notebook's exercises (`get_reference` reads them)."""
