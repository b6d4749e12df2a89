"""Shared fixtures: tiny random models, so no test needs the network or a GPU.

Two kinds of model:

- `tiny_model`: `load_tiny_model`'s GPT-2-shaped random model with GPT-2's full 50,257-token
  vocabulary (what learners and the CLI get with `--model tiny`).
- `make_printable_model(...)`: the same shape, but its vocabulary is only GPT-2's first 94 tokens,
  the printable ASCII characters '!'..'~' (one character each; '.' is id 13). Its softmax is 500x
  smaller, so sampling and training on it take milliseconds, and a random policy emits a period
  once every 94 tokens instead of once every 50,257, so "count the periods" has a signal to learn.

Session-scoped models are shared: a test that changes weights builds its own model.
"""

from collections.abc import Callable

import pytest
import torch
from transformer_lens import HookedTransformer

from minirlhf.exercises.core import load_char_model
from minirlhf.runtime.loading import load_tiny_model

build_printable_model = load_char_model
"""A tiny random GPT-2-shaped model over the 94 printable single-character tokens (the
exercises' `load_char_model`). Prompts for it must be made of tokens below 94 (e.g. "A", "x?"),
with prepend_bos=False: GPT-2's BOS (and pad) token 50256 is outside its vocabulary."""


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they lose a lot:
    with 2 threads on 2 shared cores the end-to-end test took 22 s instead of 3 s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model() -> HookedTransformer:
    """A 2-layer, d_model 32 random model with GPT-2's full vocabulary. Do not modify it."""
    return load_tiny_model(n_layers=2, d_model=32, n_heads=2)


@pytest.fixture(scope="session")
def printable_model() -> HookedTransformer:
    """A shared 94-token model (see `build_printable_model`). Do not modify it."""
    return build_printable_model()


@pytest.fixture(scope="session")
def make_printable_model() -> Callable[..., HookedTransformer]:
    """A factory for fresh 94-token models, for tests that change or train the weights."""
    return build_printable_model
