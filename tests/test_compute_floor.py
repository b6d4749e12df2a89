"""benchmarks/compute_floor.py's FLOP count: against numbers worked by hand for a tiny config,
and (the weight matrices and the unembedding) against torch's own FLOP counter on a tiny
TransformerLens model; each check also fed a known-wrong count."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minirlhf.runtime.loading import load_tiny_model

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "compute_floor.py"
spec = importlib.util.spec_from_file_location("compute_floor", PATH)
compute_floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compute_floor)

# d_model 4, d_mlp 8, 2 query heads sharing 1 key-value head of size 2, 10 tokens, 1 block.
TINY = compute_floor.ModelShape(d_model=4, d_mlp=8, n_heads=2, n_kv_heads=1, d_head=2,
                                d_vocab=10, n_layers=1, gated_mlp=False)


def hand_count_problem(module) -> str | None:
    """The counts of `module` (a compute_floor) against the hand count; None if they agree."""
    # Per token: QKV 2*4*(2+2*1)*2 = 64, output 2*(2*2)*4 = 32, MLP 2*4*8*2 = 128: 224.
    if (got := module.block_weight_flops(TINY)) != 224:
        return f"block weights {got}, expected 224"
    # 3 rows, 2 blocks, positions 1 and 2 (2 + 3 = 5 keys: attention 2*2*2*2*5 = 80), one
    # position unembedded (2*4*10 = 80) with the value head (2*4*16 + 2*16 = 160):
    # 3 * (2 * (2 * 224 + 80) + 80 + 160) = 3888.
    got = module.forward_flops(TINY, rows=3, start=1, end=3, layers=2, unembedded=1,
                               value_head=True)
    if got != 3888:
        return f"forward {got}, expected 3888"
    # 2 rows, prompt 2, 2 generated: 3 positions (keys 1 + 2 + 3 = 6: attention 96), blocks
    # 3 * 224 + 96 = 768, 2 unembedded (160): sampler 2 * 928 = 1856; evaluation adds the
    # policy's unembedding, 2 * 160; learning is the forward three times.
    want = {"sampler": 1856, "evaluation": 1856 + 320, "learning": 3 * 1856}
    got = module.phase_flops(TINY, rows=2, prefix_len=2, gen_len=2, passes=1)
    if got != want:
        return f"phase {got}, expected {want}"
    # LoRA with the block frozen below: learning is the unembedding forward + its input grad.
    got = module.phase_flops(TINY, rows=2, prefix_len=2, gen_len=2, passes=1, frozen_layers=1,
                             lora=True)["learning"]
    return None if got == 2 * 320 else f"LoRA learning {got}, expected 640"


def test_the_count_matches_the_hand_count():
    problem = hand_count_problem(compute_floor)
    assert problem is None, problem


def block_weight_flops_kv_as_queries(shape):
    """Counts as many key-value heads as query heads (grouped-query attention forgotten)."""
    return 2 * shape.d_model * 3 * shape.n_heads * shape.d_head + 2 * shape.n_heads * (
        shape.d_head * shape.d_model) + 2 * shape.d_model * shape.d_mlp * 2


def forward_flops_full_attention(shape, rows, start, end, layers, unembedded, value_head=False):
    """Every position attends to every position of the pass (no causal mask, no cache)."""
    attention = 4 * shape.n_heads * shape.d_head * (end - start) * end
    per_layer = (end - start) * compute_floor.block_weight_flops(shape) + attention
    head = 2 * shape.d_model * shape.d_vocab + (
        2 * shape.d_model * 4 * shape.d_model + 8 * shape.d_model if value_head else 0)
    return rows * (layers * per_layer + unembedded * head)


@pytest.mark.parametrize("name, wrong", [("block_weight_flops", block_weight_flops_kv_as_queries),
                                         ("forward_flops", forward_flops_full_attention)])
def test_the_hand_count_check_catches_wrong_counts(monkeypatch, name, wrong):
    monkeypatch.setattr(compute_floor, name, wrong)
    assert hand_count_problem(compute_floor) is not None


def test_weight_flops_match_torchs_flop_counter():
    """A forward pass of a tiny model (no cache): torch counts every matmul; its attention
    (scores and weighted sum over all `seq` keys, masked, 4 * n_heads * d_head * seq^2 per
    block) taken away, the rest is the weight matrices and the unembedding."""
    model = load_tiny_model(n_layers=2, d_model=16, n_heads=2, d_vocab=50)
    shape = compute_floor.ModelShape.of(model.cfg)
    rows, seq = 3, 5
    tokens = torch.randint(0, 50, (rows, seq))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens)
    attention = rows * shape.n_layers * 4 * shape.n_heads * shape.d_head * seq * seq
    weights = rows * seq * (shape.n_layers * compute_floor.block_weight_flops(shape)
                            + 2 * shape.d_model * shape.d_vocab)
    assert counter.get_total_flops() - attention == weights
