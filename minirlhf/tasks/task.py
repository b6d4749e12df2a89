"""A task with a checkable answer: problems, a train / held-out split, a checker and its reward.

Stage 0 and stage 3 of the pipeline for RL from verifiable rewards (Lambert et al. 2024, Tulu 3):
the prompts a run trains and is evaluated on, and the reward that checks an answer. A task
enumerates every problem it can ask (`Problem`: a prompt, the fields its checker reads, and a
right answer to imitate), shuffles them with its seed and holds out a fixed share of the *keys*
(the word, the pair of numbers), so no held-out key is ever trained on. The checker returns 1.0
for an exact answer only, and less (partial credit, documented by each checker) for a near one;
a held-out pass is a score of 1.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from minirlhf.prompts import Prompt

Split = Literal["train", "held_out"]
"""A split's name (methods take a str and refuse others with a message)."""
SPLITS = ("train", "held_out")


class Problem(NamedTuple):
    """One question a task can ask."""

    key: str
    """What must not appear in both splits (the word, the unordered pair of numbers)."""
    prompt: str
    """The user's message."""
    fields: dict[str, Any]
    """What the checker reads (e.g. {"answer": "85"}); each becomes a field of the record."""
    demonstration: str
    """A right answer, for supervised fine-tuning."""


@dataclass(frozen=True)
class Task:
    """A named task: its problems, its split, its checker.

    Args:
        name: how `--task` names it.
        description: one line for help texts and docs.
        make_problems: every problem, in a fixed order.
        checker: `checker(response, **fields) -> float` in [0, 1]; 1 only for an exact answer.
        seed: shuffles the problems and chooses the held-out keys.
        held_out_share: the share of keys held out.
    """

    name: str
    description: str
    make_problems: Callable[[], list[Problem]] = field(repr=False)
    checker: Callable[..., float] = field(repr=False)
    seed: int = 0
    held_out_share: float = 0.25

    @cached_property
    def splits(self) -> dict[str, list[Problem]]:
        """"train" and "held_out": the problems of each split, shuffled with the seed."""
        problems = self.make_problems()
        keys = sorted({problem.key for problem in problems})
        random.Random(self.seed).shuffle(keys)
        held_out = set(keys[: max(1, round(self.held_out_share * len(keys)))])
        random.Random(self.seed + 1).shuffle(problems)
        return {"train": [p for p in problems if p.key not in held_out],
                "held_out": [p for p in problems if p.key in held_out]}

    def get_problems(self, split: str, n: int | None = None) -> list[Problem]:
        """The first `n` problems of `split` (all with None), the same on every call."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)}.")
        problems = self.splits[split]
        if n is not None and not 0 < n <= len(problems):
            raise ValueError(f"Task {self.name!r} has {len(problems)} {split} problems; asked "
                             f"for {n}: ask for between 1 and {len(problems)}.")
        return problems[:n]

    def get_records(self, split: str, n: int | None = None) -> list[Prompt]:
        """Prompt records ({"prompt": ..., plus the checker's fields}) of `split`."""
        return [{"prompt": p.prompt, **p.fields} for p in self.get_problems(split, n)]

    def get_demonstrations(self, split: str, n: int | None = None) -> list[dict]:
        """{"prompt": ..., "response": a right answer} for supervised fine-tuning."""
        return [{"prompt": p.prompt, "response": p.demonstration}
                for p in self.get_problems(split, n)]

    @property
    def fields(self) -> tuple[str, ...]:
        """The record fields the checker reads."""
        return tuple(self.get_problems("train", 1)[0].fields)

    def check(self, response: str, **fields: Any) -> float:
        """The checker's score of `response`, given the record's fields (others are ignored)."""
        missing = [name for name in self.fields if name not in fields]
        if missing:
            raise ValueError(f"Task {self.name!r} checks an answer against {', '.join(missing)}"
                             f", which the record lacks: use the task's own records.")
        score = self.checker(response, **{name: fields[name] for name in self.fields})
        assert 0.0 <= score <= 1.0, f"{self.name}'s checker returned {score}, not in [0, 1]"
        return score

    @property
    def reward_fn(self) -> Callable[..., Float[Tensor, " batch"]]:
        """The reward: `reward_fn(responses, **fields)`, each a list with one entry per
        sample, as `rewards.get_rewards` passes them; the checker's score of each response."""

        def reward_fn(responses: list[str], **fields: list) -> Float[Tensor, " batch"]:
            rows = [{name: values[i] for name, values in fields.items()}
                    for i in range(len(responses))]
            return torch.tensor([self.check(response, **row)
                                 for response, row in zip(responses, rows, strict=True)],
                                dtype=torch.float32)

        reward_fn.__name__ = f"task({self.name})"
        return reward_fn
