"""Tied embeddings: one matrix for the input embedding and the unembedding, as the model has it.

SmolLM2 (and GPT-2 as Hugging Face ships it) reads tokens in and writes logits out with the same
matrix (`tie_word_embeddings`). TransformerLens loads every model with two: `embed.W_E`
[d_vocab, d_model] and `unembed.W_U` [d_model, d_vocab], equal after loading (W_U = W_E.T) but
separate parameters. Trained that way, a policy is no longer the architecture it came from: RL
moves the two copies apart, and the trainer keeps the matrix four extra times (the parameter,
its gradient, AdamW's two moments; 113 MB each for SmolLM2's 49,152 x 576) plus once more in the
reference model.

`tie_unembedding` puts the tie back: the unembedding reads W_U as a view of the embedding's W_E,
so there is one parameter, both uses of it add to its gradient (the gradient a tied Hugging Face
model gets), and AdamW moves it once. The hooks and the bias stay the unembedding's own.
"""

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.components import Embed, Unembed


class TiedUnembed(Unembed):
    """An unembedding whose W_U is the embedding's W_E, transposed (a view: no copy).

    It holds no W_U of its own, so `state_dict` has no "unembed.W_U"; loading a state dict that
    has one (an untied checkpoint) checks it equals W_E.T and refuses otherwise, rather than
    dropping a trained unembedding without a word."""

    def __init__(self, unembed: Unembed, embed: Embed):
        nn.Module.__init__(self)
        self.cfg = unembed.cfg
        self.b_U = unembed.b_U
        # The same hook points, so `model.hook_dict` (built by the model's setup) still holds them.
        self.hook_in, self.hook_out = unembed.hook_in, unembed.hook_out
        # In a tuple, not an attribute: a module attribute would be a second copy of the
        # embedding in `state_dict` and `modules()`. `copy.deepcopy` keeps the tie (its memo).
        self._tied_to = (embed,)

    @property
    def W_U(self) -> Tensor:
        return self._tied_to[0].W_E.T

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        W_U = state_dict.pop(prefix + "W_U", None)
        if W_U is not None and not torch.equal(W_U.to(self.W_U.dtype), self.W_U.detach()):
            error_msgs.append(
                f"{prefix}W_U differs from the embedding's W_E.T, but this model ties them (its "
                "config's tie_word_embeddings): the weights were trained with a separate "
                "unembedding, as minirlhf trained such models before 2026-12-07. `minirlhf "
                "sample`, `eval` and `export` read such runs (`untie_if_saved_apart`); resuming "
                "one needs the minirlhf version that started it.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def tie_unembedding(model: HookedTransformer) -> HookedTransformer:
    """Make `model.unembed` read its W_U from `model.embed.W_E` (which must equal W_U.T: the
    model was loaded from a checkpoint whose embeddings are tied), in place."""
    if isinstance(model.unembed, TiedUnembed):
        return model
    W_E, W_U = model.embed.W_E, model.unembed.W_U
    if W_U.shape != W_E.T.shape or not torch.equal(W_U.detach(), W_E.detach().T):
        raise ValueError("tie_unembedding needs W_U equal to W_E.T (a checkpoint with tied "
                         "embeddings, as loaded); this model's differ.")
    model.unembed = TiedUnembed(model.unembed, model.embed)
    return model


def untie_unembedding(model: HookedTransformer) -> HookedTransformer:
    """The reverse: give the unembedding its own W_U parameter again (a copy of W_E.T), in place."""
    if not isinstance(model.unembed, TiedUnembed):
        return model
    tied = model.unembed
    unembed = Unembed(tied.cfg)
    unembed.W_U = nn.Parameter(tied.W_U.detach().clone(),
                               requires_grad=model.embed.W_E.requires_grad)
    unembed.b_U, unembed.hook_in, unembed.hook_out = tied.b_U, tied.hook_in, tied.hook_out
    model.unembed = unembed.to(tied.W_U.device)
    return model


def is_tied(model: HookedTransformer) -> bool:
    return isinstance(model.unembed, TiedUnembed)


def untie_if_saved_apart(model: HookedTransformer, state: dict[str, Tensor],
                         prefix: str = "") -> HookedTransformer:
    """Untie `model` when `state` (its weights as saved, TransformerLens names after `prefix`)
    holds an unembedding that differs from its embedding: a run trained before the tie, read
    back."""
    W_U = state.get(f"{prefix}unembed.W_U")
    if W_U is not None and is_tied(model):
        W_E = state.get(f"{prefix}embed.W_E", model.embed.W_E.detach())
        if not torch.equal(W_U.to(W_E), W_E.T):
            untie_unembedding(model)
    return model
