"""Prompt datasets: the prompts a run trains on, and those it holds out to watch for over-fitting.

Stage 0 of the pipeline, before the rollout. A prompt file is plain text (one prompt per line) or
JSONL (one object per line with a "prompt" key). Each phase draws `prompts_per_phase` training
prompts and repeats each `group_size` times, next to each other, as GRPO and RLOO expect (group g
is rows g * group_size .. (g + 1) * group_size - 1). minirlhf ships `REVIEW_PROMPTS`, a few
hundred openings of film reviews for the sentiment task (`RLHFArgs.prompts = "reviews"`).
"""

import json
from pathlib import Path

import torch

REVIEW_PROMPTS = Path(__file__).parent / "data" / "review_prompts.txt"
"""The shipped prompt set: openings of film reviews, neither positive nor negative yet."""


def resolve_prompt_file(name: str) -> Path:
    """"reviews" names the shipped set; anything else is a path."""
    return REVIEW_PROMPTS if name == "reviews" else Path(name)


def load_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file (one per line) or a .jsonl file ({"prompt": ...} per line).
    Blank lines are skipped; a line that is not a prompt is named with its number."""
    path = Path(path)
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path}:{number}: expected {{"prompt": "..."}}, got {line!r}')
            line = record["prompt"]
        prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} holds no prompts.")
    return prompts


def split_prompts(
    prompts: list[str], held_out_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Shuffle (with `seed`) and split into training and held-out prompts. At least one prompt
    is held out when the fraction is above 0, and at least one is kept for training."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = min(len(prompts) - 1, max(held_out_fraction > 0, round(held_out_fraction *
                                                                        len(prompts))))
    shuffled = [prompts[i] for i in order]
    return shuffled[held_out:], shuffled[:held_out]


def get_phase_prompts(
    prompts: list[str], prompts_per_phase: int, group_size: int, generator: torch.Generator
) -> list[str]:
    """`prompts_per_phase` prompts drawn without replacement (with replacement if there are
    fewer), each repeated `group_size` times in adjacent rows."""
    if len(prompts) >= prompts_per_phase:
        chosen = torch.randperm(len(prompts), generator=generator)[:prompts_per_phase]
    else:
        chosen = torch.randint(len(prompts), (prompts_per_phase,), generator=generator)
    return [prompts[i] for i in chosen.tolist() for _ in range(group_size)]


def check_prompts(prompts: list[str] | None, batch_size: int, prompt_file: str | None):
    """Prompts given to the trainer: one per sample, and not as well as a prompt file."""
    if prompts is not None and len(prompts) != batch_size:
        raise ValueError(f"Got {len(prompts)} prompts for batch_size {batch_size}.")
    if prompts is not None and prompt_file is not None:
        raise ValueError("RLHFTrainer got prompts= and a prompt file (--prompts): give one.")


def load_prompt_split(
    prompt_file: str | None, held_out_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """The training and held-out prompts of `RLHFArgs.prompts` ("reviews" or a path); none
    without a file."""
    if prompt_file is None:
        return [], []
    return split_prompts(load_prompts(resolve_prompt_file(prompt_file)), held_out_fraction, seed)
