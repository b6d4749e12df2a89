"""Tasks with checkable answers, for RL from verifiable rewards (docs/tasks.md).

Each task (`Task`) gives prompt records of a train and a held-out split, an exact checker with
partial credit, the reward function built from it, and demonstrations for supervised
fine-tuning. `TASKS` holds those `minirlhf train --task NAME` knows. SmolLM2-135M-Instruct's
greedy held-out pass@1 (benchmarks/task_band.py): 0.14 on `add`, 0 on the string and format
tasks, which it does not follow before supervised fine-tuning (docs/tasks.md).
"""

from functools import partial

from minirlhf.tasks.arithmetic import check_sum, make_sum_problems
from minirlhf.tasks.formats import (
    check_question,
    check_word_count,
    make_count_problems,
    make_question_problems,
)
from minirlhf.tasks.letters import check_letters, make_letter_problems
from minirlhf.tasks.task import SPLITS, Problem, Split, Task

TASKS: dict[str, Task] = {task.name: task for task in [
    Task("add", "add two 2-digit numbers; answer with the sum alone",
         partial(make_sum_problems, 10, 99), check_sum),
    Task("reverse", "reverse the letters of a 3- to 5-letter word",
         partial(make_letter_problems, "reverse", (3, 4, 5)), check_letters),
    Task("sort", "sort the letters of a 3- to 5-letter word alphabetically",
         partial(make_letter_problems, "sort", (3, 4, 5)), check_letters),
    Task("three-words", "describe a thing in exactly three words",
         partial(make_count_problems, 3), check_word_count),
    Task("question", "ask one question about a thing, the question only",
         make_question_problems, check_question),
]}
"""The tasks `--task` may name."""


def get_task(name: str) -> Task:
    """The task called `name`; an unknown name is refused with the list of known ones."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}: use one of {', '.join(TASKS)}.")
    return TASKS[name]


__all__ = ["SPLITS", "TASKS", "Problem", "Split", "Task", "get_task"]
