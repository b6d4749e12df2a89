"""Prompt datasets: the prompts a run trains on, those it holds out, and the text the model sees.

Stage 0 of the pipeline, before the rollout. A prompt is a record (`Prompt`): a dict with either a
"prompt" string or a list of chat "messages", plus any other fields a reward function may ask for
(an "answer" to check against, say). A prompt file is plain text (one prompt per line) or JSONL
(one record per line). `render_prompt` turns a record into the text the model continues: through
a template such as "Question: {prompt}\n\nAnswer:", through the tokenizer's own chat template
(Ouyang et al. 2022, "Training language models to follow instructions", train on chat turns), or
as it is. Each phase draws `prompts_per_phase` training prompts and repeats each `group_size`
times, next to each other, as GRPO and RLOO expect (group g is rows g * group_size ..
(g + 1) * group_size - 1). minirlhf ships `REVIEW_PROMPTS`, a few hundred openings of film
reviews for the sentiment task (`RLHFArgs.prompts = "reviews"`).
"""

import json
import reprlib
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

Prompt = dict[str, Any]
"""A prompt record: "prompt" (a str) or "messages" (a list of {"role": str, "content": str}
chat messages, with at least one "user" message), plus any other fields (e.g. "answer"), which
reach reward functions that name them as parameters (see `minirlhf.rewards.get_rewards`)."""

REVIEW_PROMPTS = Path(__file__).parent / "data" / "review_prompts.txt"
"""The shipped prompt set: openings of film reviews, neither positive nor negative yet."""


def resolve_prompt_file(name: str) -> Path:
    """"reviews" names the shipped set; anything else is a path."""
    return REVIEW_PROMPTS if name == "reviews" else Path(name)


def get_record_problem(record: Any) -> str | None:
    """What makes `record` not a `Prompt`, or None if it is one."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if ("prompt" in record) == ("messages" in record):
        return 'expected one of "prompt" (a string) or "messages" (a list of chat messages)'
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            return f'"prompt" must be a string, got {type(record["prompt"]).__name__}'
        return None
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list of {"role": ..., "content": ...}'
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return (f'message {index} must be {{"role": "...", "content": "..."}} with string '
                    f"values, got {reprlib.repr(message)}")
    if not any(message["role"] == "user" for message in messages):
        return '"messages" has no message with role "user"'
    return None


def check_record(record: Prompt) -> None:
    """Raise a ValueError saying what is wrong if `record` is not a valid `Prompt`."""
    problem = get_record_problem(record)
    if problem is not None:
        raise ValueError(f"Not a prompt record: {problem}: {reprlib.repr(record)}")


def prompt_text(record: Prompt) -> str:
    """The record's "prompt", or the content of its last user message."""
    check_record(record)
    if "prompt" in record:
        return record["prompt"]
    return [m["content"] for m in record["messages"] if m["role"] == "user"][-1]


def parse_prompt_line(line: str, where: str, jsonl: bool) -> Prompt:
    """One line of a prompt file as a record; `where` ("file:line") starts each error."""
    if not jsonl:
        return {"prompt": line}
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: invalid JSON ({error.msg} at column {error.colno}): "
                         f"{reprlib.repr(line)}") from None
    problem = get_record_problem(record)
    if problem is not None:
        raise ValueError(f"{where}: {problem}; got {reprlib.repr(line)}")
    return record


def load_prompts(path: str | Path) -> list[Prompt]:
    """The prompt records of a text file ({"prompt": line} per line) or a .jsonl file (one record
    per line). Blank lines are skipped; a line that is not a prompt is named with its number."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    prompts = [parse_prompt_line(line, f"{path}:{number}", path.suffix == ".jsonl")
               for number, line in enumerate(lines, start=1) if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts.")
    return prompts


def split_prompts(
    prompts: list[Prompt], held_out_fraction: float, seed: int
) -> tuple[list[Prompt], list[Prompt]]:
    """Shuffle (with `seed`) and split into training and held-out prompts. At least one prompt
    is held out when the fraction is above 0, and at least one is kept for training."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = min(len(prompts) - 1, max(held_out_fraction > 0, round(held_out_fraction *
                                                                        len(prompts))))
    shuffled = [prompts[i] for i in order]
    return shuffled[held_out:], shuffled[:held_out]


def get_phase_prompts(
    prompts: list[Prompt], prompts_per_phase: int, group_size: int, generator: torch.Generator
) -> list[Prompt]:
    """`prompts_per_phase` prompts drawn without replacement (with replacement if there are
    fewer), each repeated `group_size` times in adjacent rows (the same record object)."""
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
) -> tuple[list[Prompt], list[Prompt]]:
    """The training and held-out prompt records of `RLHFArgs.prompts` ("reviews" or a path);
    none without a file."""
    if prompt_file is None:
        return [], []
    return split_prompts(load_prompts(resolve_prompt_file(prompt_file)), held_out_fraction, seed)


# ---------------------------------------------------------------- rendering: the text to continue


def fill_template(template: str, text: str) -> str:
    """`template` with "{prompt}" replaced by `text`. Plain replacement, not str.format: other
    braces (a JSON example, a LaTeX formula) in the template or the prompt are left as they are."""
    if "{prompt}" not in template:
        raise ValueError(f'The prompt template {template!r} has no "{{prompt}}": put {{prompt}} '
                         "where each prompt's text goes.")
    return template.replace("{prompt}", text)


def apply_chat_template(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase | None
) -> str:
    """The messages in the tokenizer's own chat format, ending with the assistant's header."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("This model's tokenizer has no chat template: set chat_template=False "
                         "(a prompt template can still give the prompts a format).")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompt(
    record: Prompt, template: str | None, chat: bool,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """The text the model continues: the prompt filled into `template` (if given), then, with
    `chat`, wrapped as a user message in the tokenizer's chat template. A record with "messages"
    is rendered by the chat template as it is, so it needs `chat` and takes no template."""
    check_record(record)
    if "messages" in record:
        if not chat:
            raise ValueError("A prompt record has chat messages: render messages with the chat "
                             "template: set chat_template=True.")
        if template is not None:
            raise ValueError('A prompt template fills in "prompt" records; this record has chat '
                             'messages: drop the prompt template or give "prompt" records.')
        return apply_chat_template(record["messages"], tokenizer)
    text = record["prompt"] if template is None else fill_template(template, record["prompt"])
    return apply_chat_template([{"role": "user", "content": text}], tokenizer) if chat else text


def render_prompts(
    records: list[Prompt], template: str | None, chat: bool,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[str]:
    """`render_prompt` of each record, in order."""
    return [render_prompt(record, template, chat, tokenizer) for record in records]
