"""Checks for notebook 2: the char-count reward, reward normalisation, one-step advantages, GAE.

The oracles are written differently from the library on purpose: Python's `str.count` in a loop,
the population standard deviation spelt out as a sum, and advantages computed position by
position with explicit indices (GAE as the discounted sum of deltas, not the backward recursion).
"""

import functools
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from minirlhf.advantages import compute_gae, compute_one_step_advantages
from minirlhf.exercises.core import (
    Case,
    Mistake,
    check_function,
    describe_difference,
    find_mistake,
    passed,
    randn,
    run_case,
)
from minirlhf.exercises.reporting import call, crash_hint, describe_error, fail, learner_facing
from minirlhf.rewards import normalize_reward, reward_fn_char_count

# ---------------------------------------------------------------- the char-count reward

CHAR_COUNT_CASES = [
    Case("four samples, char='.'", {"samples": ["a.b.c", "", "...", "no periods here"]}),
    Case("char='!'", {"samples": ["Hi! Hi!!", "a.b.", "!"], "char": "!"}),
    Case("a batch of one", {"samples": ["one. two. three."]}),
]

CHAR_COUNT_MISTAKES = [
    Mistake("did you hard-code '.' instead of using the `char` argument?",
            lambda samples, char=".": _counts(samples, ".")),
    Mistake("you returned whether the character occurs (0 or 1), not how many times.",
            lambda samples, char=".": torch.tensor([float(char in s) for s in samples])),
]


@learner_facing
def check_reward_fn_char_count(fn: Callable[..., Tensor]) -> None:
    """Check `fn(samples, char=".")`: how many times `char` occurs in each sample, as floats."""
    exercise = "reward_fn_char_count"
    for case in CHAR_COUNT_CASES:
        expected = _counts(**case.kwargs)
        reference = reward_fn_char_count(**case.kwargs)
        assert describe_difference(expected, reference) is None, "reference != oracle"
        got, error = call(fn, case.kwargs, positional=True)
        report = functools.partial(fail, exercise, case.name, inputs=case.kwargs,
                                   expected=expected, got=got, error=error)
        if error is not None:
            report(describe_error(error), crash_hint(error))
        if isinstance(got, list | tuple):
            report(f"Expected a torch.Tensor, got a {type(got).__name__}.",
                   "return torch.tensor([...], dtype=torch.float32), not a Python list.")
        problem = describe_difference(expected, got, dims="batch")
        if problem is not None:
            outcomes = [run_case(fn, other.kwargs) for other in CHAR_COUNT_CASES]
            hint = find_mistake(CHAR_COUNT_MISTAKES, CHAR_COUNT_CASES, outcomes)
            if hint is None and isinstance(got, Tensor) and not got.is_floating_point():
                hint = "rewards are floats: pass dtype=torch.float32 to torch.tensor."
            report(problem, hint)
    passed(exercise, f"{len(CHAR_COUNT_CASES)} cases (other characters, empty strings, a batch "
           "of one) match the reference solution and str.count")


def _counts(samples: list[str], char: str = ".") -> Float[Tensor, " batch"]:
    return torch.tensor([float(sum(c == char for c in s)) for s in samples])


# ---------------------------------------------------------------- normalize_reward


def _normalize_oracle(
    reward: Float[Tensor, " batch"], eps: float = 1e-5
) -> Float[Tensor, " batch"]:
    values = reward.tolist()
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5  # population std
    return torch.tensor([(v - mean) / (std + eps) for v in values])


NORMALIZE_MISTAKES = [  # "forgot eps" first: at a batch of one, both it and the next give NaN
    Mistake("did you forget eps? Equal rewards (or a batch of one) have std 0, and 0 / 0 is NaN.",
            lambda reward, eps=1e-5: (reward - reward.mean()) / reward.std(correction=0)),
    Mistake("did you use the sample std (torch's default, correction=1)? Use the population "
            "std, reward.std(correction=0): then a batch of one gives zeros, not NaN.",
            lambda reward, eps=1e-5: (reward - reward.mean()) / (reward.std() + eps)),
    Mistake("did you forget to subtract the mean?",
            lambda reward, eps=1e-5: reward / (reward.std(correction=0) + eps)),
    Mistake("you divided by the variance; divide by the standard deviation.",
            lambda reward, eps=1e-5: (reward - reward.mean()) / (reward.var(correction=0) + eps)),
]


