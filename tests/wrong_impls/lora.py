"""Wrong LoRA adapters, attachments and references (notebook 9)."""

import torch
import torch.nn.functional as F
from torch import nn

from minirlhf.runtime.lora import get_adapters

from . import wrong

# ---------------------------------------------------------------- the adapter module


class _Lora(nn.Module):
    """A correct adapter; the wrong ones below change one thing."""

    def __init__(self, d_in, d_out, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, d_in) / d_in**0.5)
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def delta(self):
        return self.scale * self.B @ self.A


@wrong("Lora", "B must start at zero")
class RandomB(_Lora):
    def __init__(self, d_in, d_out, rank, alpha):
        super().__init__(d_in, d_out, rank, alpha)
        nn.init.normal_(self.B.data)


@wrong("Lora", "with both zero every gradient is zero")
class BothZero(_Lora):
    def __init__(self, d_in, d_out, rank, alpha):
        super().__init__(d_in, d_out, rank, alpha)
        nn.init.zeros_(self.A.data)


@wrong("Lora", "the scale alpha / rank is missing")
class NoScale(_Lora):
    def forward(self, x):
        return F.linear(F.linear(x, self.A), self.B)


@wrong("Lora", "the scale is alpha / rank, not alpha")
class ScaleAlpha(_Lora):
    def forward(self, x):
        return F.linear(F.linear(x, self.A), self.B) * self.scale * self.A.shape[0]


@wrong("Lora", "the scale is upside down")
class ScaleUpsideDown(_Lora):
    def forward(self, x):
        return F.linear(F.linear(x, self.A), self.B) / self.scale


@wrong("Lora", "alpha / rank is applied twice")
class ScaleTwice(_Lora):
    """Once named "alpha instead of alpha / rank": with alpha 4 and rank 2, (4 / 2)^2 = 4."""

    def forward(self, x):
        return F.linear(F.linear(x, self.A), self.B) * self.scale * self.scale


@wrong("Lora", "the scale alpha / rank is a fixed number")
class TrainableScale(_Lora):
    def __init__(self, d_in, d_out, rank, alpha):
        super().__init__(d_in, d_out, rank, alpha)
        self.scale = nn.Parameter(torch.tensor(alpha / rank))


@wrong("Lora", "the scale alpha / rank is missing")
class DeltaWithoutScale(_Lora):
    def delta(self):
        return self.B @ self.A


@wrong("Lora", "the layout of W")
class DeltaTransposed(_Lora):
    def delta(self):
        return (self.scale * self.B @ self.A).T


@wrong("Lora", "wrap the tensor in nn.Parameter")
class PlainTensors(_Lora):
    def __init__(self, d_in, d_out, rank, alpha):
        super().__init__(d_in, d_out, rank, alpha)
        A, B = self.A.detach(), self.B.detach()
        del self.A, self.B
        self.A, self.B = A, B


@wrong("Lora", "A is (rank, d_in) and B is (d_out, rank)")
class ShapesTransposed(_Lora):
    def __init__(self, d_in, d_out, rank, alpha):
        super().__init__(d_in, d_out, rank, alpha)
        self.A = nn.Parameter(self.A.detach().T.clone())
        self.B = nn.Parameter(self.B.detach().T.clone())


@wrong("Lora", "has no gradient")
class ForwardWithoutGradient(_Lora):
    def forward(self, x):
        with torch.no_grad():
            return super().forward(x)


# ---------------------------------------------------------------- attaching it


def _attach(model, layer, rank, alpha, *, lora=_Lora, freeze_first=True, register=True,
            read="post", add=True, permanent=True, hook_layer=None, detach=False):
    """attach_lora, right with the defaults; each keyword makes one mistake."""
    if freeze_first:
        for param in model.parameters():
            param.requires_grad_(False)
    adapter = lora(model.cfg.d_mlp, model.cfg.d_model, rank, alpha)
    if register:
        model.lora_out = adapter
    if not freeze_first:
        for param in model.parameters():
            param.requires_grad_(False)
    inputs = {}

    def capture(activation, hook):
        inputs["x"] = activation

    def add_term(activation, hook):
        term = adapter(inputs["x"])
        term = term.detach() if detach else term
        return activation + term if add else term

    block = f"blocks.{layer if hook_layer is None else hook_layer}"
    model.add_hook(f"{block}.mlp.hook_{read}", capture, is_permanent=permanent)
    model.add_hook(f"{block}.hook_mlp_out", add_term, is_permanent=permanent)
    return adapter


@wrong("attach_lora", "the base weights are left trainable")
def base_left_trainable(model, layer, rank, alpha):
    adapter = _attach(model, layer, rank, alpha)
    for param in model.parameters():
        param.requires_grad_(True)
    return adapter


@wrong("attach_lora", "the adapter is frozen too")
def frozen_after_attaching(model, layer, rank, alpha):
    return _attach(model, layer, rank, alpha, freeze_first=False)


@wrong("attach_lora", "make the adapter a submodule of the model")
def adapter_not_registered(model, layer, rank, alpha):
    return _attach(model, layer, rank, alpha, register=False)


@wrong("attach_lora", "W_out maps the MLP's hidden activation (d_mlp)")
def dimensions_swapped(model, layer, rank, alpha):
    return _attach(model, layer, rank, alpha,
                   lora=lambda d_in, d_out, rank, alpha: _Lora(d_out, d_in, rank, alpha))


@wrong("attach_lora", "B is not zero at the start")
def random_b(model, layer, rank, alpha):
    return _attach(model, layer, rank, alpha, lora=RandomB)


@wrong("attach_lora", "return activation + term")
def term_replaces_the_output(model, layer, rank, alpha):
    return _attach(model, layer, rank, alpha, add=False)


@wrong("attach_lora", "the adapter changes nothing")
def hook_returns_none(model, layer, rank, alpha):
    adapter = _attach(model, layer, rank, alpha)
    model.reset_hooks(including_permanent=True)
    model.add_hook(f"blocks.{layer}.hook_mlp_out", lambda activation, hook: None,
                   is_permanent=True)
    return adapter


@wrong("attach_lora", "the adapter sits in block 0")
def always_block_zero(model, layer, rank, alpha):
    return _attach(model, layer, rank, alpha, hook_layer=0)


@wrong("attach_lora", "the adapter read mlp.hook_pre")
def reads_hook_pre(model, layer, rank, alpha):
    return _attach(model, layer, rank, alpha, read="pre")


@wrong("attach_lora", "the scale alpha / rank is missing")
def lora_without_scale(model, layer, rank, alpha):
    return _attach(model, layer, rank, alpha, lora=NoScale)


@wrong("attach_lora", "your hooks are not permanent")
def hooks_not_permanent(model, layer, rank, alpha):
    return _attach(model, layer, rank, alpha, permanent=False)


@wrong("attach_lora", "did the hook detach the adapter's term")
def term_detached(model, layer, rank, alpha):
    return _attach(model, layer, rank, alpha, detach=True)


# ---------------------------------------------------------------- the reference


@wrong("get_ref_logits", "the adapters were left on")
def adapters_left_on(model, tokens):
    with torch.no_grad():
        return model(tokens)


@wrong("get_ref_logits", "the adapters are left off")
def adapters_left_off(model, tokens):
    get_adapters(model).enabled = False
    with torch.no_grad():
        return model(tokens)


@wrong("get_ref_logits", "in a `finally:` block")
def not_restored_on_error(model, tokens):
    adapters = get_adapters(model)
    adapters.enabled = False
    with torch.no_grad():
        logits = model(tokens)
    adapters.enabled = True
    return logits

