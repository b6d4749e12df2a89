"""The chunked per-token quantities (`token_stats`, `policy_outputs`): the log-prob of the taken
token, the entropy and the exact KL, a few positions at a time, against `torch.distributions`
on the whole logits (values, and gradients wrt the final residual and the unembedding), and
the learning step's outputs against today's unchunked computation on a tiny model (padding,
LoRA off, both ways the reference keeps its logits). Each check is shown to catch a wrong
chunk boundary."""

import functools

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from minirlhf import token_stats
from minirlhf.losses import calc_entropy, calc_kl, get_gen_logprobs
from minirlhf.models import ReferenceModel, TransformerWithValueHead
from minirlhf.policy_outputs import get_policy_outputs
from minirlhf.token_stats import (
    TokenStats,
    calc_token_stats,
    get_chunk_positions,
    get_token_stats,
)

ROWS, GEN_LEN, D_MODEL, D_VOCAB, TEMPERATURE = 3, 7, 8, 11, 1.3


def make_head(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random final residual, final-norm gain and bias, unembedding and its bias, the
    reference's residual, and generated tokens."""
    gen = torch.Generator().manual_seed(seed)
    def randn(*shape):
        return torch.randn(*shape, generator=gen)
    return {"residual": randn(ROWS, GEN_LEN, D_MODEL), "ln_w": 1 + 0.1 * randn(D_MODEL),
            "ln_b": 0.1 * randn(D_MODEL), "W_U": randn(D_VOCAB, D_MODEL), "b_U": randn(D_VOCAB),
            "ref_residual": randn(ROWS, GEN_LEN, D_MODEL),
            "tokens": torch.randint(0, D_VOCAB, (ROWS, GEN_LEN), generator=gen)}


def head_logits(head: dict, residual: torch.Tensor) -> torch.Tensor:
    """What the unembedding gives, written out: (x * gain + bias) @ W_U^T + b_U, / T."""
    return ((residual * head["ln_w"] + head["ln_b"]) @ head["W_U"].T + head["b_U"]) / TEMPERATURE


def chunked_stats(head: dict, chunk_positions: int | None, stats_fn=get_token_stats):
    """`stats_fn` on chunk-logit callables that unembed a slice of the residual."""
    def get_logits(positions):
        return head_logits(head, head["residual"][:, positions])

    @torch.no_grad()
    def get_ref_logits(positions):
        return head_logits(head, head["ref_residual"][:, positions])

    return stats_fn(get_logits, head["tokens"], get_ref_logits, chunk_positions)


def oracle_stats(head: dict) -> TokenStats:
    """torch.distributions on the whole logits."""
    policy = Categorical(logits=head_logits(head, head["residual"]))
    with torch.no_grad():
        reference = Categorical(logits=head_logits(head, head["ref_residual"]))
    return TokenStats(policy.log_prob(head["tokens"]), policy.entropy(),
                      kl_divergence(policy, reference), reference.log_prob(head["tokens"]))


TRAINED = ("residual", "ln_w", "ln_b", "W_U", "b_U")


def gradients(head: dict, stats: TokenStats, weights: TokenStats) -> dict[str, torch.Tensor]:
    """d(sum of weights * stats)/d(each trained tensor); the reference's gets none."""
    total = sum((w * s).sum() for w, s in zip(weights[:3], stats[:3]))
    grads = torch.autograd.grad(total, [head[name] for name in TRAINED])
    return dict(zip(TRAINED, grads))


def stats_mismatch(stats_fn, chunk_positions: int | None) -> str | None:
    """What differs between `stats_fn` (a `get_token_stats`) and the oracle: values of the
    four quantities, then gradients wrt the residual and the unembedding; None if nothing."""
    head = make_head()
    for name in (*TRAINED, "ref_residual"):
        head[name].requires_grad_(True)
    got, want = chunked_stats(head, chunk_positions, stats_fn), oracle_stats(head)
    for field, a, b in zip(TokenStats._fields, got, want):
        if a.shape != b.shape:
            return f"{field}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        if not torch.allclose(a, b, atol=1e-5):
            return f"{field} differs by {(a - b).abs().max():.2e}"
    if got.ref_logprobs.requires_grad:
        return "the reference's log-probs carry a gradient"
    weights = TokenStats(*torch.randn(4, ROWS, GEN_LEN, generator=torch.Generator().manual_seed(1)))
    got_grads, want_grads = gradients(head, got, weights), gradients(head, want, weights)
    for name in TRAINED:
        if not torch.allclose(got_grads[name], want_grads[name], atol=1e-5):
            return f"the gradient wrt {name} differs"
    return None


@pytest.mark.parametrize("recompute", [True, False])  # checkpointed, or the written-out backward
@pytest.mark.parametrize("chunk_positions", [1, 2, 3, 7, 100, None])
def test_chunked_stats_match_distributions(monkeypatch, chunk_positions, recompute):
    # 3 does not divide gen_len 7 (chunks of 3, 3, 1); None picks 256 // 3 rows: one chunk.
    monkeypatch.setattr(token_stats, "RECOMPUTE_ABOVE_TOKENS", 0 if recompute else 10**9)
    problem = stats_mismatch(get_token_stats, chunk_positions)
    assert problem is None, problem


def backward_entropy_sign_flipped(ctx, grad_logprobs, grad_entropy, grad_kl, grad_ref):
    """The written-out backward with dH/dz's sign wrong."""
    return REAL_BACKWARD(ctx, grad_logprobs, -grad_entropy, grad_kl, grad_ref)


def backward_without_the_one_hot(ctx, grad_logprobs, grad_entropy, grad_kl, grad_ref):
    """Forgets that the taken token's log-prob has the one-hot term (only -p)."""
    grad, *rest = REAL_BACKWARD(ctx, grad_logprobs, grad_entropy, grad_kl, grad_ref)
    logprobs, gen_tokens = ctx.saved_tensors[:2]
    return grad.scatter_add(-1, gen_tokens[..., None], -grad_logprobs[..., None]), *rest


REAL_BACKWARD = token_stats.KeptLogSoftmaxStats.backward


@pytest.mark.parametrize("wrong", [backward_entropy_sign_flipped, backward_without_the_one_hot])
def test_the_check_catches_a_wrong_written_out_backward(monkeypatch, wrong):
    monkeypatch.setattr(token_stats, "RECOMPUTE_ABOVE_TOKENS", 10**9)
    monkeypatch.setattr(token_stats.KeptLogSoftmaxStats, "backward", staticmethod(wrong))
    assert stats_mismatch(get_token_stats, 3) is not None


def stats_dropping_each_chunks_last(get_logits, gen_tokens, get_ref_logits, chunk_positions):
    """Off by one: each chunk's slice stops a position early (the last of each chunk lost)."""
    parts = [calc_token_stats(get_logits(slice(i, i + chunk_positions - 1)),
                              gen_tokens[:, i : i + chunk_positions - 1],
                              get_ref_logits(slice(i, i + chunk_positions - 1)))
             for i in range(0, gen_tokens.shape[1], chunk_positions)]
    return TokenStats(*[torch.cat(p, dim=1) for p in zip(*parts)])


def stats_tokens_one_late(get_logits, gen_tokens, get_ref_logits, chunk_positions):
    """The right logits, but each chunk reads the tokens one position on (the next chunk's first
    token at its end): the boundary bookkeeping of tokens and logits disagree."""
    padded = torch.cat([gen_tokens[:, 1:], gen_tokens[:, :1]], dim=1)
    return get_token_stats(get_logits, padded, get_ref_logits, chunk_positions)


def stats_without_gradient(get_logits, gen_tokens, get_ref_logits, chunk_positions):
    """Chunks computed under no_grad (what a forgotten checkpoint would give), made leaves."""
    with torch.no_grad():
        stats = get_token_stats(get_logits, gen_tokens, get_ref_logits, chunk_positions)
    return TokenStats(*[s.clone().requires_grad_(True) for s in stats])


@pytest.mark.parametrize("wrong", [stats_dropping_each_chunks_last, stats_tokens_one_late,
                                   stats_without_gradient])
def test_the_chunk_check_catches_wrong_versions(wrong):
    try:
        problem = stats_mismatch(wrong, 3)
    except RuntimeError as error:  # a gradient that does not reach the weights at all
        problem = str(error)
    assert problem is not None


@pytest.mark.parametrize("recompute", [True, False])
def test_masked_tokens_give_finite_values_and_gradients(monkeypatch, recompute):
    monkeypatch.setattr(token_stats, "RECOMPUTE_ABOVE_TOKENS", 0 if recompute else 10**9)
    head = make_head(2)
    head["b_U"][3] = -float("inf")  # a token no one may say: probability 0 for both models
    head["residual"].requires_grad_(True)
    got, want = chunked_stats(head, 2), oracle_stats(head)
    for a, b in zip(got[1:3], want[1:3]):  # the entropy and the exact KL
        assert torch.allclose(a, b, atol=1e-5)
    (grad,) = torch.autograd.grad(got.entropy.sum() + got.exact_kl.sum(), head["residual"])
    assert torch.isfinite(grad).all()


def test_chunk_positions_hold_about_chunk_tokens():
    assert get_chunk_positions(8, 256) == 32
    assert get_chunk_positions(300, 256) == 1  # never below one position
    assert get_chunk_positions(3, 7) == 2


def test_chunk_positions_below_one_are_refused():
    with pytest.raises(ValueError, match="chunk_positions must be at least 1"):
        chunked_stats(make_head(), -1)


# ---------------------------------------------------------------- the learning step's outputs


def unchunked_outputs(policy, reference, ids, mask, prefix_len, kept, estimator, old=None):
    """Today's computation: the whole logits, then `losses`' functions on them."""
    gen_tokens = ids[:, prefix_len:]
    logits, values = policy.forward_generated(ids, mask, prefix_len, kept)
    logprobs = get_gen_logprobs(logits, gen_tokens)
    kl = calc_kl(estimator, logprobs, logits, reference.get_logits(kept), gen_tokens, old)
    return logprobs, values, kl, calc_entropy(logits)


def make_batch(model, prefix_len=3, gen_len=5, rows=4):
    """Random tokens with left padding on the prompts of two rows."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.cfg.d_vocab, (rows, prefix_len + gen_len), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :1] = 0
    return ids, mask, prefix_len


@functools.cache
def policy_and_reference(make_model, fast_path: bool, keep_residual: bool):
    """A policy moved a little away from its reference (so the KL is not 0); built once."""
    torch.manual_seed(0)
    policy = TransformerWithValueHead(make_model(), 1.7, fast_path)
    reference = ReferenceModel.of_policy(policy, keep_residual)
    with torch.no_grad():
        for param in policy.base_model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return policy, reference


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("keep_residual", [True, False])
@pytest.mark.parametrize("estimator", ["exact", "k3", "k3_is"])
@pytest.mark.parametrize("chunk_tokens, recompute", [(4, True), (8, True), (256, True),
                                                     (8, False)])  # 4 rows: 1, 2 (2+2+1), all 5
def test_policy_outputs_match_the_unchunked_computation(
    make_printable_model, monkeypatch, fast_path, keep_residual, estimator, chunk_tokens, recompute
):
    monkeypatch.setattr(token_stats, "CHUNK_TOKENS", chunk_tokens)
    monkeypatch.setattr(token_stats, "RECOMPUTE_ABOVE_TOKENS", 0 if recompute else 10**9)
    policy, reference = policy_and_reference(make_printable_model, fast_path, keep_residual)
    ids, mask, prefix_len = make_batch(policy.base_model)
    _, kept = reference.forward_generated(ids, mask, prefix_len)
    params = [p for p in policy.parameters() if p.requires_grad]
    weights = torch.randn(4, *ids[:, prefix_len:].shape)
    old = (-1 - torch.rand(ids[:, prefix_len:].shape, generator=torch.Generator().manual_seed(4))
           if estimator == "k3_is" else None)  # an older sampling policy's log-probs
    results = []
    for fn in (get_policy_outputs, unchunked_outputs):
        outputs = fn(policy, reference, ids, mask, prefix_len, kept, estimator, old)
        total = sum((w * o).sum() for w, o in zip(weights, outputs))
        results.append((outputs, torch.autograd.grad(total, params)))
    (got, got_grads), (want, want_grads) = results
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