@learner_facing
def check_normalize_reward(fn: Callable[..., Tensor]) -> None:
    """Check `fn(reward, eps=1e-5)`: mean 0 and population std 1 (zeros for a batch of one)."""
    cases = [
        Case("8 rewards", {"reward": randn(8, seed=0, scale=3.0) + 2.0}),
        Case("2 rewards", {"reward": torch.tensor([1.0, 4.0])}),
        Case("a batch of one", {"reward": torch.tensor([0.7])}),
        Case("equal rewards", {"reward": torch.full((4,), 2.5)}),
    ]
    check_function("normalize_reward", fn, normalize_reward, _normalize_oracle, cases,
                   NORMALIZE_MISTAKES, dims="batch")


# ---------------------------------------------------------------- one-step advantages


def _advantage_cases() -> list[Case]:
    """Values over the whole sequence and a reward per sample, in several shapes."""
    shapes = [("batch 3, prefix_len 2, gen_len 4", 3, 2, 4),
              ("batch 2, prefix_len 5, gen_len 3", 2, 5, 3),
              ("prefix_len 1", 4, 1, 5),
              ("a batch of one, gen_len 1", 1, 3, 1)]
    return [
        Case(name, {"values": randn(batch, prefix_len + gen_len, seed=i),
                    "rewards": randn(batch, seed=10 + i, scale=2.0), "prefix_len": prefix_len})
        for i, (name, batch, prefix_len, gen_len) in enumerate(shapes)
    ]


def _one_step_oracle(values: Float[Tensor, "batch seq"], rewards: Float[Tensor, " batch"],
                     prefix_len: int) -> Float[Tensor, "batch gen_len"]:
    batch, seq = values.shape
    gen_len = seq - prefix_len
    advantages = torch.zeros(batch, gen_len)
    for b in range(batch):
        for t in range(gen_len):
            state = prefix_len - 1 + t  # the position whose logits chose generated token t
            target = rewards[b] if t == gen_len - 1 else values[b, state + 1]
            advantages[b, t] = target - values[b, state]
    return advantages


# The mistakes below are deliberately wrong, so they carry no shape annotations.
def _rows_slice(values, rewards, prefix_len):
    one_step = torch.cat([values[:, prefix_len:-1], rewards[:, None]], dim=-1)
    return one_step - values[prefix_len - 1 : -1]


def _shifted(values, rewards, prefix_len, shift):
    start = prefix_len - 1 + shift
    states = values[:, start : values.shape[1] - 1 + shift]
    one_step = torch.cat([values[:, start + 1 : values.shape[1] - 1 + shift], rewards[:, None]], 1)
    return one_step - states


ADVANTAGE_MISTAKES = [
    Mistake("did you forget the batch dimension when slicing? `values[prefix_len - 1 : -1]` "
            "slices samples (rows); write `values[:, prefix_len - 1 : -1]`.", _rows_slice),
    Mistake("the advantages are off by one position: generated token t was chosen in the state "
            "ending at position prefix_len - 1 + t, so V(s_t) is values[:, prefix_len - 1 + t].",
            lambda values, rewards, prefix_len: _shifted(values, rewards, prefix_len, 1)),
    Mistake("the advantages are off by one position (one too early): V(s_t) is "
            "values[:, prefix_len - 1 + t].",
            lambda values, rewards, prefix_len: _shifted(values, rewards, prefix_len, -1)),
    Mistake("the sign is flipped: A_t = V(s_{t+1}) - V(s_t), not V(s_t) - V(s_{t+1}).",
            lambda values, rewards, prefix_len: -compute_one_step_advantages(
                values, rewards, prefix_len)),
    Mistake("the last step's target should be the reward, not values[:, -1] (the sequence ends "
            "there, and the reward is all that follows).",
            lambda values, rewards, prefix_len: compute_one_step_advantages(values, values[:, -1],
                                                                   prefix_len)),
    Mistake("you returned the targets (V(s_{t+1}) and the reward) without subtracting the "
            "baseline V(s_t).",
            lambda values, rewards, prefix_len: compute_one_step_advantages(
                values, rewards, prefix_len)
            + values[:, prefix_len - 1 : -1]),
]


@learner_facing
def check_compute_one_step_advantages(fn: Callable[..., Tensor]) -> None:
    """Check `fn(values, rewards, prefix_len)`: one-step advantages, shape (batch, gen_len)."""
    check_function("compute_one_step_advantages", fn, compute_one_step_advantages, _one_step_oracle,
                   _advantage_cases(), ADVANTAGE_MISTAKES, dims="batch, gen_len")


