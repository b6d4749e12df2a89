"""The fast path's forward pass against an independent one: TransformerLens's own forward.

Models: the tiny GPT-2-shaped model (LayerNorm, learned positions, GELU), a tiny Llama-shaped
model (RMSNorm, rotary, gated SiLU MLP, grouped-query attention), and a GPT-2 with LayerNorm folded
(LNPre, what `from_pretrained("gpt2")` gives). Each is compared with and without left padding,
in one pass and token by token through the key-value cache; gradients are compared too. And each
check is shown to fail when one detail of the fast path is wrong.
"""

import copy

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from minirlhf.runtime import fast_path as ff
from minirlhf.runtime.fast_weights import FastWeights
from minirlhf.runtime.loading import load_tiny_model

ATOL = 1e-5


def fast_logits(model: HookedTransformer, tokens, mask=None):
    """The logits of the fast path: laid-out weights, `forward`, then `unembed`."""
    weights = ff.get_fast_weights(model)
    return ff.unembed(weights.output, ff.forward(weights, tokens, mask))


def tiny_llama(seed: int = 0) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=48, d_head=12, n_heads=4, n_key_value_heads=2, d_mlp=96,
        d_vocab=300, n_ctx=64, act_fn="silu", gated_mlp=True, normalization_type="RMS",
        final_rms=True, positional_embedding_type="rotary", rotary_dim=12, rotary_base=10000,
        rotary_adjacent_pairs=False, original_architecture="LlamaForCausalLM", seed=seed,
        eps=1e-6,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():  # non-zero biases and norm weights, so a forgotten one shows
        for name, param in model.named_parameters():
            if name.endswith((".b_in", ".w", ".b_O", ".b_out")):
                param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def tiny_gpt2() -> HookedTransformer:
    model = load_tiny_model(n_layers=2, d_model=32, n_heads=4, d_vocab=300)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".b", ".w", "b_Q", "b_K", "b_V", "b_in")):
                param.add_(0.3 * torch.randn_like(param))
    return model


def tiny_gpt2_folded() -> HookedTransformer:
    """LayerNorm folded into the next weights: normalization_type LNPre, as from_pretrained."""
    model = tiny_gpt2()
    folded = HookedTransformer(model.cfg.to_dict() | {"normalization_type": "LNPre"})
    folded.load_and_process_state_dict(
        model.state_dict(), fold_ln=True, center_writing_weights=True, center_unembed=False
    )
    return folded.eval()


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gpt2_folded": tiny_gpt2_folded}


