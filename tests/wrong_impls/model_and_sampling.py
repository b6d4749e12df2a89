"""Wrong value heads and samplers (notebook 1)."""

import torch
from torch import nn

from . import wrong

# ---------------------------------------------------------------- value heads


class _ValueHeadModel(nn.Module):
    """A correct value head; the wrong ones below change one thing."""

    hook = "ln_final.hook_normalized"

    def __init__(self, base_model):
        super().__init__()
        self.base_model = base_model
        d_model = base_model.cfg.d_model
        self.value_head = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.ReLU(),
                                        nn.Linear(4 * d_model, 1))

    def head_output(self, normalized):
        return self.value_head(normalized).squeeze(-1)

    def forward(self, tokens):
        values = None

        def store(normalized, hook):
            nonlocal values
            values = self.head_output(normalized)

        logits = self.base_model.run_with_hooks(tokens, fwd_hooks=[(self.hook, store)])
        return logits, values


@wrong("TransformerWithValueHead", "call super().__init__() first")
class AssignsBeforeSuper(_ValueHeadModel):
    def __init__(self, base_model):
        self.value_head = nn.Linear(base_model.cfg.d_model, 1)
        super().__init__(base_model)


@wrong("TransformerWithValueHead", "One linear layer can only fit values that are linear")
class OneLayerHead(_ValueHeadModel):
    """Passes every test of the outputs and gradients; the notebook prescribes an MLP."""

    def __init__(self, base_model):
        super().__init__(base_model)
        self.value_head = nn.Linear(base_model.cfg.d_model, 1)


@wrong("TransformerWithValueHead", "without a nonlinearity two linear layers are one")
class HeadWithoutReLU(_ValueHeadModel):
    def __init__(self, base_model):
        super().__init__(base_model)
        d_model = base_model.cfg.d_model
        self.value_head = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, 1))


@wrong("TransformerWithValueHead", "no `value_head` attribute")
class HeadBuiltInForward(_ValueHeadModel):
    def __init__(self, base_model):
        nn.Module.__init__(self)
        self.base_model = base_model

    def head_output(self, normalized):
        return nn.Linear(normalized.shape[-1], 1)(normalized).squeeze(-1)


@wrong("TransformerWithValueHead", "the value head is not registered")
class HeadNotRegistered(_ValueHeadModel):
    def __init__(self, base_model):
        super().__init__(base_model)
        head = self._modules.pop("value_head")  # as if kept outside nn.Module's bookkeeping
        object.__setattr__(self, "value_head", head)


@wrong("TransformerWithValueHead", "you returned log-probs")
class ReturnsLogprobs(_ValueHeadModel):
    def forward(self, tokens):
        logits, values = super().forward(tokens)
        return logits.log_softmax(-1), values


@wrong("TransformerWithValueHead", "your hook changed the residual stream")
class HookReturnsTensor(_ValueHeadModel):
    def forward(self, tokens):
        values = None

        def store(normalized, hook):
            nonlocal values
            values = self.value_head(normalized)
            return normalized + values  # replaces the activation the unembedding reads

        logits = self.base_model.run_with_hooks(tokens, fwd_hooks=[(self.hook, store)])
        return logits, values.squeeze(-1)


@wrong("TransformerWithValueHead", "did you forget .squeeze(-1)")
class NoSqueeze(_ValueHeadModel):
    def head_output(self, normalized):
        return self.value_head(normalized)


@wrong("TransformerWithValueHead", "before the final layernorm")
class HooksBeforeLayerNorm(_ValueHeadModel):
    def __init__(self, base_model):
        super().__init__(base_model)
        self.hook = f"blocks.{base_model.cfg.n_layers - 1}.hook_resid_post"


@wrong("TransformerWithValueHead", "torch.no_grad() or .detach()")
class ValuesWithoutGradient(_ValueHeadModel):
    def head_output(self, normalized):
        with torch.no_grad():
            return self.value_head(normalized).squeeze(-1)


@wrong("TransformerWithValueHead", "the trunk is shared")
class DetachedTrunk(_ValueHeadModel):
    def head_output(self, normalized):
        return self.value_head(normalized.detach()).squeeze(-1)


