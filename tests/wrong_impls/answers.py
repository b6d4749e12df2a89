"""Wrong pieces of answers that end (notebook 10), written as a learner might: the four named
mistakes (padding in the mean, the EOS dropped from the mask, the reward at gen_len - 1, the
per-sequence mean called token-level), and mistakes only the gradient shows."""

import torch

from . import wrong


@wrong("masked_mean", "padding is counted")
def masked_mean_over_everything(values, response_mask):
    return (values * response_mask).sum() / values.numel()  # the count includes the padding


@wrong("masked_mean", "padding gets a gradient")
def masked_mean_summing_padding(values, response_mask):
    return values.sum() / response_mask.sum()  # right when the padding holds 0.0


@wrong("get_response_mask", "the EOS is left out of the mask")
def response_mask_without_eos(gen_tokens, eos_id):
    mask = torch.ones_like(gen_tokens)
    for row in range(gen_tokens.shape[0]):
        hits = (gen_tokens[row] == eos_id).nonzero()
        if len(hits):
            mask[row, hits[0, 0]:] = 0  # the EOS itself goes too
    return mask


@wrong("compute_gae_with_ends", "the reward sits at gen_len - 1")
def gae_with_the_reward_at_the_limit(values, rewards, response_mask, gamma=1.0, gae_lambda=0.95):
    batch, gen_len = values.shape
    advantages = torch.zeros_like(values)
    running = torch.zeros(batch)
    for t in reversed(range(gen_len)):
        following = rewards if t == gen_len - 1 else gamma * values[:, t + 1]
        running = following - values[:, t] + gamma * gae_lambda * running
        advantages[:, t] = running
    return advantages * response_mask


@wrong("aggregate", "a per-sequence mean is not the token-level mean")
def aggregate_token_mean_per_answer(values, response_mask, how="token_mean"):
    mask = response_mask.float()
    sums, counts = (values * mask).sum(dim=1), mask.sum(dim=1)
    if how == "constant":
        return sums.sum() / mask.numel()
    return (sums / counts).mean()  # token_mean and sequence_mean alike


@wrong("aggregate", "no gradient")
def aggregate_through_python(values, response_mask, how="token_mean"):
    real = [v for row, m in zip(values.tolist(), response_mask.tolist())
            for v, keep in zip(row, m) if keep]
    return torch.tensor(sum(real) / len(real))


@wrong("get_token_weights", "padding gets a weight")
def weights_from_the_shape(response_mask, how):
    batch, gen_len = response_mask.shape
    lengths = response_mask.sum(dim=1, keepdim=True).float()
    if how == "token_mean":
        return torch.full((batch, gen_len), 1.0 / response_mask.sum().item())
    if how == "sequence_mean":
        return (1.0 / (batch * lengths)).expand(batch, gen_len)
    return torch.full((batch, gen_len), 1.0 / (batch * gen_len))