def padded_batch(d_vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows of 10 tokens, left-padded by 0, 3, 1 and 5 positions."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, d_vocab, (4, 10), generator=gen)
    mask = torch.ones_like(tokens)
    for row, pad in enumerate([0, 3, 1, 5]):
        mask[row, :pad] = 0
    return tokens, mask


def max_diff_real(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest difference at real (not padding) positions: padding outputs are never read."""
    return (a - b).abs()[mask.bool()].max().item()


@pytest.fixture(params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    return MODELS[request.param]()


def test_logits_match_transformer_lens_without_padding(model: HookedTransformer) -> None:
    tokens, _ = padded_batch(model.cfg.d_vocab)
    expected = model(tokens)
    got = fast_logits(model, tokens)
    assert (got - expected).abs().max().item() < ATOL


def test_logits_match_transformer_lens_with_left_padding(model: HookedTransformer) -> None:
    tokens, mask = padded_batch(model.cfg.d_vocab)
    expected = model(tokens, attention_mask=mask)
    got = fast_logits(model, tokens, mask)
    assert max_diff_real(got, expected, mask) < ATOL
    assert torch.isfinite(got).all(), "padding positions must not produce NaN"


@torch.no_grad()
def test_cached_decoding_matches_full_forward(model: HookedTransformer) -> None:
    """Prefill 6 positions, then feed the last 4 one at a time through the cache."""
    tokens, mask = padded_batch(model.cfg.d_vocab)
    expected = model(tokens, attention_mask=mask)
    weights = ff.get_fast_weights(model)
    cache = ff.make_cache(weights, 4, 10, torch.float32, tokens.device)
    outputs = [ff.forward(weights, tokens[:, :6], mask[:, :6], cache, start=0)]
    for pos in range(6, 10):
        step = ff.forward(weights, tokens[:, pos : pos + 1], mask[:, : pos + 1], cache, pos)
        outputs.append(step)
    got = ff.unembed(weights.output, torch.cat(outputs, dim=1))
    assert max_diff_real(got, expected, mask) < ATOL


@torch.no_grad()
def test_cached_decoding_without_padding(model: HookedTransformer) -> None:
    tokens, _ = padded_batch(model.cfg.d_vocab)
    expected = model(tokens)[:, -1]
    weights = ff.get_fast_weights(model)
    cache = ff.make_cache(weights, 4, 10, torch.float32, tokens.device)
    ff.forward(weights, tokens[:, :9], None, cache, start=0)
    got = ff.unembed(weights.output, ff.forward(weights, tokens[:, 9:], None, cache, start=9))
    got = got[:, -1]
    assert (got - expected).abs().max().item() < ATOL


def test_gradients_reach_the_hooked_transformer(model: HookedTransformer) -> None:
    """Training on the fast path changes the HookedTransformer's own parameters, identically."""
    tokens, mask = padded_batch(model.cfg.d_vocab)
    twin = copy.deepcopy(model)
    model(tokens, attention_mask=mask)[mask.bool()].logsumexp(-1).sum().backward()
    fast_logits(twin, tokens, mask)[mask.bool()].logsumexp(-1).sum().backward()
    for (name, expected), (_, got) in zip(model.named_parameters(), twin.named_parameters()):
        assert got.grad is not None, f"no gradient reached {name}"
        assert torch.allclose(got.grad, expected.grad, atol=1e-4, rtol=1e-3), name


# ---- the checks above fail on a wrong fast path ----

def test_a_wrong_rotary_layout_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-J's adjacent pairs instead of Llama's halves: the logits check must fail."""
    model = tiny_llama()
    tokens, mask = padded_batch(model.cfg.d_vocab)
    real = ff.get_fast_weights

    def wrong_weights(m: HookedTransformer) -> FastWeights:
        weights = real(m)
        weights.rotary_adjacent_pairs = True
        return weights

    monkeypatch.setattr(ff, "get_fast_weights", wrong_weights)
    assert max_diff_real(fast_logits(model, tokens, mask), model(tokens, attention_mask=mask),
                         mask) > 1e-3


def test_positions_not_offset_by_padding_are_caught() -> None:
    """Position ids counted from the start of the row (not from its first real token)."""
    model = tiny_gpt2()
    tokens, mask = padded_batch(model.cfg.d_vocab)
    expected = model(tokens, attention_mask=mask)
    weights = ff.get_fast_weights(model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ff, "get_position_ids", lambda m: torch.arange(m.shape[1]).expand_as(m))
        got = ff.unembed(weights.output, ff.forward(weights, tokens, mask))
    assert max_diff_real(got, expected, mask) > 1e-3


def test_attending_to_padding_is_caught() -> None:
    model = tiny_llama()
    tokens, mask = padded_batch(model.cfg.d_vocab)
    expected = model(tokens, attention_mask=mask)
    got = fast_logits(model, tokens, torch.ones_like(mask))  # the mask forgotten
    assert max_diff_real(got, expected, mask) > 1e-3


def test_unsupported_models_get_a_clear_error() -> None:
    model = tiny_gpt2()
    model.cfg.parallel_attn_mlp = True
    assert "parallel attention" in ff.unsupported_reason(model)
    with pytest.raises(NotImplementedError, match="fast_path=False"):
        ff.get_fast_weights(model)


@torch.no_grad()
def test_bfloat16_autocast_stays_close(model: HookedTransformer) -> None:
    """Under bfloat16 autocast (as the trainer's `autocast` runs it) the log-probs stay within
    bfloat16 rounding of the float32 ones, and the cached path still runs."""
    tokens, mask = padded_batch(model.cfg.d_vocab)
    expected = model(tokens, attention_mask=mask).log_softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast_logits(model, tokens, mask).float().log_softmax(-1)
        weights = ff.get_fast_weights(model)
        cache = ff.make_cache(weights, 4, 10, torch.float32, tokens.device)
        ff.forward(weights, tokens[:, :9], mask[:, :9], cache)
        step = ff.forward(weights, tokens[:, 9:], mask, cache, start=9)
    assert max_diff_real(got, expected, mask) < 0.1
    assert torch.isfinite(step).all()


@pytest.mark.parametrize("wrong", [None, "shift_ignored", "shift_after_the_next_block"])
@torch.no_grad()
def test_steering_hooks_run_on_the_fast_path_as_on_transformer_lens(
        model: HookedTransformer, wrong: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `ResidualShift` per copy of the batch (2 copies of 2 rows): the fast path, in one pass
    and through the cache, gives TransformerLens's logits with the hook run by TransformerLens."""
    from minirlhf.runtime import steering
    tokens, mask = padded_batch(model.cfg.d_vocab)
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    shift = steering.ResidualShift(torch.tensor([0.0, 2.5]), direction)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", shift)]):
        expected = model(tokens, attention_mask=mask)
        assert ff.use_fast_path(model) and not ff.has_hooks(model)
        if wrong == "shift_ignored":
            monkeypatch.setattr(ff, "get_shifts", lambda model: {})
        if wrong == "shift_after_the_next_block":
            monkeypatch.setattr(ff, "get_shifts", lambda model: {1: [shift]})
        weights = ff.get_fast_weights(model)
        got = ff.unembed(weights.output, ff.forward(weights, tokens, mask))
        cache = ff.make_cache(weights, 4, 10, torch.float32, tokens.device)
        steps = [ff.forward(weights, tokens[:, :6], mask[:, :6], cache, start=0)]
        steps += [ff.forward(weights, tokens[:, p : p + 1], mask[:, : p + 1], cache, p)
                  for p in range(6, 10)]
        cached = ff.unembed(weights.output, torch.cat(steps, dim=1))
    matches = [max_diff_real(x, expected, mask) < ATOL for x in (got, cached)]
    assert matches == [wrong is None] * 2
    assert max_diff_real(model(tokens, attention_mask=mask)[:2], expected[:2], mask[:2]) < ATOL
    assert max_diff_real(model(tokens, attention_mask=mask), expected, mask) > 1e-3  # copy 2 moved