@wrong("TransformerWithValueHead", "did you forget `nonlocal values`")
class HookWithoutNonlocal(_ValueHeadModel):
    def forward(self, tokens):
        values = None

        def store(normalized, hook):
            values = self.head_output(normalized)  # noqa: F841 - the mistake: a new local
        logits = self.base_model.run_with_hooks(tokens, fwd_hooks=[(self.hook, store)])
        return logits, values


@wrong("TransformerWithValueHead", "(in general, `nonlocal name`)")
class ValuesOnlyInsideTheHook(_ValueHeadModel):
    def forward(self, tokens):
        def store(normalized, hook):
            values = self.head_output(normalized)  # noqa: F841 - never seen outside the hook
        logits = self.base_model.run_with_hooks(tokens, fwd_hooks=[(self.hook, store)])
        return logits, values  # noqa: F821 - the NameError is the point


# ---------------------------------------------------------------- samplers


def _sampler(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos, *,
             use_bos=True, repeat=True, keep_prompt=True, use_top_k=True, temperature_mode="/",
             one_row=False, decode_all=True, greedy=False):
    """A plain sampling loop; each keyword switches on one mistake."""
    tokens = model.to_tokens(prompt, prepend_bos=prepend_bos) if use_bos else model.to_tokens(
        prompt)
    prompt_len = tokens.shape[1]
    if repeat:
        tokens = tokens.repeat(1 if one_row else batch_size, 1)
    for _ in range(gen_len):
        with torch.no_grad():
            logits = model(tokens)[:, -1]
        if temperature_mode == "/":
            logits = logits / temperature
        elif temperature_mode == "*":
            logits = logits * temperature
        if top_k is not None and use_top_k:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if greedy:
            next_token = logits.argmax(-1, keepdim=True)
        else:
            next_token = torch.multinomial(logits.softmax(-1), 1)
        tokens = torch.cat([tokens, next_token], dim=1)
    if one_row:
        tokens = tokens.repeat(batch_size, 1)
    texts = model.to_string(tokens if decode_all else tokens[:, prompt_len:])
    return (tokens if keep_prompt else tokens[:, prompt_len:]), texts


@wrong("get_samples", "did you pass prepend_bos to model.to_tokens")
def sampler_ignores_prepend_bos(model, prompt, batch_size, gen_len, temperature, top_k,
                                prepend_bos):
    return _sampler(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos,
                    use_bos=False)


@wrong("get_samples", "should start with the prompt's tokens")
def sampler_returns_only_new_tokens(model, prompt, batch_size, gen_len, temperature, top_k,
                                    prepend_bos):
    return _sampler(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos,
                    keep_prompt=False)


@wrong("get_samples", "Repeat the prompt batch_size times")
def sampler_without_batch(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos):
    return _sampler(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos,
                    repeat=False)


@wrong("get_samples", "did you pass top_k on")
def sampler_ignores_top_k(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos):
    return _sampler(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos,
                    use_top_k=False)


@wrong("get_samples", "the temperature seems to be ignored")
def sampler_ignores_temperature(model, prompt, batch_size, gen_len, temperature, top_k,
                                prepend_bos):
    return _sampler(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos,
                    temperature_mode=None)


@wrong("get_samples", "multiply the logits by the temperature instead of dividing")
def sampler_multiplies_temperature(model, prompt, batch_size, gen_len, temperature, top_k,
                                   prepend_bos):
    return _sampler(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos,
                    temperature_mode="*")


@wrong("get_samples", "did you sample one row and repeat it")
def sampler_repeats_one_row(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos):
    return _sampler(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos,
                    one_row=True)


@wrong("get_samples", "decode the whole row")
def sampler_decodes_only_new_tokens(model, prompt, batch_size, gen_len, temperature, top_k,
                                    prepend_bos):
    return _sampler(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos,
                    decode_all=False)


@wrong("get_samples", "you took the most likely token (argmax)")
def sampler_greedy(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos):
    return _sampler(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos,
                    greedy=True)


@wrong("get_samples", "take the logits at the last position only")
def sampler_all_positions(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos):
    tokens = model.to_tokens(prompt, prepend_bos=prepend_bos).repeat(batch_size, 1)
    for _ in range(gen_len):
        probs = (model(tokens) / temperature).softmax(-1)  # every position, not just the last
        tokens = torch.cat([tokens, torch.multinomial(probs, 1)], dim=1)
    return tokens, model.to_string(tokens)
