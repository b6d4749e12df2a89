"""Wrong sequence log-probs and DPO losses (notebook 8) that a check recognises by what it
observes, not by replaying a catalogued mistake."""

import torch
import torch.nn.functional as F

from . import wrong


@wrong("get_sequence_logprobs", "changed its input 'tokens' in place")
def sequence_logprobs_editing_the_tokens(logits, tokens, attention_mask, response_mask):
    tokens[attention_mask == 0] = 0  # "clean" the padding ids, in the caller's tensor
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    counted = (attention_mask * response_mask)[:, 1:].bool()
    return torch.where(counted, logprobs, 0.0).sum(-1)


@wrong("calc_dpo_loss", "no gradient")
def dpo_loss_detached(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps, beta, loss_type="sigmoid"):
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * h.detach()).mean()


@wrong("calc_dpo_loss", "got a tuple")
def dpo_loss_with_the_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                              ref_rejected_logps, beta, loss_type="sigmoid"):
    """The library's return value (loss and implicit rewards), where the exercise wants the loss."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()
