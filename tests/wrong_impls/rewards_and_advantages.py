"""Wrong rewards, reward normalisations, one-step advantages and GAEs (notebook 2)."""

import torch

from . import wrong

# ---------------------------------------------------------------- char-count reward


@wrong("reward_fn_char_count", "hard-code '.'")
def counts_periods_only(samples, char="."):
    return torch.tensor([s.count(".") for s in samples], dtype=torch.float32)


@wrong("reward_fn_char_count", "whether the character occurs")
def presence_not_count(samples, char="."):
    return torch.tensor([float(char in s) for s in samples])


@wrong("reward_fn_char_count", "not a Python list")
def returns_a_list(samples, char="."):
    return [float(s.count(char)) for s in samples]


@wrong("reward_fn_char_count", "rewards are floats")
def integer_rewards(samples, char="."):
    return torch.tensor([s.count(char) for s in samples])


# ---------------------------------------------------------------- normalize_reward


@wrong("normalize_reward", "did you use the sample std")
def normalize_sample_std(reward, eps=1e-5):
    return (reward - reward.mean()) / (reward.std() + eps)


@wrong("normalize_reward", "did you forget eps")
def normalize_without_eps(reward, eps=1e-5):
    return (reward - reward.mean()) / reward.std(correction=0)


@wrong("normalize_reward", "did you forget to subtract the mean")
def normalize_without_mean(reward, eps=1e-5):
    return reward / (reward.std(correction=0) + eps)


@wrong("normalize_reward", "divided by the variance")
def normalize_by_variance(reward, eps=1e-5):
    return (reward - reward.mean()) / (reward.var(correction=0) + eps)


@wrong("normalize_reward", "changed its input 'reward' in place")
def normalize_in_place(reward, eps=1e-5):
    reward -= reward.mean()
    reward /= reward.std(correction=0) + eps
    return reward


# ---------------------------------------------------------------- one-step advantages


@wrong("compute_advantages", "did you forget the batch dimension")
def advantages_seed_slicing(values, rewards, prefix_len):
    """The seed's bug: the zero-step slice has no `:, ` for the batch dimension."""
    one_step_est = torch.cat([values[:, prefix_len:-1], rewards[:, None]], dim=-1)
    zero_step_est = values[prefix_len - 1 : -1]
    return one_step_est - zero_step_est


@wrong("compute_advantages", "off by one position")
def advantages_one_late(values, rewards, prefix_len):
    states = values[:, prefix_len:]
    next_states = torch.cat([values[:, prefix_len + 1 :], rewards[:, None]], dim=-1)
    return next_states - states


@wrong("compute_advantages", "off by one position (one too early)")
def advantages_one_early(values, rewards, prefix_len):
    gen_len = values.shape[1] - prefix_len
    states = values[:, prefix_len - 2 : prefix_len - 2 + gen_len]
    next_states = torch.cat([values[:, prefix_len - 1 : prefix_len - 2 + gen_len],
                             rewards[:, None]], dim=-1)
    return next_states - states


@wrong("compute_advantages", "the sign is flipped")
def advantages_flipped(values, rewards, prefix_len):
    next_states = torch.cat([values[:, prefix_len:-1], rewards[:, None]], dim=-1)
    return values[:, prefix_len - 1 : -1] - next_states


@wrong("compute_advantages", "the last step's target should be the reward")
def advantages_without_reward(values, rewards, prefix_len):
    return values[:, prefix_len:] - values[:, prefix_len - 1 : -1]


@wrong("compute_advantages", "without subtracting the baseline")
def advantages_without_baseline(values, rewards, prefix_len):
    return torch.cat([values[:, prefix_len:-1], rewards[:, None]], dim=-1)


# ---------------------------------------------------------------- GAE


def _gae(values, rewards, prefix_len, gamma, decay, bootstrap=False, forwards=False, start=None):
    start = prefix_len - 1 if start is None else start
    gen_len = values.shape[1] - prefix_len
    states = values[:, start : start + gen_len]
    last = values[:, -1] if bootstrap else torch.zeros_like(rewards)
    advantages = torch.zeros_like(states)
    running = torch.zeros_like(rewards)
    steps = range(gen_len) if forwards else range(gen_len - 1, -1, -1)
    for t in steps:
        next_value = states[:, t + 1] if t + 1 < gen_len else last
        reward = rewards if t == gen_len - 1 else 0.0
        delta = reward + gamma * next_value - states[:, t]
        running = delta + decay * running
        advantages[:, t] = running
    return advantages


@wrong("compute_gae", "did you forget gae_lambda")
def gae_without_lambda(values, rewards, prefix_len, gamma=1.0, gae_lambda=0.95):
    return _gae(values, rewards, prefix_len, gamma, decay=gamma)


@wrong("compute_gae", "did you forget gamma in the decay")
def gae_without_gamma_in_decay(values, rewards, prefix_len, gamma=1.0, gae_lambda=0.95):
    return _gae(values, rewards, prefix_len, gamma, decay=gae_lambda)


@wrong("compute_gae", "did you loop forwards")
def gae_forwards(values, rewards, prefix_len, gamma=1.0, gae_lambda=0.95):
    return _gae(values, rewards, prefix_len, gamma, gamma * gae_lambda, forwards=True)


@wrong("compute_gae", "don't bootstrap from values[:, -1]")
def gae_bootstrapped(values, rewards, prefix_len, gamma=1.0, gae_lambda=0.95):
    return _gae(values, rewards, prefix_len, gamma, gamma * gae_lambda, bootstrap=True)


@wrong("compute_gae", "off by one position")
def gae_one_late(values, rewards, prefix_len, gamma=1.0, gae_lambda=0.95):
    return _gae(values, rewards, prefix_len, gamma, gamma * gae_lambda, start=prefix_len)
