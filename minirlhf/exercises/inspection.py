"""Checks for notebook 11: what did RL change? (the share of weights that moved, the per-token KL,
the logit lens of a residual vector, and steering a model with a direction).

The oracles are independent of `minirlhf.inspection`: a Python loop over the entries,
`torch.distributions.kl_divergence`, `F.layer_norm`, and TransformerLens's own
`stop_at_layer` / `start_at_layer` (the residual stream edited between two halves of a forward
pass, with no hook).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf import inspection
from minirlhf.exercises.core import (
    Case,
    Mistake,
    agree,
    check_function,
    describe_difference,
    load_char_model,
    passed,
    randn,
)
from minirlhf.exercises.reporting import call, describe_error, fail, learner_facing

# ---------------------------------------------------------------- the share of weights that moved


def _changed_share_oracle(before: Tensor, after: Tensor, threshold: float) -> Tensor:
    pairs = list(zip(before.flatten().tolist(), after.flatten().tolist()))
    return torch.tensor(sum(abs(a - b) > threshold for b, a in pairs) / len(pairs))


def _changed_share_cases() -> list[Case]:
    before = randn(6, 5, seed=1)
    moves = randn(6, 5, seed=2) * (torch.rand(6, 5, generator=torch.Generator().manual_seed(3))
                                   < 0.4)
    return [Case("a 6 x 5 weight, 40% of it moved up or down by about 1, threshold 0.1",
                 {"before": before, "after": before + moves, "threshold": 0.1}),
            Case("the same moves a hundred times smaller, threshold 1e-3",
                 {"before": before, "after": before + moves / 100, "threshold": 1e-3})]


CHANGED_SHARE_MISTAKES = [
    Mistake("only the entries that rose are counted: a weight that fell moved too, so compare "
            "|after - before| (`.abs()`) with the threshold.",
            lambda before, after, threshold: ((after - before) > threshold).float().mean()),
    Mistake("the weights are compared with the threshold, not their change: count entries "
            "where |after - before| > threshold.",
            lambda before, after, threshold: (after.abs() > threshold).float().mean()),
]


@learner_facing
def check_calc_changed_share(fn: Callable[..., Tensor]) -> None:
    """Check `fn(before, after, threshold)`: the share of entries with |after - before| above
    the threshold, as a 0-dimensional tensor."""
    check_function("calc_changed_share", fn, inspection.calc_changed_share,
                   _changed_share_oracle, _changed_share_cases(), CHANGED_SHARE_MISTAKES)


# ---------------------------------------------------------------- the per-token KL


def _kl_oracle(logits: Tensor, ref_logits: Tensor) -> Tensor:
    return torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logits),
                                             torch.distributions.Categorical(logits=ref_logits))


def _kl_cases() -> list[Case]:
    return [Case("2 answers of 4 tokens over a vocabulary of 7",
                 {"logits": randn(2, 4, 7, seed=4, scale=2.0),
                  "ref_logits": randn(2, 4, 7, seed=5, scale=2.0)}),
            Case("logits shifted by a constant per position (the same distributions) in row 0",
                 {"logits": torch.cat([randn(1, 3, 5, seed=6), randn(1, 3, 5, seed=7)]),
                  "ref_logits": torch.cat([randn(1, 3, 5, seed=6) + 3.0,
                                           randn(1, 3, 5, seed=8)])})]


def _kl_of_log_probs(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return (logp.exp() * (logp - ref_logp)).sum(-1)


KL_MISTAKES = [
    Mistake("the KL is the other way round: KL(trained || reference) averages log(p / p_ref) "
            "under the trained policy's p, not the reference's.",
            lambda logits, ref_logits: _kl_of_log_probs(ref_logits.log_softmax(-1),
                                                        logits.log_softmax(-1))),
    Mistake("the raw logits were used as log-probabilities: take `log_softmax` of both first "
            "(logits are log-probs only up to a constant per position).",
            lambda logits, ref_logits: (logits.softmax(-1) * (logits - ref_logits)).sum(-1)),
    Mistake("the KL is averaged over the vocabulary instead of summed over it.",
            lambda logits, ref_logits: _kl_of_log_probs(
                logits.log_softmax(-1), ref_logits.log_softmax(-1)) / logits.shape[-1]),
]


@learner_facing
def check_calc_per_token_kl(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logits, ref_logits)`: KL(trained || reference) at each position, in nats."""
    check_function("calc_per_token_kl", fn, inspection.calc_per_token_kl, _kl_oracle,
                   _kl_cases(), KL_MISTAKES, dims="batch, seq")


# ---------------------------------------------------------------- the logit lens

EPS = 1e-5


def reference_apply_logit_lens(
    residual: Float[Tensor, "n d_model"], W_U: Float[Tensor, "d_model d_vocab"],
    ln_w: Float[Tensor, " d_model"], ln_b: Float[Tensor, " d_model"],
) -> Float[Tensor, "n d_vocab"]:
    """The final LayerNorm (centre, divide by the RMS, gain and bias), then the unembedding."""
    centred = residual - residual.mean(dim=-1, keepdim=True)
    scale = (centred.pow(2).mean(dim=-1, keepdim=True) + EPS).sqrt()
    return (centred / scale * ln_w + ln_b) @ W_U


def _lens_oracle(residual: Tensor, W_U: Tensor, ln_w: Tensor, ln_b: Tensor) -> Tensor:
    return F.layer_norm(residual, (residual.shape[-1],), ln_w, ln_b, eps=EPS) @ W_U


