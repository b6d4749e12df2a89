"""Tests for minirlhf.models on a tiny random model.

Oracles: the value head is recomputed by hand (`torch.nn.functional` on the head's weights) from
the `ln_final.hook_normalized` activations that `run_with_cache` records, and the logits are the
plain HookedTransformer's. Each check also rejects a plausible wrong model, written out here.
"""

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer

from minirlhf.models import ReferenceModel, TransformerWithValueHead


def make_batch(model: HookedTransformer) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 6 random tokens; the first two left-padded (mask 0 on their first tokens)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 6), generator=generator)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, :1] = 0
    return tokens, mask


def value_head_oracle(policy: TransformerWithValueHead, tokens, mask) -> torch.Tensor:
    """The MLP applied by hand to the final-layernorm activations that run_with_cache records."""
    _, cache = policy.base_model.run_with_cache(tokens, attention_mask=mask)
    normalized = cache["ln_final.hook_normalized"]
    first, _, second = policy.value_head
    hidden = F.relu(F.linear(normalized, first.weight, first.bias))
    return F.linear(hidden, second.weight, second.bias).squeeze(-1)


def forward_mismatch(forward: Callable, policy: TransformerWithValueHead) -> str | None:
    """None if forward(policy, tokens, mask) -> (logits, values) equals the oracles, padded and
    not; else the first difference."""
    tokens, mask = make_batch(policy.base_model)
    for attention_mask in [None, mask]:
        logits, values = forward(policy, tokens, attention_mask)
        expected_logits = policy.base_model(tokens, attention_mask=attention_mask)
        expected_values = value_head_oracle(policy, tokens, attention_mask)
        d_vocab = policy.base_model.cfg.d_vocab
        if values.shape != tokens.shape or logits.shape != (*tokens.shape, d_vocab):
            return (f"logits {tuple(logits.shape)} and values {tuple(values.shape)} for tokens "
                    f"{tuple(tokens.shape)}")
        # Only real positions: what a padding position computes is never read.
        real = mask.bool()
        padded = "padded" if attention_mask is not None else "unpadded"
        if not torch.allclose(logits[real], expected_logits[real], atol=1e-5):
            gap = (logits[real] - expected_logits[real]).abs().max().item()
            return f"{padded}: logits differ from the model's by up to {gap:.3g}"
        if not torch.allclose(values[real], expected_values[real], atol=1e-5):
            return f"{padded}: values {values[real]}, expected {expected_values[real]}"
    return None


def real_forward(policy, tokens, mask):
    return policy(tokens, mask)


def head_before_ln_final(policy, tokens, mask):
    """Reads the residual stream before the final layernorm (the last block's resid_post)."""
    logits, cache = policy.base_model.run_with_cache(tokens, attention_mask=mask)
    resid = cache[f"blocks.{policy.base_model.cfg.n_layers - 1}.hook_resid_post"]
    return logits, policy.value_head(resid).squeeze(-1)


def mask_forgotten(policy, tokens, mask):
    """Drops the attention mask: padded rows attend to their padding."""
    return policy(tokens)


def head_on_embeddings(policy, tokens, mask):
    """Reads the token embeddings instead of the final residual stream."""
    logits = policy.base_model(tokens, attention_mask=mask)
    return logits, policy.value_head(policy.base_model.embed(tokens)).squeeze(-1)


@pytest.fixture(scope="module", params=[True, False], ids=["fast", "hooked"])
def policy(tiny_model, request) -> TransformerWithValueHead:
    """Both forward paths: minirlhf.runtime.fast_path and the HookedTransformer with its hook."""
    torch.manual_seed(0)
    return TransformerWithValueHead(tiny_model, fast_path=request.param)


def test_value_head_and_logits_match_oracles(policy):
    problem = forward_mismatch(real_forward, policy)
    assert problem is None, problem


@pytest.mark.parametrize("wrong", [head_before_ln_final, mask_forgotten, head_on_embeddings])
def test_forward_check_rejects_wrong_versions(policy, wrong):
    assert forward_mismatch(wrong, policy) is not None


def test_value_head_is_a_two_layer_mlp_on_d_model(policy):
    d_model = policy.base_model.cfg.d_model
    first, _, second = policy.value_head
    assert first.in_features == d_model and second.out_features == 1


