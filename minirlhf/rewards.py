"""Rewards: score each sample's text, check the scores, and normalise them.

Stage 3 of the pipeline. A reward function takes the decoded samples (prompt + continuation) and
returns one number per sample. `get_rewards` calls it and checks what came back, because a reward
function with the wrong length or a NaN would otherwise corrupt training silently. Sentiment
rewards (VADER, Hugging Face classifiers, control tokens) live in `minirlhf.sentiment`.
"""

import reprlib
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

RewardFn = Callable[[list[str]], Tensor | Sequence[float]]


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


def get_rewards(
    reward_fn: RewardFn, samples: list[str], device: torch.device | str = "cpu"
) -> Float[Tensor, " batch"]:
    """Call `reward_fn` on the samples and check it returned one finite float per sample.

    Raises:
        RuntimeError: naming the reward function and showing an offending sample when it raises,
            returns something that is not numbers (strings, None, a dict), the wrong number of
            rewards, or NaN / infinity.
    """
    name = getattr(reward_fn, "__name__", repr(reward_fn))
    try:
        rewards = reward_fn(samples)
    except Exception as error:
        raise RuntimeError(
            f"The reward function {name} raised {type(error).__name__}: {error}\n"
            f"First sample it was given: {samples[0]!r}"
        ) from error
    try:
        rewards = torch.as_tensor(rewards, dtype=torch.float32).detach().flatten().to(device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise RuntimeError(
            f"The reward function {name} returned {reprlib.repr(rewards)} "
            f"({type(rewards).__name__}), which is not one number per sample ({error}); return "
            f"a list of floats or a 1-D tensor. First sample: {samples[0]!r}"
        ) from error
    if rewards.shape[0] != len(samples):
        raise RuntimeError(
            f"The reward function {name} returned {rewards.shape[0]} rewards for {len(samples)} "
            f"samples; it must return one number per sample. First sample: {samples[0]!r}"
        )
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise RuntimeError(
            f"The reward function {name} returned {rewards[bad[0]].item()} for sample {bad[0]}: "
            f"{samples[bad[0]]!r} ({len(bad)} non-finite rewards in all)."
        )
    return rewards
