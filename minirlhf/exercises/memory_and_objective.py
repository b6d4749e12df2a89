"""Checks for notebook 3: replay-memory minibatches, log-probs and the four objective terms.

Oracles: an explicit loop over positions for the log-probs, `torch.distributions.Categorical`
for the KL penalty and the entropy, `torch.nn.functional.mse_loss` for the value loss, and a
per-token loop that applies the clipping rule case by case (advantage positive or negative) for
the clipped surrogate. The replay memory shuffles, so it is checked on what any correct shuffle
satisfies: every sample exactly once per pass, rows kept together, returns = advantages + values.
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torch.distributions import Categorical, kl_divergence

from minirlhf.exercises.core import Case, Mistake, check_function, passed, randn
from minirlhf.exercises.reporting import call, crash_hint, describe_error, fail, learner_facing
from minirlhf.losses import (
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_function_loss,
    get_logprobs,
)
from minirlhf.memory import ReplayMemory

GenLogits = Float[Tensor, "minibatch gen_len d_vocab"]
PerToken = Float[Tensor, "minibatch gen_len"]
Scalar = Float[Tensor, ""]

# ---------------------------------------------------------------- replay memory minibatches


def _memory_inputs(batch: int = 8, prefix_len: int = 2, gen_len: int = 3, d_vocab: int = 5):
    """Tensors where every row is recognisable: sample_ids[:, 0] is the row's index."""
    seq = prefix_len + gen_len
    sample_ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    sample_ids[:, 0] = torch.arange(batch)
    return {
        "sample_ids": sample_ids,
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "logprobs": -randn(batch, gen_len, seed=1).abs(),
        "advantages": randn(batch, gen_len, seed=2),
        "values": randn(batch, gen_len, seed=3),
        "ref_logits": randn(batch, gen_len, d_vocab, seed=4),
    }


@learner_facing
def check_replay_memory(memory_class: Callable[..., ReplayMemory]) -> None:
    """Check `memory_class(sample_ids, attention_mask, logprobs, advantages, values, ref_logits)
    .get_minibatches(num_minibatches, batches_per_learning_phase, generator)`."""
    exercise = "ReplayMemory.get_minibatches"
    inputs = _memory_inputs()
    for num_minibatches, passes in [(4, 2), (2, 3), (1, 1)]:
        case = f"batch 8, num_minibatches={num_minibatches}, batches_per_learning_phase={passes}"
        args = (num_minibatches, passes, torch.Generator().manual_seed(0))
        _check_minibatches(exercise, case, ReplayMemory(**inputs).get_minibatches(*args),
                           inputs, num_minibatches, passes)  # the reference passes first
        rerun = (f"ReplayMemory(*exercises.last_failure().inputs.values()).get_minibatches("
                 f"{num_minibatches}, {passes}, torch.Generator().manual_seed(0))")
        memory, error = call(memory_class, inputs, positional=True)
        if error is not None:
            fail(exercise, case, f"Building the memory failed. {describe_error(error)}",
                 crash_hint(error), inputs=inputs, error=error, rerun=rerun)
        minibatches, error = call(memory.get_minibatches, {
            "num_minibatches": num_minibatches, "batches_per_learning_phase": passes,
            "generator": args[2]}, positional=True)
        if error is not None:
            fail(exercise, case, f"get_minibatches{args[:2]} failed. {describe_error(error)}",
                 crash_hint(error), inputs=inputs, error=error, rerun=rerun)
        _check_minibatches(exercise, case, minibatches, inputs, num_minibatches, passes)
    _check_shuffling(exercise, memory_class, inputs)
    passed(exercise, "every sample once per pass, rows kept together, returns = advantages + "
           "values, a fresh shuffle per pass that follows the generator")


