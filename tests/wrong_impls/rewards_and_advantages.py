"""Wrong rewards, reward normalisations, one-step advantages and GAEs (notebook 2)."""

import torch

from . import wrong

# ---------------------------------------------------------------- char-count reward


@wrong("reward_fn_char_count", "not a Python list")
def returns_a_list(samples, char="."):
    return [float(s.count(char)) for s in samples]


@wrong("reward_fn_char_count", "rewards are floats")
def integer_rewards(samples, char="."):
    return torch.tensor([s.count(char) for s in samples])


# ---------------------------------------------------------------- normalize_reward


@wrong("normalize_reward", "changed its input 'reward' in place")
def normalize_in_place(reward, eps=1e-5):
    reward -= reward.mean()
    reward /= reward.std(correction=0) + eps
    return reward


# ---------------------------------------------------------------- one-step advantages and GAE


@wrong("compute_one_step_advantages", "A slice that forgot the batch axis")
def advantages_crash_on_rows_slice(values, rewards, prefix_len):
    """Slices rows for the targets but positions for the states: the shapes cannot broadcast."""
    targets = torch.cat([values[:, prefix_len:], rewards[:, None]], dim=-1)
    return targets - values[prefix_len - 1 : -1]

