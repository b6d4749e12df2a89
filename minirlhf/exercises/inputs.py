"""The inputs the checks feed the learner's code: seeded tensors, tiny models, one thread."""

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.runtime.loading import PRINTABLE_VOCAB, load_tiny_model


def single_threaded(check: Callable[..., None]) -> Callable[..., None]:
    """Run a check on one CPU thread: tiny models run several times faster without the hand-offs
    between threads (far more so on a busy machine). The caller's thread count is restored."""

    @functools.wraps(check)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return check(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, scale: float = 1.0, grad: bool = False) -> Tensor:
    """Seeded standard-normal floats (optionally a leaf that requires grad)."""
    return (torch.randn(*shape, generator=seeded(seed)) * scale).requires_grad_(grad)


def load_char_model(
    n_layers: int = 1, d_model: int = 32, n_heads: int = 2, seed: int = 0
) -> HookedTransformer:
    """A tiny random model whose vocabulary is the 94 printable one-character GPT-2 tokens
    (ids 0..93 are '!'..'~'; '.' is 13).

    It keeps GPT-2's tokenizer, so prompts must be made of characters that tokenize to single
    in-vocabulary tokens (such as "a"), with prepend_bos=False (BOS, 50256, is out of its
    vocabulary). Its softmaxes are over 94 tokens instead of 50,257, so it trains in a fraction of
    a second per phase on a CPU and a check can afford thousands of samples.
    """
    return load_tiny_model(n_layers, d_model, n_heads, n_ctx=64, seed=seed, d_vocab=PRINTABLE_VOCAB)