def _check_minibatches(exercise, case, minibatches, inputs, num_minibatches, passes) -> None:
    batch = inputs["sample_ids"].shape[0]
    report = functools.partial(fail, inputs=inputs, rerun=(
        f"ReplayMemory(*exercises.last_failure().inputs.values()).get_minibatches("
        f"{num_minibatches}, {passes}, torch.Generator().manual_seed(0))"))
    if len(minibatches) != num_minibatches * passes:
        report(exercise, case, f"Expected {num_minibatches * passes} minibatches "
             f"(num_minibatches * batches_per_learning_phase), got {len(minibatches)}.")
    for i, mb in enumerate(minibatches):
        rows = mb.sample_ids[:, 0]
        if len(rows) != batch // num_minibatches:
            report(exercise, case, f"Minibatch {i} has {len(rows)} samples; expected "
                 f"{batch // num_minibatches} (batch_size // num_minibatches).")
        expected_returns = inputs["advantages"][rows] + inputs["values"][rows]
        for name in ["attention_mask", "logprobs", "advantages", "ref_logits"]:
            if not torch.equal(getattr(mb, name), inputs[name][rows]):
                report(exercise, case, f"In minibatch {i}, {name} does not come from the same "
                     "samples as sample_ids.",
                     "index every tensor with the same indices, so each row stays one sample.")
        if not torch.allclose(mb.returns, expected_returns):
            hint = "returns are the value head's targets: advantages + values."
            if torch.allclose(mb.returns, inputs["advantages"][rows]):
                hint = "you stored the advantages as returns; returns = advantages + values."
            report(exercise, case, f"In minibatch {i}, returns != advantages + values.", hint)
    for p in range(passes):
        rows = torch.cat([mb.sample_ids[:, 0] for mb in
                          minibatches[p * num_minibatches : (p + 1) * num_minibatches]])
        if sorted(rows.tolist()) != list(range(batch)):
            report(exercise, case, f"Pass {p} does not contain every sample exactly once (sample "
                 f"rows seen: {sorted(rows.tolist())}).",
                 "use a permutation (torch.randperm), not indices drawn with replacement.")


def _check_shuffling(exercise: str, memory_class, inputs: dict) -> None:
    def order(seed: int) -> list[list[int]]:
        memory = memory_class(*inputs.values())
        minibatches = memory.get_minibatches(4, 3, torch.Generator().manual_seed(seed))
        return [mb.sample_ids[:, 0].tolist() for mb in minibatches]

    case = "batch 8, num_minibatches=4, batches_per_learning_phase=3"
    first = order(0)
    passes = [sum(first[p * 4 : (p + 1) * 4], []) for p in range(3)]
    if all(p == list(range(8)) for p in passes):
        fail(exercise, case, "The samples come out in their original order.",
             "you did not shuffle: index with torch.randperm(batch_size, generator=generator).")
    if passes[0] == passes[1] == passes[2]:
        fail(exercise, case, "Every pass uses the same order.",
             "you shuffled once and reused the order; draw a new permutation for each pass.")
    if order(0) != first:
        fail(exercise, case, "Two calls with generators seeded alike gave different "
             "minibatches.", "pass the generator to torch.randperm(..., generator=generator).")


# ---------------------------------------------------------------- log-probs


def _logprobs_oracle(logits: Float[Tensor, "batch seq d_vocab"], tokens: Int[Tensor, "batch seq"],
                     prefix_len: int | None = None) -> Float[Tensor, "batch gen_len"]:
    batch, seq = tokens.shape
    start = 1 if prefix_len is None else prefix_len
    result = torch.zeros(batch, seq - start)
    for b in range(batch):
        for s in range(start, seq):  # the token at s is predicted by the logits at s - 1
            result[b, s - start] = torch.log_softmax(logits[b, s - 1], dim=0)[tokens[b, s]]
    return result


def _picked(logits, tokens, prefix_len, transform=lambda x: x.log_softmax(-1)):
    """transform(logits) at each generated token, the slicing done right."""
    start = 1 if prefix_len is None else prefix_len
    picked = transform(logits[:, start - 1 : -1])
    return picked.gather(-1, tokens[:, start:, None]).squeeze(-1)


LOGPROBS_MISTAKES = [
    Mistake("off by one: the logits at position s predict the token at s + 1, so slice "
            "logits[:, prefix_len - 1 : -1] against tokens[:, prefix_len:].",
            lambda logits, tokens, prefix_len: _same_position(logits, tokens, prefix_len)),
    Mistake("did you forget log_softmax? You picked the raw logits of the tokens.",
            lambda logits, tokens, prefix_len: _picked(logits, tokens, prefix_len, lambda x: x)),
    Mistake("you returned probabilities (softmax); use log_softmax for log-probs.",
            lambda logits, tokens, prefix_len: _picked(logits, tokens, prefix_len,
                                                       lambda x: x.softmax(-1))),
    Mistake("did you ignore prefix_len? Return only the generated tokens' log-probs.",
            lambda logits, tokens, prefix_len: _picked(logits, tokens, None)),
    Mistake("you dropped the first generated token: its log-prob comes from the logits at "
            "prefix_len - 1, so slice logits[:, prefix_len - 1 : -1].",
            lambda logits, tokens, prefix_len: _picked(logits, tokens, prefix_len)[:, 1:]),
]


