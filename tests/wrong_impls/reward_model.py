"""Wrong pairwise losses and last-token indices (notebook 6)."""

import torch
import torch.nn.functional as F

from . import wrong

# ---------------------------------------------------------------- calc_pairwise_loss


@wrong("calc_pairwise_loss", "the sign is flipped")
def rejected_minus_chosen(chosen_rewards, rejected_rewards, margin=None):
    margin = 0.0 if margin is None else margin
    return -F.logsigmoid(rejected_rewards - chosen_rewards + margin).mean()


@wrong("calc_pairwise_loss", "did you forget the minus")
def log_sigmoid_without_minus(chosen_rewards, rejected_rewards, margin=None):
    margin = 0.0 if margin is None else margin
    return F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()


@wrong("calc_pairwise_loss", "the margin is subtracted")
def margin_added(chosen_rewards, rejected_rewards, margin=None):
    margin = 0.0 if margin is None else margin
    return -F.logsigmoid(chosen_rewards - rejected_rewards + margin).mean()


@wrong("calc_pairwise_loss", "did you ignore the margin")
def margin_ignored(chosen_rewards, rejected_rewards, margin=None):
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


@wrong("calc_pairwise_loss", "did you sum over the pairs")
def summed_over_pairs(chosen_rewards, rejected_rewards, margin=None):
    margin = 0.0 if margin is None else margin
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin).sum()


@wrong("calc_pairwise_loss", "underflows to log(0)")
def log_of_sigmoid(chosen_rewards, rejected_rewards, margin=None):
    margin = 0.0 if margin is None else margin
    return -torch.log(torch.sigmoid(chosen_rewards - rejected_rewards - margin)).mean()


@wrong("calc_pairwise_loss", "not its log")
def sigmoid_without_log(chosen_rewards, rejected_rewards, margin=None):
    margin = 0.0 if margin is None else margin
    return -torch.sigmoid(chosen_rewards - rejected_rewards - margin).mean()


@wrong("calc_pairwise_loss", "no gradient")
def pairwise_loss_detached(chosen_rewards, rejected_rewards, margin=None):
    margin = 0.0 if margin is None else margin
    return F.softplus(rejected_rewards - chosen_rewards + margin).mean().detach()


# ---------------------------------------------------------------- get_last_token_index


@wrong("get_last_token_index", "not at the last column")
def always_last_column(attention_mask):
    return torch.full((attention_mask.shape[0],), attention_mask.shape[1] - 1)


@wrong("get_last_token_index", "with left padding it points into the padding")
def length_minus_one(attention_mask):
    return attention_mask.sum(-1) - 1


@wrong("get_last_token_index", "the first padding position")
def length_not_minus_one(attention_mask):
    return attention_mask.sum(-1)


@wrong("get_last_token_index", "first real token")
def first_real_token(attention_mask):
    return attention_mask.argmax(-1)


@wrong("get_last_token_index", "return integers")
def float_positions(attention_mask):
    positions = torch.arange(attention_mask.shape[1], dtype=torch.float32)
    return (attention_mask * positions).amax(-1)
