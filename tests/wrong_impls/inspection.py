"""Wrong pieces of notebook 11 (what did RL change?), written as a learner might: the change not
made absolute, the KL the wrong way round, the lens without its norm, steering at the wrong hook,
with the wrong sign, or left on the model."""

import torch

from . import wrong


@wrong("calc_changed_share", "only the entries that rose are counted")
def changed_share_without_abs(before, after, threshold):
    return ((after - before) > threshold).float().mean()


@wrong("calc_changed_share", "not their change")
def changed_share_of_the_weights(before, after, threshold):
    return (after.abs() > threshold).float().mean()


@wrong("calc_per_token_kl", "the KL is the other way round")
def kl_reversed(logits, ref_logits):
    return torch.nn.functional.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1),
                                      log_target=True, reduction="none").sum(-1)


@wrong("calc_per_token_kl", "raw logits were used as log-probabilities")
def kl_of_raw_logits(logits, ref_logits):
    return (logits.softmax(-1) * (logits - ref_logits)).sum(-1)


@wrong("apply_logit_lens", "the final norm is skipped")
def lens_without_the_norm(residual, W_U, ln_w, ln_b):
    return residual @ W_U


@wrong("apply_logit_lens", "the vector is not centred")
def lens_with_rms_norm(residual, W_U, ln_w, ln_b):
    rms = (residual.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    return (residual / rms * ln_w + ln_b) @ W_U


@wrong("get_steered_logits", "before block `layer` (hook_resid_pre)")
def steer_before_the_block(model, tokens, layer, direction, scale):
    def add(residual, hook):
        return residual + scale * direction

    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", add)])


@wrong("get_steered_logits", "the direction was subtracted")
def steer_backwards(model, tokens, layer, direction, scale):
    def subtract(residual, hook):
        return residual - scale * direction

    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", subtract)])


@wrong("get_steered_logits", "the hook was left on the model")
def steer_and_leave_the_hook(model, tokens, layer, direction, scale):
    def add(residual, hook):
        return residual + scale * direction

    model.add_hook(f"blocks.{layer}.hook_resid_post", add)
    return model(tokens)