@learner_facing
def check_get_logprobs(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logits, tokens, prefix_len)`: log-probs of tokens[:, prefix_len:]."""
    def case(name: str, batch: int, seq: int, prefix_len: int | None, seed: int) -> Case:
        tokens = torch.randint(0, 11, (batch, seq), generator=torch.Generator().manual_seed(seed))
        return Case(name, {"logits": randn(batch, seq, 11, seed=seed, scale=2.0),
                           "tokens": tokens, "prefix_len": prefix_len})

    cases = [case("batch 2, seq 6, prefix_len 3", 2, 6, 3, 0),
             case("prefix_len 1", 3, 5, 1, 1),
             case("one generated token", 2, 4, 3, 2),
             case("prefix_len None (every next token)", 2, 5, None, 3)]

    check_function("get_logprobs", fn, get_logprobs, _logprobs_oracle, cases, LOGPROBS_MISTAKES,
                   dims="batch, seq - prefix_len")


def _same_position(logits, tokens, prefix_len):
    start = 1 if prefix_len is None else prefix_len
    picked = logits[:, start:].log_softmax(-1)
    return picked.gather(-1, tokens[:, start:, None]).squeeze(-1)


# ---------------------------------------------------------------- KL penalty and entropy bonus


def _logit_cases(coef_name: str) -> list[Case]:
    """Logits at the generated positions (with gradients), in several shapes and scales."""
    def case(name, shape, seed, scale, coef, same=False):
        logits = randn(*shape, seed=seed, scale=scale, grad=True)
        ref = logits.detach().clone() if same else randn(*shape, seed=seed + 50, scale=scale)
        return Case(name, {"logits": logits, "ref_logits": ref, coef_name: coef})

    return [case("minibatch 2, gen_len 3, d_vocab 7", (2, 3, 7), 0, 1.0, 0.3),
            case("d_vocab 50", (3, 4, 50), 1, 2.0, 2.5),
            case("large logits (overflow-safe?)", (2, 2, 9), 2, 30.0, 1.0),
            case("policy equal to the reference", (1, 2, 5), 3, 1.0, 1.0, same=True)]


def _kl_oracle(logits: GenLogits, ref_logits: GenLogits, kl_coef: float) -> Scalar:
    # float64, so probabilities of 1e-60 at large logits do not underflow to 0
    kl = kl_divergence(Categorical(logits=logits.double()), Categorical(logits=ref_logits.double()))
    return kl_coef * kl.mean().float()


def _kl(logits, ref_logits, kl_coef, reduce=torch.mean, log_fn=None, weigh=True):
    log_fn = log_fn or (lambda x: x.log_softmax(-1))
    probs = logits.softmax(-1) if weigh else 1.0
    return kl_coef * reduce((probs * (log_fn(logits) - log_fn(ref_logits))).sum(-1))


KL_MISTAKES = [
    Mistake("did you forget kl_coef?",
            lambda logits, ref_logits, kl_coef: _kl(logits, ref_logits, 1.0)),
    Mistake("you computed KL(reference || policy); the penalty is KL(policy || reference), "
            "weighted by the policy's probabilities.",
            lambda logits, ref_logits, kl_coef: _kl(ref_logits, logits, kl_coef)),
    Mistake("you summed the KL over positions and samples; take the mean.",
            lambda logits, ref_logits, kl_coef: _kl(logits, ref_logits, kl_coef, torch.sum)),
    Mistake("you summed the KL over positions and averaged over samples only (what F.kl_div's "
            "reduction='batchmean' does): take the mean over positions too.",
            lambda logits, ref_logits, kl_coef: kl_coef * F.kl_div(
                ref_logits.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                reduction="batchmean")),
    Mistake("weight each token's log-ratio by the policy's probability: KL = sum over the "
            "vocabulary of p (log p - log q), not the plain sum of log p - log q.",
            lambda logits, ref_logits, kl_coef: _kl(logits, ref_logits, kl_coef, weigh=False)),
    Mistake("the sign is flipped: the penalty is a positive number, subtracted from the objective.",
            lambda logits, ref_logits, kl_coef: -_kl(logits, ref_logits, kl_coef)),
    Mistake("did you use the raw logits as log-probs? Take log_softmax first.",
            lambda logits, ref_logits, kl_coef: _kl(logits, ref_logits, kl_coef,
                                                     log_fn=lambda x: x)),
    Mistake("log(softmax(x)) underflows to log(0) = -inf for large logits: use log_softmax.",
            lambda logits, ref_logits, kl_coef: _kl(logits, ref_logits, kl_coef,
                                                     log_fn=lambda x: x.softmax(-1).log())),
]


@learner_facing
def check_calc_kl_penalty(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logits, ref_logits, kl_coef)`: kl_coef * mean KL(policy || reference)."""
    check_function("calc_kl_penalty", fn, calc_kl_penalty, _kl_oracle, _logit_cases("kl_coef"),
                   KL_MISTAKES, dims="a scalar", atol=1e-4)


def _entropy_oracle(logits: GenLogits, ent_coef: float) -> Scalar:
    return ent_coef * Categorical(logits=logits.double()).entropy().mean().float()


def _entropy(logits, ent_coef, reduce=torch.mean, dim=-1, sign=-1.0):
    logprobs = logits.log_softmax(dim)
    return sign * ent_coef * reduce((logprobs.exp() * logprobs).sum(dim))


ENTROPY_MISTAKES = [
    Mistake("did you forget ent_coef?", lambda logits, ent_coef: _entropy(logits, 1.0)),
    Mistake("the sign is flipped: entropy is -sum(p log p), a positive number.",
            lambda logits, ent_coef: _entropy(logits, ent_coef, sign=1.0)),
    Mistake("you summed over positions and samples; take the mean.",
            lambda logits, ent_coef: _entropy(logits, ent_coef, torch.sum)),
    Mistake("softmax over the wrong dimension: the distribution is over the vocabulary (dim=-1).",
            lambda logits, ent_coef: _entropy(logits, ent_coef, dim=1)),
    Mistake("you averaged -p log p over the vocabulary too: sum it over the vocabulary (dim=-1), "
            "then take the mean over positions and samples.",
            lambda logits, ent_coef: -ent_coef * (logits.softmax(-1) * logits.log_softmax(-1))
            .mean()),
]


@learner_facing
def check_calc_entropy_bonus(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logits, ent_coef)`: ent_coef * mean entropy of the policy."""
    cases = [Case(c.name, {"logits": c.kwargs["logits"], "ent_coef": c.kwargs["kl_coef"]})
             for c in _logit_cases("kl_coef")]
    check_function("calc_entropy_bonus", fn, calc_entropy_bonus, _entropy_oracle, cases,
                   ENTROPY_MISTAKES, dims="a scalar", atol=1e-4)


