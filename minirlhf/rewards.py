"""Rewards: score each sample, check the scores, and normalise them.

Stage 3 of the pipeline. A reward function returns one number per sample. In its plain form it
takes the decoded samples (prompt + continuation); it may instead name what it needs as keyword
parameters (`texts`, `prompts`, `responses`, or fields of the prompt records such as `answer`),
as in "RL with verifiable rewards" (Lambert et al. 2024, Tulu 3), where an answer is checked
against the record's reference. `get_rewards` calls it and checks what came back, because a
reward function with the wrong length or a NaN would otherwise corrupt training silently.
Sentiment rewards (VADER, Hugging Face classifiers, control tokens) live in `minirlhf.sentiment`.
"""

import inspect
import reprlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

Record = dict[str, Any]
"""A prompt record (`minirlhf.prompts.Prompt`, spelled out here: the math imports no minirlhf)."""

RewardFn = Callable[..., Tensor | Sequence[float]]
"""`reward_fn(texts)`, or `reward_fn(**inputs)` with keywords from `REWARD_INPUTS` or the fields
of the prompt records, each a list with one entry per sample (see `get_reward_kwargs`)."""

REWARD_INPUTS = {
    "texts": "prompt + response, as decoded (what the one-argument form gets)",
    "prompts": "the rendered prompt the model continued",
    "responses": "the generated answer alone, without the prompt or its template",
}
"""The keyword parameters a reward function may take, besides fields of the prompt records."""


def reward_fn_char_count(samples: list[str], char: str = ".") -> Float[Tensor, " batch"]:
    """The number of times `char` appears in each sample (the ARENA "count the periods" task)."""
    return torch.tensor([sample.count(char) for sample in samples], dtype=torch.float32)


def normalize_reward(
    reward: Float[Tensor, " batch"], eps: float = 1e-5
) -> Float[Tensor, " batch"]:
    """Shift and scale rewards to mean 0 and (population) standard deviation 1.

    Uses the population std (correction=0), so a batch of one or a batch of equal rewards gives
    zeros instead of NaN: there is no signal in it, and the update should not pretend otherwise.
    """
    return (reward - reward.mean()) / (reward.std(correction=0) + eps)


def get_reward_kwargs(
    reward_fn: RewardFn, inputs: dict[str, list | None], records: list[Record] | None
) -> dict[str, list] | None:
    """The keyword arguments `reward_fn` asks for, or None if it takes the texts as its one
    positional argument (exactly one required positional parameter, not named like an input or
    a record field: `reward_fn_char_count(samples, char=".")`).

    A parameter named like a key of `inputs` (texts, prompts, responses) or a record field gets a
    list, one entry per sample; **kwargs gets every input given and every field all records have.
    A parameter with a default is left out when not every sample has its input.
    """
    try:
        parameters = inspect.signature(reward_fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: the plain form
        return None
    fields = {field for record in records or [] for field in record}
    shared = set.intersection(*(set(record) for record in records)) if records else set()
    named = [p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = [p for p in named if p.default is p.empty]
    if (len(required) == 1 and required[0].kind != inspect.Parameter.KEYWORD_ONLY
            and required[0].name not in inputs.keys() | fields):
        return None
    wanted = [p.name for p in named
              if p.default is p.empty or p.name in shared or inputs.get(p.name) is not None]
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        wanted += [name for name, value in inputs.items() if value is not None] + sorted(shared)
    return {name: _get_reward_input(reward_fn, name, inputs, records)
            for name in dict.fromkeys(wanted)}


def _get_reward_input(
    reward_fn: RewardFn, name: str, inputs: dict[str, list | None], records: list[Record] | None
) -> list:
    """One keyword argument: an input given to `get_rewards`, or a field of every record."""
    asks = f"The reward function {getattr(reward_fn, '__name__', repr(reward_fn))} asks for {name}"
    if name in inputs:
        if inputs[name] is None:
            raise ValueError(f"{asks}, but get_rewards was not given {name}=: pass {name}= "
                             f"({REWARD_INPUTS[name]}), or drop the parameter.")
        return inputs[name]
    if records is None:
        raise ValueError(f"{asks}, which is not an input ({', '.join(REWARD_INPUTS)}) and no "
                         "prompt records were given (records=) to take it from.")
    for index, record in enumerate(records):
        if name not in record:
            raise ValueError(f'{asks}, but prompt record {index} has no "{name}" field (it has '
                             f"{', '.join(sorted(record))}); give every record a {name!r}, or "
                             f"name one of {', '.join(REWARD_INPUTS)} instead.")
    return [record[name] for record in records]


def get_rewards(
    reward_fn: RewardFn, texts: list[str], device: torch.device | str = "cpu",
    prompts: list[str] | None = None, responses: list[str] | None = None,
    records: list[Record] | None = None,
) -> Float[Tensor, " batch"]:
    """Call `reward_fn` on the samples and check it returned one finite float per sample.

    Args:
        texts: each sample's prompt + response, as decoded.
        prompts, responses, records: the rendered prompt, the response alone and the prompt
            record of each sample, for reward functions that ask for them (`get_reward_kwargs`).

    Raises:
        ValueError: the reward function asks for something not given, or a list has the wrong
            length.
        RuntimeError: naming the reward function and showing an offending sample when it raises,
            returns something that is not numbers (strings, None, a dict), the wrong number of
            rewards, or NaN / infinity.
    """
    inputs = {"texts": texts, "prompts": prompts, "responses": responses}
    for name, given in [*inputs.items(), ("records", records)]:
        if given is not None and len(given) != len(texts):
            raise ValueError(f"get_rewards got {len(given)} {name} for {len(texts)} texts: give "
                             "one per sample.")
    kwargs = get_reward_kwargs(reward_fn, inputs, records)
    name = getattr(reward_fn, "__name__", repr(reward_fn))
    try:
        rewards = reward_fn(texts) if kwargs is None else reward_fn(**kwargs)
    except Exception as error:
        raise RuntimeError(
            f"The reward function {name} raised {type(error).__name__}: {error}\n"
            f"First sample it was given: {texts[0]!r}"
        ) from error
    return check_rewards(rewards, name, texts, device)


def check_rewards(
    rewards: Any, name: str, texts: list[str], device: torch.device | str
) -> Float[Tensor, " batch"]:
    """The rewards as a float32 tensor on `device`, checked to be one finite number per sample.
    Errors name the reward function (`name`) and quote an offending sample."""
    try:
        rewards = torch.as_tensor(rewards, dtype=torch.float32).detach().flatten().to(device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise RuntimeError(
            f"The reward function {name} returned {reprlib.repr(rewards)} "
            f"({type(rewards).__name__}), which is not one number per sample ({error}); return "
            f"a list of floats or a 1-D tensor. First sample: {texts[0]!r}"
        ) from error
    if rewards.shape[0] != len(texts):
        raise RuntimeError(
            f"The reward function {name} returned {rewards.shape[0]} rewards for {len(texts)} "
            f"samples; it must return one number per sample. First sample: {texts[0]!r}"
        )
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise RuntimeError(
            f"The reward function {name} returned {rewards[bad[0]].item()} for sample {bad[0]}: "
            f"{texts[bad[0]]!r} ({len(bad)} non-finite rewards in all)."
        )
    return rewards
