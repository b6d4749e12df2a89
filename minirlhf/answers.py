"""Answers that end: their lengths, and the loss details that only matter once lengths differ.

Between the rollout and the replay memory. With `RLHFArgs.stop_at_eos` an answer ends at the
model's EOS token (included in the answer) or at a stop string; the tokens after it are padding.
`response_mask` is 1 for an answer's real tokens and 0 for padding (None: every answer has
gen_len tokens). Each option of the 2026 recipes is one small function here (docs/answers.md):

- a truncated answer (one that reached gen_len without ending) is masked out of the loss (DAPO,
  Yu et al. 2025: "overlong filtering"), or penalised softly over the last tokens before the
  limit (DAPO's "overlong reward shaping", `calc_overlong_penalty`);
- a group whose samples all got the same reward teaches nothing (GRPO's advantages are 0 there);
  it may be left out of the loss (DAPO's dynamic sampling drops it; `get_zero_spread_rows`), which
  changes the token-mean's denominator, and is counted either way.

How a per-token loss is averaged over answers of different lengths is `losses.aggregate`.
"""

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor


def get_lengths(
    response_mask: Int[Tensor, "batch gen_len"] | None, batch: int, gen_len: int
) -> Int[Tensor, " batch"]:
    """Each answer's number of real tokens (gen_len for all without a mask)."""
    if response_mask is None:
        return torch.full((batch,), gen_len, dtype=torch.long)
    return response_mask.sum(dim=-1).long()


def calc_overlong_penalty(
    lengths: Int[Tensor, " batch"], ended: Bool[Tensor, " batch"], gen_len: int, buffer: int
) -> Float[Tensor, " batch"]:
    """DAPO's soft overlong penalty (Yu et al. 2025, eq. 13), added to the reward: 0 up to
    gen_len - buffer tokens, then falling linearly to -1 at gen_len; -1 for an answer that never
    ended (truncated)."""
    over = (lengths.float() - (gen_len - buffer)).clamp(min=0)
    penalty = -over / buffer
    return torch.where(ended, penalty, torch.full_like(penalty, -1.0))


def get_zero_spread_rows(
    rewards: Float[Tensor, " batch"], group_size: int
) -> Bool[Tensor, " batch"]:
    """True for every sample of a group whose samples all got the same reward (group g is rows
    g * group_size .. (g + 1) * group_size - 1)."""
    groups = rearrange(rewards, "(group size) -> group size", size=group_size)
    flat = (groups == groups[:, :1]).all(dim=1)
    return flat.repeat_interleave(group_size)


def get_loss_mask(
    response_mask: Int[Tensor, "batch gen_len"] | None,
    left_out: Bool[Tensor, " batch"],
    gen_len: int,
) -> Int[Tensor, "batch gen_len"] | None:
    """The tokens the loss reads: the real ones (`response_mask`) of every answer not `left_out`
    (truncated, or of a group with no spread, as the options say). None when that is every token
    of every answer, so fixed-length training runs exactly as it always did."""
    if response_mask is None and not bool(left_out.any()):
        return None
    mask = torch.ones(len(left_out), gen_len, dtype=torch.long, device=left_out.device)
    if response_mask is not None:
        mask = response_mask.long()
    return mask * (~left_out).long()[:, None]


def apply_answer_options(
    rewards: Float[Tensor, " batch"],
    response_mask: Int[Tensor, "batch gen_len"] | None,
    ended: Bool[Tensor, " batch"] | None,
    gen_len: int,
    truncation: str = "keep",
    overlong_buffer: int = 4,
    drop_zero_spread: bool = False,
    group_size: int = 1,
) -> tuple[Float[Tensor, " batch"], Int[Tensor, "batch gen_len"] | None]:
    """The rewards and the loss mask once the options of `RLHFArgs` are applied: DAPO's soft
    overlong penalty added to the rewards (truncation "penalty"); truncated answers (truncation
    "mask") and groups with no reward spread (`drop_zero_spread`) left out of the loss."""
    left_out = torch.zeros(len(rewards), dtype=torch.bool, device=rewards.device)
    if response_mask is not None and ended is not None:  # answers can end
        lengths = get_lengths(response_mask, len(rewards), gen_len)
        if truncation == "penalty":
            rewards = rewards + calc_overlong_penalty(lengths, ended, gen_len, overlong_buffer)
        if truncation == "mask":
            left_out |= ~ended
    if drop_zero_spread:
        left_out |= get_zero_spread_rows(rewards, group_size)
    return rewards, get_loss_mask(response_mask, left_out, gen_len)
