"""Demonstrations: the prompt/response pairs supervised fine-tuning learns (`minirlhf.sft`).

Stage 0 of SFT, as `prompts` is of RL. A demonstration is a prompt record exactly as RL reads it
(`prompts.Prompt`: "prompt" or chat "messages", plus any other fields) and the response to
learn. Records come from a JSONL file (`load_sft_records`) or straight from code, such as a
task's demonstrations (`to_demonstrations`), in three shapes:

    {"prompt": "2+2=", "response": "4"}
    {"messages": [{"role": "user", "content": "2+2?"}], "response": "4"}
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
"""

import json
import reprlib
from pathlib import Path
from typing import NamedTuple

import torch

from minirlhf.prompts import Prompt, get_record_problem


class Demonstration(NamedTuple):
    """A prompt record (as RL reads it, "response" removed) and the response to learn."""

    prompt: Prompt
    response: str


def get_demonstration(record: object, where: str) -> Demonstration:
    """`record` as a demonstration: {"prompt": str, "response": str}, {"messages": [...],
    "response": str}, or {"messages": [...]} ending with the assistant's message (the response).
    Other fields stay in the prompt record. `where` starts each error."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    prompt = dict(record)
    messages = prompt.get("messages")
    ends_with_answer = (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                        and messages[-1].get("role") == "assistant")
    if ends_with_answer and "response" in prompt:
        raise ValueError(f'{where}: "messages" ends with an assistant message and there is a '
                         '"response" too: give the response once.')
    if ends_with_answer and len(messages) == 1:
        raise ValueError(f'{where}: the chat is only the response: put the "user" message it '
                         f"answers before it; got {reprlib.repr(record)}.")
    if ends_with_answer:
        prompt["messages"], prompt["response"] = messages[:-1], messages[-1].get("content")
    response = prompt.pop("response", None)
    if not isinstance(response, str) or not response:
        raise ValueError(f'{where}: no response to learn: give "response" (a non-empty string), '
                         'or end "messages" with {"role": "assistant", "content": ...}; got '
                         f"{reprlib.repr(record)}.")
    problem = get_record_problem(prompt)
    if problem is not None:
        raise ValueError(f"{where}: {problem}; got {reprlib.repr(record)}.")
    return Demonstration(prompt, response)


def to_demonstrations(records: list, source: str = "records") -> list[Demonstration]:
    """`get_demonstration` of each record (a task's, or a file's lines); at least one."""
    if not records:
        raise ValueError(f"{source} holds no demonstrations.")
    return [get_demonstration(record, f"{source} record {i}") for i, record in enumerate(records)]


def load_sft_records(path: str | Path) -> list[Demonstration]:
    """The demonstrations of a JSONL file (one record per line, blank lines skipped); a bad line
    is named with its number."""
    path, demonstrations = Path(path), []
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: invalid JSON ({error.msg} at column "
                             f"{error.colno}): {reprlib.repr(line)}") from None
        demonstrations.append(get_demonstration(record, f"{path}:{number}"))
    if not demonstrations:
        raise ValueError(f"{path} holds no demonstrations: write one JSON object per line, "
                         'e.g. {"prompt": "2+2=", "response": "4"}.')
    return demonstrations


def split_demonstrations(
    demonstrations: list[Demonstration], held_out_fraction: float, seed: int
) -> tuple[list[Demonstration], list[Demonstration]]:
    """Shuffle (with `seed`) and split into training and held-out demonstrations, at least one
    of each (as `prompts.split_prompts` splits prompts)."""
    if len(demonstrations) < 2:
        raise ValueError("SFT needs at least 2 demonstrations: one to train on, one held out.")
    order = torch.randperm(len(demonstrations), generator=torch.Generator().manual_seed(seed))
    count = min(len(demonstrations) - 1, max(1, round(held_out_fraction * len(demonstrations))))
    shuffled = [demonstrations[i] for i in order.tolist()]
    return shuffled[count:], shuffled[:count]
