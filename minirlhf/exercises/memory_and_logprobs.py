"""Checks for notebook 3, first half: replay-memory minibatches and log-probs.

The log-probs' oracle is an explicit loop over positions. The replay memory shuffles, so it is
checked on what any correct shuffle satisfies: every sample exactly once per pass, rows kept
together, returns = advantages + values. The objective's terms are in `objective.py`.
"""

import functools
from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from minirlhf.exercises.core import Case, Mistake, check_function, passed, randn
from minirlhf.exercises.reporting import call, crash_hint, describe_error, fail, learner_facing
from minirlhf.losses import get_logprobs
from minirlhf.memory import ReplayMemory

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
        "kept": {"reference": randn(batch, gen_len, d_vocab, seed=4)},
    }


@learner_facing
def check_replay_memory(memory_class: Callable[..., ReplayMemory]) -> None:
    """Check `memory_class(sample_ids, attention_mask, logprobs, advantages, values, kept)
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
        pairs = [(name, getattr(mb, name), inputs[name])
                 for name in ["attention_mask", "logprobs", "advantages"]]
        pairs.append(('kept["reference"]', mb.kept["reference"], inputs["kept"]["reference"]))
        for name, got, given in pairs:
            if not torch.equal(got, given[rows]):
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
    report = functools.partial(fail, exercise, case, inputs=inputs, rerun=(
        "ReplayMemory(*exercises.last_failure().inputs.values()).get_minibatches(4, 3, "
        "torch.Generator().manual_seed(0))"))
    first = order(0)
    passes = [sum(first[p * 4 : (p + 1) * 4], []) for p in range(3)]
    if all(p == list(range(8)) for p in passes):
        report("The samples come out in their original order.",
               "you did not shuffle: index with torch.randperm(batch_size, generator=generator).")
    if passes[0] == passes[1] == passes[2]:
        report("Every pass uses the same order.",
               "you shuffled once and reused the order; draw a new permutation for each pass.")
    if order(0) != first:
        report("Two calls with generators seeded alike gave different "
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