def _lens_cases() -> list[Case]:
    return [Case("3 vectors of d_model 8 far from centred (mean 4), vocabulary 5",
                 {"residual": randn(3, 8, seed=9, scale=3.0) + 4.0, "W_U": randn(8, 5, seed=10),
                  "ln_w": randn(8, seed=11) + 1.0, "ln_b": randn(8, seed=12, scale=0.5)})]


def _rms(residual: Tensor) -> Tensor:
    return (residual.pow(2).mean(dim=-1, keepdim=True) + EPS).sqrt()


LENS_MISTAKES = [
    Mistake("the final norm is skipped: the unembedding reads the residual stream after "
            "ln_final, so normalise first (centre, divide by the RMS, times ln_w plus ln_b).",
            lambda residual, W_U, ln_w, ln_b: residual @ W_U),
    Mistake("the vector is not centred: LayerNorm subtracts the mean over d_model before "
            "dividing by the RMS (that is RMSNorm, SmolLM2's, not GPT-2's).",
            lambda residual, W_U, ln_w, ln_b: (residual / _rms(residual) * ln_w + ln_b) @ W_U),
    Mistake("the norm's gain and bias are left out: multiply by ln_w and add ln_b after "
            "normalising.",
            lambda residual, W_U, ln_w, ln_b: F.layer_norm(residual, (residual.shape[-1],),
                                                           eps=EPS) @ W_U),
]


@learner_facing
def check_apply_logit_lens(fn: Callable[..., Tensor]) -> None:
    """Check `fn(residual, W_U, ln_w, ln_b)`: residual vectors read as logits through the final
    LayerNorm and the unembedding."""
    check_function("apply_logit_lens", fn, reference_apply_logit_lens, _lens_oracle,
                   _lens_cases(), LENS_MISTAKES, dims="n, d_vocab")


# ---------------------------------------------------------------- steering


def reference_get_steered_logits(
    model: HookedTransformer, tokens: Int[Tensor, "batch seq"], layer: int,
    direction: Float[Tensor, " d_model"], scale: float,
) -> Float[Tensor, "batch seq d_vocab"]:
    """The model's logits with scale * direction added after block `layer`, at every position."""
    with torch.no_grad(), inspection.steering(model, layer, direction, scale):
        return model(tokens)


@torch.no_grad()
def _steered_oracle(model: HookedTransformer, tokens: Tensor, layer: int, direction: Tensor,
                    scale: float) -> Tensor:
    """Run blocks 0..layer, add, run the rest from there: no hook involved."""
    residual = model(tokens, stop_at_layer=layer + 1) + scale * direction
    return model(residual, start_at_layer=layer + 1)


STEER_CASE = "a 2-block printable-character model, steered after block 0 with 3 x a direction"


def _steering_hint(model, tokens, layer, direction, scale, got) -> str | None:
    """The mistake `got` matches, if any."""
    before = _steered_oracle(model, tokens, layer - 1, direction, scale) if layer else None
    if before is not None and describe_difference(before, got) is None:
        return ("the direction was added before block `layer` (hook_resid_pre), not after it: "
                "use f'blocks.{layer}.hook_resid_post'.")
    if describe_difference(_steered_oracle(model, tokens, layer, direction, -scale), got) is None:
        return "the direction was subtracted: steering adds scale * direction."
    if describe_difference(_steered_oracle(model, tokens, layer, direction, 1.0), got) is None:
        return "the scale was ignored: add scale * direction."
    return None


@learner_facing
def check_get_steered_logits(fn: Callable[..., Tensor]) -> None:
    """Check `fn(model, tokens, layer, direction, scale)`: the logits with the residual stream
    after block `layer` shifted by scale * direction, and the model unchanged afterwards."""
    model = load_char_model(n_layers=3, seed=4)
    tokens = torch.tensor([[3, 14, 15, 9, 26], [5, 3, 5, 8, 9]])
    direction = randn(model.cfg.d_model, seed=13)
    kwargs = {"model": model, "tokens": tokens, "layer": 1, "direction": direction, "scale": 3.0}
    with torch.no_grad():
        expected, plain = _steered_oracle(**kwargs), model(tokens)
    agree("get_steered_logits", STEER_CASE, reference_get_steered_logits(**kwargs), expected,
          atol=1e-4)
    got, error = call(fn, kwargs, positional=True)
    if error is not None:
        fail("get_steered_logits", STEER_CASE, describe_error(error), error=error, inputs=kwargs)
    problem = describe_difference(expected, got, atol=1e-4, dims="batch, seq, d_vocab")
    if problem is not None:
        fail("get_steered_logits", STEER_CASE, problem,
             _steering_hint(model, tokens, 1, direction, 3.0, got), inputs=kwargs)
    with torch.no_grad():
        after = model(tokens)
    model.reset_hooks()
    if describe_difference(plain, after, atol=1e-5) is not None:
        fail("get_steered_logits", STEER_CASE, "After your function returned, the model still "
             "gives steered logits.", "the hook was left on the model: add it with "
             "`with model.hooks(fwd_hooks=[...]):` (or `run_with_hooks`), which takes it off.",
             inputs=kwargs)
    passed("get_steered_logits", "the residual stream edited between two halves of the forward "
           "pass as the oracle, and the model unsteered afterwards")


REFERENCES: dict[str, Callable] = {"calc_changed_share": inspection.calc_changed_share,
                                   "calc_per_token_kl": inspection.calc_per_token_kl,
                                   "apply_logit_lens": reference_apply_logit_lens,
                                   "get_steered_logits": reference_get_steered_logits}
"""The solutions of notebook 11's exercises (the library's where it has the same signature)."""
