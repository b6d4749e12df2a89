"""Reward shaping: a reward function built from another one.

A policy trained on a word-counting judge (VADER) learns to say its words again and again ("bad
bad bad bad"): each repeat moves the score, and nothing in the reward says the answer stopped
being a sentence. `penalize_repetition` subtracts what `minirlhf.fluency` measures, the share
of the answer's n-grams it has already used, so a policy is paid for saying something new.

Its weight was chosen by a sweep (benchmarks/neg_sweep.py, docs/frontier.md): the negative
direction of the review job repeated itself without it at a learning rate fast enough to get
there in 25 phases. A preset adopts it with `"repeat_penalty": weight` in its reward spec.
"""

import math

import torch
from jaxtyping import Float
from torch import Tensor

from minirlhf.fluency import calc_repeated_ngram_share
from minirlhf.rewards import RewardFn, get_rewards


def get_repetition(answers: list[str], n: int = 3) -> Float[Tensor, " batch"]:
    """Each answer's share of repeated n-grams (`fluency.calc_repeated_ngram_share`), 0 for an
    answer of fewer than `n` words (too short to repeat an n-gram)."""
    shares = [calc_repeated_ngram_share(answer, n) for answer in answers]
    return torch.tensor([0.0 if math.isnan(share) else share for share in shares])


def penalize_repetition(reward_fn: RewardFn, weight: float, n: int = 3) -> RewardFn:
    """`reward_fn` minus `weight` times each answer's share of repeated n-grams.

    The share is taken from the response alone when the caller gives responses (the trainer and
    `evaluate_policy` do), else from the whole text. `reward_fn` may take any form
    `rewards.get_rewards` accepts; record fields reach it when every record has them. An answer
    that loops ("bad bad bad bad bad": 2 of its 3 3-grams repeat) loses 2/3 of `weight`.
    """
    if not (math.isfinite(weight) and weight >= 0) or n < 1:
        raise ValueError(f"penalize_repetition needs a finite weight >= 0 and n >= 1, got "
                         f"weight={weight}, n={n}.")
    name = getattr(reward_fn, "__name__", repr(reward_fn))

    def shaped(texts: list[str], prompts: list[str] | None = None,
               responses: list[str] | None = None, **fields: list) -> Float[Tensor, " batch"]:
        records = [dict(zip(fields, values)) for values in zip(*fields.values())] or None
        rewards = get_rewards(reward_fn, texts, prompts=prompts, responses=responses,
                              records=records)
        return rewards - weight * get_repetition(texts if responses is None else responses, n)

    shaped.__name__ = f"{name} - {weight:g} x repeated {n}-grams"
    return shaped
