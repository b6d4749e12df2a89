"""Tests for minirlhf.memory: minibatches checked row by row against the memory.

Every sample gets a recognisable identity (its token ids start with its own row number), so the
oracle can say, for each row of each minibatch, which memory row it came from and check every
field against that row. The same check rejects plausible wrong minibatchers written out here.
"""

from collections.abc import Callable

import pytest
import torch
from jaxtyping import TypeCheckError

from minirlhf.memory import ReplayMemory, ReplayMinibatch

BATCH, SEQ, GEN_LEN, D_VOCAB, D_MODEL = 12, 7, 4, 5, 3


def make_memory(batch: int = BATCH, value_head: bool = True) -> ReplayMemory:
    """A memory whose row i is recognisable in every field (`kept` as the models fill it: the
    reference's logits and a frozen trunk's output)."""
    rows = torch.arange(batch)
    generator = torch.Generator().manual_seed(0)
    sample_ids = rows[:, None] * 100 + torch.arange(SEQ)  # sample_ids[i, 0] == 100 * i
    attention_mask = torch.ones(batch, SEQ, dtype=torch.long)
    attention_mask[rows % 3 == 0, 0] = 0  # some rows left-padded
    return ReplayMemory(
        sample_ids=sample_ids,
        attention_mask=attention_mask,
        logprobs=-torch.rand(batch, GEN_LEN, generator=generator),
        advantages=torch.randn(batch, GEN_LEN, generator=generator),
        values=torch.randn(batch, GEN_LEN, generator=generator) if value_head else None,
        kept={"reference": torch.randn(batch, GEN_LEN, D_VOCAB, generator=generator),
              "trunk": torch.randn(batch, SEQ, D_MODEL, generator=generator)},
    )


def minibatch_problem(get_minibatches: Callable, num_minibatches: int, passes: int) -> str | None:
    """The minibatching oracle, written as loops over rows: None if it holds, else what differed.

    `passes` passes; in each, `num_minibatches` minibatches of equal size that together hold every
    sample exactly once; every field of every row equals the memory row it came from, and returns
    are advantages + values of that row. The passes are shuffled (not all in memory order).
    """
    memory = make_memory()
    minibatches = get_minibatches(memory, num_minibatches, passes, torch.Generator().manual_seed(0))
    if len(minibatches) != num_minibatches * passes:
        return f"{len(minibatches)} minibatches, expected {num_minibatches * passes}"
    orders = []
    for p in range(passes):
        seen = []
        for mb in minibatches[p * num_minibatches : (p + 1) * num_minibatches]:
            if mb.sample_ids.shape[0] != BATCH // num_minibatches:
                return (f"pass {p}: a minibatch of {mb.sample_ids.shape[0]} rows, expected "
                        f"{BATCH // num_minibatches}")
            for j in range(mb.sample_ids.shape[0]):
                i = int(mb.sample_ids[j, 0]) // 100  # which memory row this is
                seen.append(i)
                for name in ["sample_ids", "attention_mask", "logprobs", "advantages"]:
                    if not torch.equal(getattr(mb, name)[j], getattr(memory, name)[i]):
                        return f"pass {p}: {name} of a row differs from memory row {i}"
                if mb.kept.keys() != memory.kept.keys():
                    return f"pass {p}: kept holds {sorted(mb.kept)}, expected {sorted(memory.kept)}"
                for name in memory.kept:
                    if not torch.equal(mb.kept[name][j], memory.kept[name][i]):
                        return f"pass {p}: kept[{name!r}] of a row differs from memory row {i}"
                if not torch.allclose(mb.returns[j], memory.advantages[i] + memory.values[i]):
                    return f"pass {p}: returns of memory row {i} are not its advantages + values"
        if sorted(seen) != list(range(BATCH)):  # each sample exactly once in this pass
            return f"pass {p} holds memory rows {sorted(seen)}, expected each once"
        orders.append(seen)
    if all(order == list(range(BATCH)) for order in orders):
        return "every pass is in memory order: not shuffled"
    return None


def real(memory, num_minibatches, passes, generator):
    return memory.get_minibatches(num_minibatches, passes, generator)


def _minibatch(memory: ReplayMemory, indices, returns=None, kept_indices=None) -> ReplayMinibatch:
    kept_indices = indices if kept_indices is None else kept_indices
    return ReplayMinibatch(
        sample_ids=memory.sample_ids[indices],
        attention_mask=memory.attention_mask[indices],
        logprobs=memory.logprobs[indices],
        advantages=memory.advantages[indices],
        returns=(memory.advantages + memory.values if returns is None else returns)[indices],
        kept={name: rows[kept_indices] for name, rows in memory.kept.items()},
    )