# ---------------------------------------------------------------- value-function loss


def _value_loss_oracle(values: PerToken, mb_returns: PerToken, vf_coef: float) -> Scalar:
    return vf_coef * 0.5 * F.mse_loss(values, mb_returns)


def _squared_error(values, mb_returns):
    return (values - mb_returns).pow(2)


VALUE_LOSS_MISTAKES = [
    Mistake("did you forget the 1/2?",
            lambda values, mb_returns, vf_coef: vf_coef
            * _squared_error(values, mb_returns).mean()),
    Mistake("did you forget vf_coef?",
            lambda values, mb_returns, vf_coef: 0.5 * _squared_error(values, mb_returns).mean()),
    Mistake("you summed the squared errors; take the mean.",
            lambda values, mb_returns, vf_coef: 0.5 * vf_coef
            * _squared_error(values, mb_returns).sum()),
    Mistake("the sign is flipped: return the positive loss; the trainer subtracts it.",
            lambda values, mb_returns, vf_coef: -0.5 * vf_coef
            * _squared_error(values, mb_returns).mean()),
    Mistake("you used the absolute error; the value loss is the squared error.",
            lambda values, mb_returns, vf_coef: 0.5 * vf_coef
            * (values - mb_returns).abs().mean()),
]


@learner_facing
def check_calc_value_function_loss(fn: Callable[..., Tensor]) -> None:
    """Check `fn(values, mb_returns, vf_coef)`: vf_coef * 1/2 * mean squared error."""
    cases = [Case(name, {"values": randn(*shape, seed=i, grad=True),
                         "mb_returns": randn(*shape, seed=i + 9, scale=2.0), "vf_coef": coef})
             for i, (name, shape, coef) in enumerate([
                 ("minibatch 4, gen_len 3", (4, 3), 0.15), ("minibatch 1, gen_len 1", (1, 1), 1.0),
                 ("minibatch 2, gen_len 6", (2, 6), 0.5)])]

    check_function("calc_value_function_loss", fn, calc_value_function_loss, _value_loss_oracle,
                   cases, VALUE_LOSS_MISTAKES, dims="a scalar")


# ---------------------------------------------------------------- clipped surrogate objective


