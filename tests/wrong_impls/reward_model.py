"""Wrong pairwise losses and last-token indices (notebook 6)."""

import torch
import torch.nn.functional as F

from . import wrong

# ---------------------------------------------------------------- calc_pairwise_loss


@wrong("calc_pairwise_loss", "no gradient")
def pairwise_loss_detached(chosen_rewards, rejected_rewards, margin=None):
    margin = 0.0 if margin is None else margin
    return F.softplus(rejected_rewards - chosen_rewards + margin).mean().detach()


# ---------------------------------------------------------------- get_last_token_index


@wrong("get_last_token_index", "return integers")
def float_positions(attention_mask):
    positions = torch.arange(attention_mask.shape[1], dtype=torch.float32)
    return (attention_mask * positions).amax(-1)


@wrong("calc_pairwise_loss", "this is a numerical-stability case")
def pairwise_loss_by_binary_cross_entropy(chosen_rewards, rejected_rewards, margin=None):
    """Right in exact arithmetic; BCE clamps log(0) at -100. Its 100 vs 200 once read as a mean
    over the wrong axis (1/2 = 1/batch)."""
    margin = 0.0 if margin is None else margin
    x = chosen_rewards - rejected_rewards - margin
    return F.binary_cross_entropy(torch.sigmoid(x), torch.ones_like(x))


@wrong("calc_pairwise_loss", "log(sigmoid(x)) is -inf")
def pairwise_loss_log_of_sigmoid(chosen_rewards, rejected_rewards, margin=None):
    margin = 0.0 if margin is None else margin
    return -torch.log(torch.sigmoid(chosen_rewards - rejected_rewards - margin)).mean()