# ---------------------------------------------------------------- GAE


def _gae_oracle(values: Float[Tensor, "batch seq"], rewards: Float[Tensor, " batch"],
                prefix_len: int, gamma: float = 1.0, gae_lambda: float = 0.95
                ) -> Float[Tensor, "batch gen_len"]:
    """A_t = sum over l of (gamma lambda)^l delta_{t+l}, with V = 0 after the last token."""
    batch, seq = values.shape
    gen_len = seq - prefix_len
    advantages = torch.zeros(batch, gen_len)
    for b in range(batch):
        state_values = [values[b, prefix_len - 1 + t].item() for t in range(gen_len)] + [0.0]
        step_rewards = [0.0] * (gen_len - 1) + [rewards[b].item()]
        deltas = [step_rewards[t] + gamma * state_values[t + 1] - state_values[t]
                  for t in range(gen_len)]
        for t in range(gen_len):
            advantages[b, t] = sum((gamma * gae_lambda) ** k * deltas[t + k]
                                   for k in range(gen_len - t))
    return advantages


def _gae_variant(values, rewards, prefix_len, gamma, gae_lambda, *, forwards=False,
                 bootstrap=False, decay=None, shift=0):
    """GAE with one thing changed: loop direction, last next-value, decay, or state positions."""
    states = values[:, prefix_len - 1 + shift : values.shape[1] - 1 + shift]
    last = values[:, -1:] if bootstrap else torch.zeros_like(states[:, :1])
    next_values = torch.cat([states[:, 1:], last], dim=1)
    step_rewards = torch.zeros_like(states)
    step_rewards[:, -1] = rewards
    deltas = step_rewards + gamma * next_values - states
    decay = gamma * gae_lambda if decay is None else decay
    advantages, running = torch.zeros_like(deltas), torch.zeros_like(deltas[:, 0])
    order = range(states.shape[1]) if forwards else reversed(range(states.shape[1]))
    for t in order:
        running = deltas[:, t] + decay * running
        advantages[:, t] = running
    return advantages


GAE_MISTAKES = [
    Mistake("did you forget gae_lambda? The running sum decays by gamma * gae_lambda per step.",
            lambda values, rewards, prefix_len, gamma, gae_lambda: _gae_variant(
                values, rewards, prefix_len, gamma, gae_lambda, decay=gamma)),
    Mistake("did you forget gamma in the decay? The running sum decays by gamma * gae_lambda.",
            lambda values, rewards, prefix_len, gamma, gae_lambda: _gae_variant(
                values, rewards, prefix_len, gamma, gae_lambda, decay=gae_lambda)),
    Mistake("did you loop forwards? A_t depends on the later deltas, so the loop runs backwards "
            "from the last generated token.",
            lambda values, rewards, prefix_len, gamma, gae_lambda: _gae_variant(
                values, rewards, prefix_len, gamma, gae_lambda, forwards=True)),
    Mistake("the episode ends after the last token, so the next value there is 0: don't "
            "bootstrap from values[:, -1].",
            lambda values, rewards, prefix_len, gamma, gae_lambda: _gae_variant(
                values, rewards, prefix_len, gamma, gae_lambda, bootstrap=True)),
    Mistake(ADVANTAGE_MISTAKES[1].hint,
            lambda values, rewards, prefix_len, gamma, gae_lambda: _gae_variant(
                values, rewards, prefix_len, gamma, gae_lambda, shift=1)),
]


@learner_facing
def check_compute_gae(fn: Callable[..., Tensor]) -> None:
    """Check `fn(values, rewards, prefix_len, gamma, gae_lambda)`: GAE, shape (batch, gen_len)."""
    settings = [(1.0, 0.95), (0.9, 0.8), (1.0, 0.0), (1.0, 1.0), (0.5, 0.5)]
    cases = []
    for base, (gamma, gae_lambda) in zip((_advantage_cases() * 2)[:5], settings, strict=True):
        kwargs = {**base.kwargs, "gamma": gamma, "gae_lambda": gae_lambda}
        cases.append(Case(f"{base.name}, gamma {gamma}, lambda {gae_lambda}", kwargs))
    check_function("compute_gae", fn, compute_gae, _gae_oracle, cases, GAE_MISTAKES,
                   dims="batch, gen_len")