def _surrogate_oracle(logprobs: PerToken, mb_logprobs: PerToken, mb_advantages: PerToken,
                      clip_coef: float, eps: float = 1e-8) -> Scalar:
    """The pessimistic bound written case by case, token by token."""
    advantages = mb_advantages.flatten().tolist()
    mean = sum(advantages) / len(advantages)
    std = (sum((a - mean) ** 2 for a in advantages) / len(advantages)) ** 0.5
    ratios = (logprobs - mb_logprobs).exp().flatten()
    terms = []
    for ratio, advantage in zip(ratios, advantages, strict=True):
        advantage = (advantage - mean) / (std + eps)
        if advantage >= 0:  # a good action: gain nothing past a ratio of 1 + clip_coef
            terms.append(torch.clamp(ratio, max=1 + clip_coef) * advantage)
        else:  # a bad action: nothing gained below a ratio of 1 - clip_coef
            terms.append(torch.clamp(ratio, min=1 - clip_coef) * advantage)
    return torch.stack(terms).mean()


def _surrogate(logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8, *, pick=torch.minimum,
               ratio=None, normalize="population", clip_advantages=False):
    ratio = (logprobs - mb_logprobs).exp() if ratio is None else ratio
    if normalize == "population":
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std(correction=0)
                                                                  + eps)
    elif normalize == "sample":
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + eps)
    elif normalize == "per row":
        mean, std = mb_advantages.mean(-1, keepdim=True), mb_advantages.std(-1, correction=0,
                                                                            keepdim=True)
        mb_advantages = (mb_advantages - mean) / (std + eps)
    if clip_advantages:
        clipped = ratio * mb_advantages.clamp(1 - clip_coef, 1 + clip_coef)
    else:
        clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef) * mb_advantages
    return pick(ratio * mb_advantages, clipped).mean()


SURROGATE_MISTAKES = [
    Mistake("you maximised instead of minimised: PPO takes torch.minimum of the unclipped and "
            "clipped terms (the pessimistic bound), not torch.maximum.",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8: _surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef, eps, pick=torch.maximum)),
    Mistake("did you forget to normalise the advantages (mean 0, std 1 over the minibatch)?",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8: _surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef, eps, normalize=None)),
    Mistake("you normalised with the sample std (correction=1): a minibatch of one token then "
            "gives NaN. Use mb_advantages.std(correction=0).",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8: _surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef, eps, normalize="sample")),
    Mistake("the ratio is upside down: it is exp(logprobs - mb_logprobs), new over old.",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8: _surrogate(
                mb_logprobs, logprobs, mb_advantages, clip_coef, eps)),
    Mistake("the ratio of probabilities is exp(logprobs - mb_logprobs), not logprobs / "
            "mb_logprobs.",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8: _surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef, eps,
                ratio=logprobs / mb_logprobs)),
    Mistake("you clipped the advantages; clip the ratio to [1 - clip_coef, 1 + clip_coef].",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8: _surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef, eps, clip_advantages=True)),
    Mistake("did you forget the clipped term? The objective is the minimum of ratio * A and "
            "clip(ratio) * A.",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8: _surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef, eps, pick=lambda a, b: a)),
    Mistake("you normalised the advantages of each sample (row) separately: normalise over the "
            "whole minibatch, every token of every sample together.",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8: _surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef, eps, normalize="per row")),
    Mistake("the sign is flipped: return the surrogate itself (the trainer adds it to the "
            "objective it maximises), not its negative.",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8: -_surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef, eps)),
]


@learner_facing
def check_calc_clipped_surrogate_objective(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logprobs, mb_logprobs, mb_advantages, clip_coef, eps=1e-8)`: PPO's objective."""
    def case(name, shape, seed, clip_coef, spread=0.5, advantages=None):
        mb_logprobs = -randn(*shape, seed=seed).abs() - 0.5
        logprobs = (mb_logprobs + randn(*shape, seed=seed + 1, scale=spread)).requires_grad_(True)
        advantages = randn(*shape, seed=seed + 2, scale=3.0) if advantages is None else advantages
        return Case(name, {"logprobs": logprobs, "mb_logprobs": mb_logprobs,
                           "mb_advantages": advantages, "clip_coef": clip_coef})

    cases = [case("minibatch 4, gen_len 5, ratios inside and outside the clip range",
                  (4, 5), 0, 0.2),
             case("clip_coef 0.1", (3, 6), 10, 0.1, spread=0.3),
             case("a minibatch of one token", (1, 1), 20, 0.2),
             case("equal advantages", (2, 3), 30, 0.2, advantages=torch.full((2, 3), 1.5))]
    check_function("calc_clipped_surrogate_objective", fn, calc_clipped_surrogate_objective,
                   _surrogate_oracle, cases, SURROGATE_MISTAKES, dims="a scalar")
