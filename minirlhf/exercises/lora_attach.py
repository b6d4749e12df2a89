"""Checks for notebook 9, exercise 2: attaching a LoRA adapter to a model through hooks.

The oracle never runs an adapter: the LoRA model is the same model with W_out *replaced* by
W_out + (alpha / rank) (B @ A)^T, TransformerLens's forward through `torch.func.functional_call`.
Wrong attachments are recognised by the logits they give (no effect, the wrong block, the wrong
hook, the term replacing the MLP's output, no scale); tests/wrong_impls/lora.py holds each.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from transformer_lens import HookedTransformer

from minirlhf.exercises.core import describe_difference, load_char_model, passed, single_threaded
from minirlhf.exercises.lora import randomise_adapter
from minirlhf.exercises.reporting import call, crash_hint, describe_error, fail, learner_facing
from minirlhf.runtime import lora

# ---------------------------------------------------------------- attaching it to a model

ATTACH = dict(layer=1, rank=2, alpha=4.0)
ATTACH_CASE = ("a 2-layer random model (d_model 16, d_mlp 64), attach_lora(model, layer=1, "
               "rank=2, alpha=4.0)")


def _fail(case: str, problem: str, hint: str | None = None,
          error: BaseException | None = None) -> None:
    """Fail with a fresh copy of the model and the arguments as the case to re-run."""
    __tracebackhide__ = True
    fresh = load_char_model(n_layers=2, d_model=16, n_heads=2, seed=1)
    fail("attach_lora", case, problem, hint, inputs={"model": fresh, **ATTACH}, error=error)


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
        _fail(ATTACH_CASE, f"The model's forward pass failed{problem}. "
             f"{describe_error(error)}", crash_hint(error), error=error)
    return logits


def _call_attach(fn: Callable[..., Any], model: HookedTransformer) -> nn.Module:
    """Run the learner's attach_lora; the adapter it returns, with A and B of the right shapes."""
    adapter, error = call(fn, {"model": model, **ATTACH}, positional=True)
    if error is not None:
        _fail(ATTACH_CASE, describe_error(error), crash_hint(error), error=error)
    d_model, d_mlp, rank = model.cfg.d_model, model.cfg.d_mlp, ATTACH["rank"]
    A, B = getattr(adapter, "A", None), getattr(adapter, "B", None)
    if not isinstance(A, Tensor) or not isinstance(B, Tensor):
        _fail(ATTACH_CASE, "Return the adapter (your Lora module, with A and B).")
    if A.shape == (rank, d_model) and B.shape == (d_mlp, rank):
        _fail(ATTACH_CASE, f"The adapter maps d_model ({d_model}) to d_mlp "
             f"({d_mlp}).", "W_out maps the MLP's hidden activation (d_mlp) to the residual "
             "stream (d_model): Lora(d_in=model.cfg.d_mlp, d_out=model.cfg.d_model, ...).")
    if A.shape != (rank, d_mlp) or B.shape != (d_model, rank):
        _fail(ATTACH_CASE, f"The adapter's A and B have shapes {tuple(A.shape)} "
             f"and {tuple(B.shape)}, expected {(rank, d_mlp)} and {(d_model, rank)}.")
    return adapter


def _check_what_trains(model: HookedTransformer, adapter: nn.Module) -> None:
    """Exactly A and B require grad, and both are among model.parameters()."""
    adapter_ids = {id(adapter.A), id(adapter.B)}
    if not adapter_ids <= {id(p) for p in model.parameters()}:
        _fail(ATTACH_CASE, "The adapter's A and B are not among "
             "model.parameters(), so an optimiser built from them (as the trainer's is) would "
             "never train it.", "make the adapter a submodule of the model: assign it as an "
             "attribute, e.g. model.lora_out = adapter (after freezing the base).")
    base = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_ids]
    if base:
        _fail(ATTACH_CASE, f"{len(base)} base parameters still require grad "
             f"(e.g. {base[0]!r}).", "the base weights are left trainable: freeze every "
             "parameter of the model (param.requires_grad_(False)) before you attach the "
             "adapter. Then only A and B train, and the optimiser keeps states for them alone.")
    if not (adapter.A.requires_grad and adapter.B.requires_grad):
        _fail(ATTACH_CASE, "The adapter's A and B do not require grad.",
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
    _fail(case, "The logits differ from the oracle's (the model with W_out replaced "
         f"by W_out + (alpha / rank) (B @ A)^T). {problem}", hint)


def _some_loss(logits: Tensor) -> Tensor:
    return logits.log_softmax(-1)[..., :5].sum()


def _check_gradients(model: HookedTransformer, oracle: HookedTransformer, tokens: Tensor,
                     adapter: nn.Module) -> None:
    """d(loss)/dA and d(loss)/dB equal autograd's through the replaced weight."""
    logits = _logits(model, tokens)
    if not logits.requires_grad:
        _fail(ATTACH_CASE, "The logits have no gradient, so the adapter cannot "
             "learn.", "did the hook detach the adapter's term, or run under torch.no_grad()?")
    got = torch.autograd.grad(_some_loss(logits), [adapter.A, adapter.B], allow_unused=True)
    A, B = (p.detach().clone().requires_grad_(True) for p in (adapter.A, adapter.B))
    scale = ATTACH["alpha"] / ATTACH["rank"]
    expected = torch.autograd.grad(
        _some_loss(replaced_logits(oracle, tokens, ATTACH["layer"], A, B, scale)), [A, B])
    for name, g, e in zip("AB", got, expected):
        problem = "it gets none" if g is None else describe_difference(e, g, atol=1e-5)
        if problem is not None:
            _fail(ATTACH_CASE, f"The gradient of a loss with respect to {name} is "
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
        _fail(ATTACH_CASE + ", fresh adapter", f"A fresh adapter changed the "
             f"model's logits. {problem}", hint)
    randomise_adapter(adapter, seed=5)
    _check_against_oracle(model, oracle, tokens, adapter)
    _check_gradients(model, oracle, tokens, adapter)
    model.reset_hooks()
    _check_against_oracle(model, oracle, tokens, adapter, after_reset=True)
    passed("attach_lora", "only A and B train; a fresh adapter changes nothing; the logits and "
           "the gradients of A and B equal those of the model with W_out + (alpha / rank) "
           "(B @ A)^T, also after model.reset_hooks()")




def reference_attach_lora(model: HookedTransformer, layer: int, rank: int, alpha: float
                          ) -> nn.Module:
    """minirlhf's solution: the library's adapter on block `layer`'s W_out."""
    return lora.add_lora(model, rank, alpha, ["out"], [layer]).get(layer, "out")