def test_values_carry_gradients_to_trunk_and_head(policy):
    tokens, _ = make_batch(policy.base_model)
    _, values = policy(tokens)
    values.sum().backward()
    try:
        assert policy.value_head[0].weight.grad.abs().sum() > 0
        assert policy.base_model.blocks[0].attn.W_Q.grad.abs().sum() > 0
    finally:
        policy.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- the generated positions


def generated_mismatch(forward_generated: Callable, policy: TransformerWithValueHead,
                       frozen_layers: int) -> str | None:
    """None if forward_generated(policy, tokens, mask, prefix_len, kept) gives TransformerLens's
    logits / T and the hand-made value head's values at the states that chose the generated
    tokens (positions prefix_len - 1 .. seq - 2), with the frozen trunk's output kept or not."""
    tokens, mask = make_batch(policy.base_model)
    prefix_len, states = 3, slice(2, -1)
    with torch.no_grad():
        expected_logits = policy.base_model(tokens, attention_mask=mask)[:, states] / 1.7
        expected_values = value_head_oracle(policy, tokens, mask)[:, states]
        kept = policy.keep(tokens, mask)
        if kept.keys() != ({"trunk"} if frozen_layers else set()):
            return f"kept {sorted(kept)} with {frozen_layers} frozen blocks"
        logits, values = forward_generated(policy, tokens, mask, prefix_len, kept)
    real = mask[:, states].bool()
    if logits.shape != expected_logits.shape or values.shape != expected_values.shape:
        return f"logits {tuple(logits.shape)}, values {tuple(values.shape)}"
    if not torch.allclose(logits[real], expected_logits[real], atol=1e-5):
        return "logits differ from TransformerLens's / T at the generated states"
    if not torch.allclose(values[real], expected_values[real], atol=1e-5):
        return "values differ from the value head's at the generated states"
    return None


def real_forward_generated(policy, tokens, mask, prefix_len, kept):
    return policy.forward_generated(tokens, mask, prefix_len, kept)


def forward_generated_one_late(policy, tokens, mask, prefix_len, kept):
    """Off by one: the states at the generated tokens themselves (prefix_len .. seq - 1)."""
    logits, values = policy(tokens, mask)
    return logits[:, prefix_len:] / policy.temperature, values[:, prefix_len:]


def forward_generated_untempered(policy, tokens, mask, prefix_len, kept):
    """Forgets the temperature the samples were drawn at."""
    logits, values = policy.forward_generated(tokens, mask, prefix_len, kept)
    return logits * policy.temperature, values


@pytest.mark.parametrize("frozen_layers", [0, 1])
@pytest.mark.parametrize("fast_path", [True, False])
def test_forward_generated_matches_oracles(tiny_model, fast_path, frozen_layers):
    torch.manual_seed(0)
    policy = TransformerWithValueHead(tiny_model, 1.7, fast_path, frozen_layers=frozen_layers)
    problem = generated_mismatch(real_forward_generated, policy, frozen_layers)
    assert problem is None, problem


@pytest.mark.parametrize("wrong", [forward_generated_one_late, forward_generated_untempered])
def test_forward_generated_check_rejects_wrong_versions(tiny_model, wrong):
    torch.manual_seed(0)
    policy = TransformerWithValueHead(tiny_model, 1.7, frozen_layers=1)
    assert generated_mismatch(wrong, policy, 1) is not None


def test_a_critic_free_policy_has_no_value_head(tiny_model):
    """value_head=False: no head, no head parameters, values None; the logits are the same."""
    tokens, mask = make_batch(tiny_model)
    policy = TransformerWithValueHead(tiny_model, value_head=False)
    assert policy.value_head is None
    assert all(name.startswith("base_model.") for name, _ in policy.named_parameters())
    logits, values = policy(tokens, mask)
    expected = policy.base_model(tokens, attention_mask=mask)
    real = mask.bool()
    assert values is None and torch.allclose(logits[real], expected[real], atol=1e-5)
    _, values = policy.forward_generated(tokens, mask, 3)
    assert values is None
    with_head = TransformerWithValueHead(tiny_model)  # the check sees a head where there is one
    assert not all(name.startswith("base_model.") for name, _ in with_head.named_parameters())


# ---------------------------------------------------------------- the reference model