def with_replacement(memory, num_minibatches, passes, generator):
    """Draws indices with replacement: some samples twice, some never."""
    batch = memory.logprobs.shape[0]
    size = batch // num_minibatches
    return [
        _minibatch(memory, torch.randint(0, batch, (size,), generator=generator))
        for _ in range(num_minibatches * passes)
    ]


def returns_are_advantages(memory, num_minibatches, passes, generator):
    """Uses the advantages as the value head's targets (forgot to add the values back)."""
    batch = memory.logprobs.shape[0]
    minibatches = []
    for _ in range(passes):
        for indices in torch.randperm(batch, generator=generator).reshape(num_minibatches, -1):
            minibatches.append(_minibatch(memory, indices, returns=memory.advantages))
    return minibatches


def kept_shuffled_separately(memory, num_minibatches, passes, generator):
    """Draws a second permutation for what the models kept: each row's KL anchor (and frozen
    trunk) belongs to another row."""
    batch = memory.logprobs.shape[0]
    minibatches = []
    for _ in range(passes):
        order = torch.randperm(batch, generator=generator).reshape(num_minibatches, -1)
        kept_order = torch.randperm(batch, generator=generator).reshape(num_minibatches, -1)
        for indices, kept_indices in zip(order, kept_order, strict=True):
            minibatches.append(_minibatch(memory, indices, kept_indices=kept_indices))
    return minibatches


def one_pass_only(memory, num_minibatches, passes, generator):
    """Ignores batches_per_learning_phase."""
    return real(memory, num_minibatches, 1, generator)


def unshuffled(memory, num_minibatches, passes, generator):
    """Forgets to shuffle: every pass in memory order."""
    batch = memory.logprobs.shape[0]
    return [
        _minibatch(memory, indices)
        for _ in range(passes)
        for indices in torch.arange(batch).reshape(num_minibatches, -1)
    ]


@pytest.mark.parametrize("num_minibatches, passes", [(4, 2), (1, 1), (12, 3), (3, 1)])
def test_minibatches_match_the_memory_row_by_row(num_minibatches, passes):
    problem = minibatch_problem(real, num_minibatches, passes)
    assert problem is None, problem


@pytest.mark.parametrize(
    "wrong",
    [with_replacement, returns_are_advantages, kept_shuffled_separately, one_pass_only,
     unshuffled],
)
def test_minibatch_check_rejects_wrong_versions(wrong):
    assert minibatch_problem(wrong, 4, 2) is not None


def test_same_generator_seed_gives_the_same_minibatches():
    memory = make_memory()
    first = memory.get_minibatches(4, 2, torch.Generator().manual_seed(3))
    second = memory.get_minibatches(4, 2, torch.Generator().manual_seed(3))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.sample_ids, b.sample_ids)


def test_indivisible_batch_is_refused():
    with pytest.raises(AssertionError, match="divisible"):
        make_memory().get_minibatches(5, 1)


def test_unsliced_values_are_refused_at_the_boundary():
    """Passing values for every position (batch, seq) instead of the generated ones is caught,
    by the jaxtyping checker in tests and by the assert (which says how to slice) without it."""
    memory = make_memory()
    with pytest.raises((AssertionError, TypeCheckError), match="values"):
        ReplayMemory(
            memory.sample_ids, memory.attention_mask, memory.logprobs, memory.advantages,
            values=torch.randn(BATCH, SEQ), kept=memory.kept,
        )


def test_kept_rows_of_another_batch_are_refused_at_the_boundary():
    """What a model kept for fewer rows than there are samples is caught, naming the field."""
    memory = make_memory()
    with pytest.raises(AssertionError, match=r"kept\['trunk'\] has 11 rows"):
        ReplayMemory(memory.sample_ids, memory.attention_mask, memory.logprobs,
                     memory.advantages, memory.values,
                     {**memory.kept, "trunk": memory.kept["trunk"][:-1]})


def test_no_value_head_means_no_returns():
    """A critic-free memory (values None) serves minibatches without returns; a minibatcher that
    made targets from the advantages alone would hand a value head that does not exist some."""
    memory = make_memory(value_head=False)
    minibatches = memory.get_minibatches(4, 2, torch.Generator().manual_seed(0))
    assert len(minibatches) == 8 and all(mb.returns is None for mb in minibatches)
    assert all(torch.equal(mb.advantages[j], memory.advantages[int(mb.sample_ids[j, 0]) // 100])
               for mb in minibatches for j in range(len(mb.advantages)))
    wrong = returns_are_advantages(memory, 4, 2, torch.Generator().manual_seed(0))
    assert all(mb.returns is not None for mb in wrong)
