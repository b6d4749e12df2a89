"""Direct Preference Optimisation: the reward model and PPO replaced by one loss on pairs.

The pure math of DPO, beside the reward model (it reads the same `(prompt, chosen, rejected)`
pairs) and knowing only torch. DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model") solves the KL-regularised RLHF objective in closed
form, pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), so that a policy defines an implicit
reward r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) + beta log Z(x). Put into the
Bradley-Terry likelihood of the preferences, Z(x) cancels and the reward model's pairwise loss
becomes a loss on the policy itself. Variants, selected by `loss_type` and `label_smoothing`:

    "sigmoid"         DPO: -log sigmoid(beta * h)
    label_smoothing   conservative DPO (Mitchell 2023): labels flipped with probability eps
    "ipo"             IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand
                      Learning from Human Preferences"): (h - 1 / (2 beta))^2

where h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), each log pi the
*sum* of the response's token log-probs (`get_sequence_logprobs`). The loss is minimised.
"""

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from eindex import eindex
from jaxtyping import Float, Int
from torch import Tensor

LossType = Literal["sigmoid", "ipo"]  # (calc_dpo_loss takes a str, to explain a wrong one)


def get_sequence_logprobs(
    logits: Float[Tensor, "batch seq d_vocab"],
    tokens: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"],
    response_mask: Int[Tensor, "batch seq"],
) -> Float[Tensor, " batch"]:
    """log pi(response | prompt): the sum of the response tokens' log-probs, in float32.

    Position convention: logits[:, s] predicts tokens[:, s+1], so token s (s >= 1) is scored by
    the logits one position before it. A token counts when both masks are 1 there: the response
    mask marks the response's tokens (prompt 0), the attention mask the real ones (padding 0),
    so left or right padding both work. Token 0 has no logits before it and may not count.
    """
    assert not response_mask[:, 0].any(), (
        "response_mask marks token 0, which nothing predicts: every response needs a prompt (or "
        "a BOS token) before it.")
    counted = (response_mask * attention_mask)[:, 1:].bool()
    # Padding positions may hold NaN logits (a left-padded row's pads attend to nothing), so the
    # masked log-probs are replaced, not multiplied by 0 (NaN * 0 is NaN).
    logprobs = eindex(logits.float().log_softmax(dim=-1), tokens, "b s [b s+1]")  # seq - 1 columns
    return torch.where(counted, logprobs, 0.0).sum(dim=-1)


class DPOLoss(NamedTuple):
    """What `calc_dpo_loss` returns (unpacks as `loss, chosen_rewards, rejected_rewards`)."""

    loss: Float[Tensor, ""]
    """The mean loss over the pairs (minimised)."""
    chosen_rewards: Float[Tensor, " batch"]
    """Implicit rewards beta * (log pi - log pi_ref) of the chosen responses (detached)."""
    rejected_rewards: Float[Tensor, " batch"]
    """The same for the rejected responses (detached)."""


def calc_dpo_loss(
    policy_chosen_logps: Float[Tensor, " batch"],
    policy_rejected_logps: Float[Tensor, " batch"],
    ref_chosen_logps: Float[Tensor, " batch"],
    ref_rejected_logps: Float[Tensor, " batch"],
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLoss:
    """The DPO loss (mean over pairs, minimised) and the implicit rewards of each response.

    Args:
        policy_chosen_logps: summed log-probs of the chosen responses under the policy (with
            gradient); the other three likewise (the reference's without gradient).
        beta: strength of the KL regularisation; the implicit reward's scale.
        loss_type: "sigmoid" (DPO) or "ipo".
        label_smoothing: eps in [0, 0.5), the assumed share of flipped labels (conservative DPO;
            "sigmoid" only).
    """
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}.")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}.")
    if label_smoothing and loss_type == "ipo":
        raise ValueError("label_smoothing applies to the sigmoid loss; IPO has no labels to flip.")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    return DPOLoss(losses.mean(), beta * chosen_logratios.detach(),
                   beta * rejected_logratios.detach())


def calc_preference_metrics(
    chosen_rewards: Float[Tensor, " batch"], rejected_rewards: Float[Tensor, " batch"]
) -> dict[str, float]:
    """Accuracy (share of pairs whose chosen reward is the higher), mean margin and the mean
    implicit reward of each side. A tie counts as wrong."""
    return {"accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_reward": chosen_rewards.mean().item(),
            "rejected_reward": rejected_rewards.mean().item()}
