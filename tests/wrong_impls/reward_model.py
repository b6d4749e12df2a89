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
