"""Texts to token ids: tokenise, add BOS (and an end token), pad to one length with a mask.

Used by the sampler (prompts, left-padded so every prompt ends at the same position) and by the
reward model (whole texts, right-padded, with `<|endoftext|>` appended).
"""

from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer


def tokenize_texts(
    model: HookedTransformer,
    texts: list[str],
    prepend_bos: bool = True,
    end_token_id: int | None = None,
    padding_side: Literal["left", "right"] = "right",
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Token ids of the texts padded to a common length, and their attention mask (1 for real
    tokens, 0 for padding), on the model's device.

    Args:
        prepend_bos: put the tokenizer's BOS token first.
        end_token_id: appended after each text (None: nothing appended).
        padding_side: "left" (prompts to continue) or "right" (texts to score).
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("The model has no tokenizer: give it one to turn texts into tokens.")
    rows = get_token_rows(tokenizer, texts, prepend_bos, end_token_id)
    seq = max(len(row) for row in rows)
    if seq > model.cfg.n_ctx:
        raise ValueError(f"A text has {seq} tokens; the model reads at most {model.cfg.n_ctx}.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), seq), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), seq), dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(0, len(row)) if padding_side == "right" else slice(seq - len(row), seq)
        ids[i, where], mask[i, where] = torch.tensor(row), 1
    largest = int(ids[mask.bool()].max())
    if largest >= model.cfg.d_vocab:
        raise ValueError(f"Token id {largest} is outside the model's {model.cfg.d_vocab}-"
                         "token vocabulary: the tokenizer does not fit the model.")
    return ids.to(model.cfg.device), mask.to(model.cfg.device)


def get_token_rows(tokenizer, texts: list[str], prepend_bos: bool,
                   end_token_id: int | None) -> list[list[int]]:
    """Each text's token ids, unpadded: BOS first and `end_token_id` last when asked."""
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("This tokenizer has no BOS token: use prepend_bos=False.")
        rows = [[tokenizer.bos_token_id, *row] for row in rows]
    if end_token_id is not None:
        rows = [[*row, end_token_id] for row in rows]
    if min(len(row) for row in rows) == 0:
        raise ValueError("A text is empty and prepend_bos is False: give every row a token.")
    return rows