def reference_problem(get_reference: Callable, model: HookedTransformer) -> str | None:
    """None if the reference is a frozen copy (same logits now; no gradients; eval mode;
    unaffected when the policy's weights change), else what it is not."""
    tokens, _ = make_batch(model)
    reference = get_reference(model)
    if reference.training or any(p.requires_grad for p in reference.parameters()):
        return "the reference is in training mode or has parameters that require grad"
    if not torch.allclose(reference(tokens), model(tokens)):
        return "the reference's logits differ from the policy's"
    before = reference(tokens).clone()
    with torch.no_grad():
        model.unembed.b_U += 1.0  # a "training step" on the policy
    try:
        if not torch.equal(reference(tokens), before):
            return "the reference's logits moved when the policy's weights changed"
        return None
    finally:
        with torch.no_grad():
            model.unembed.b_U -= 1.0


def reference_is_the_policy(model):
    """No copy: freezing it freezes the policy too, and it moves with the policy."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def reference_shares_weights(model):
    """A new module around the *same* parameter tensors (a shallow copy)."""
    reference = copy.copy(model)
    reference.eval()
    return reference


def test_reference_model_holds_a_frozen_copy(make_printable_model):
    problem = reference_problem(lambda model: ReferenceModel(model).model,
                                make_printable_model())
    assert problem is None, problem


@pytest.mark.parametrize("keep_residual", [False, True])
@pytest.mark.parametrize("fast_path", [True, False])
def test_reference_logits_match_transformer_lens(make_printable_model, keep_residual, fast_path):
    """What the reference keeps, turned back into logits, is TransformerLens's logits / T at the
    states that chose the generated tokens, whether it keeps logits or its residual stream."""
    model = make_printable_model(seed=7)
    tokens, mask = make_batch(model)
    prefix_len, temperature = 3, 1.7
    reference = ReferenceModel(model, temperature, fast_path, keep_residual)
    logits, kept = reference.forward_generated(tokens, mask, prefix_len)
    with torch.no_grad():
        expected = model(tokens, attention_mask=mask)[:, prefix_len - 1 : -1] / temperature
    d_kept = model.cfg.d_model if keep_residual else model.cfg.d_vocab
    assert kept.keys() == {"reference"}
    assert kept["reference"].shape == (*expected.shape[:2], d_kept)
    real = mask[:, prefix_len - 1 : -1].bool()  # padding positions are never read
    for got in [logits, reference.get_logits(kept)]:
        assert (got - expected)[real].abs().max() < 1e-5


def add_a_steering_hook(model: HookedTransformer) -> torch.Tensor:
    """Adds a fixed vector to the residual stream after block 0 (steering); returns it."""
    vector = 3 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    model.blocks[0].hook_resid_post.add_hook(lambda resid, hook: resid + vector)
    return vector


def test_hooks_a_user_attached_act_on_the_policy(make_printable_model):
    """A policy with a hook attached falls back to TransformerLens's forward (with a warning),
    where the hook runs: the logits are the hooked model's, not the plain fast path's."""
    model = make_printable_model(seed=8)
    tokens, _ = make_batch(model)
    policy = TransformerWithValueHead(model, fast_path=True)
    with torch.no_grad():
        plain, _ = policy(tokens)
        add_a_steering_hook(model)
        try:
            with pytest.warns(UserWarning, match="Hooks are attached"):
                steered, _ = policy(tokens)
            expected = model(tokens)  # TransformerLens runs the hook
        finally:
            model.reset_hooks()
    assert torch.allclose(steered, expected, atol=1e-5)
    assert not torch.allclose(steered, plain, atol=1e-2)


@pytest.mark.parametrize("wrong", [reference_is_the_policy, reference_shares_weights])
def test_reference_check_rejects_wrong_versions(make_printable_model, wrong):
    assert reference_problem(wrong, make_printable_model()) is not None


def test_the_hook_check_sees_a_fast_path_that_ignores_hooks(make_printable_model, monkeypatch):
    """The check above fails when the fast path runs although hooks are attached."""
    from minirlhf.runtime import fast_path
    monkeypatch.setattr(fast_path, "has_hooks", lambda model: False)
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        test_hooks_a_user_attached_act_on_the_policy(make_printable_model)
