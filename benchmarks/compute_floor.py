"""The compute floor of a PPO phase: its matrix-multiply FLOPs, counted from the model's shapes,
over this CPU's measured matmul rate at those shapes.

What is counted (multiply-adds x 2), per block and token: the fused QKV projection, the
attention scores and the weighted sum over the keys the token may see (causally: position i
sees i + 1 keys, earlier ones cached), the output projection and the MLP (two or, gated,
three matrices); then the unembedding at the positions whose logits are read, and the value
head (d_model -> 4 d_model -> 1) where there is one. Element-wise work (norms, softmax,
activations) and the optimiser are left out: the floor is what no implementation can avoid.

The phase's three parts:

- sampler: one pass over every position but the last (prefill, then one token a step with a
  key-value cache), unembedding the gen_len positions that choose tokens;
- evaluation: the reference model over the same positions (the policy's log-probs and values
  come from the sampler's final residual stream: only its unembedding and value head run);
- learning: each learning pass's forward over the trainable blocks (a frozen trunk's output is
  kept from the rollout) and its backward: twice the forward for matrices that train (the
  gradients wrt their input and their weight), once for frozen matrices a gradient passes
  through (LoRA: the base weights; the unembedding when it does not train).

Used by `benchmarks/phase_time.py --parts floor`; tests/test_compute_floor.py checks the count
against a hand count and against torch's FLOP counter.
"""

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a transformer that its matmul FLOPs depend on."""

    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_vocab: int
    n_layers: int
    gated_mlp: bool

    @classmethod
    def of(cls, cfg) -> "ModelShape":
        """From a TransformerLens `HookedTransformerConfig`."""
        return cls(cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads,
                   cfg.d_head, cfg.d_vocab_out, cfg.n_layers, bool(cfg.gated_mlp))


def block_weight_flops(shape: ModelShape) -> int:
    """FLOPs of one block's weight matrices for one token (QKV, output, MLP)."""
    qkv = 2 * shape.d_model * (shape.n_heads + 2 * shape.n_kv_heads) * shape.d_head
    out = 2 * shape.n_heads * shape.d_head * shape.d_model
    mlp = 2 * shape.d_model * shape.d_mlp * (3 if shape.gated_mlp else 2)
    return qkv + out + mlp


def forward_flops(shape: ModelShape, rows: int, start: int, end: int, layers: int,
                  unembedded: int, value_head: bool = False) -> int:
    """Matmul FLOPs of `rows` rows through `layers` blocks at positions [start, end) (earlier
    keys cached), unembedding `unembedded` positions per row (and the value head there)."""
    keys = (end * (end + 1) - start * (start + 1)) // 2  # position i attends to i + 1 keys
    attention = 2 * 2 * shape.n_heads * shape.d_head * keys  # scores, then the weighted sum
    per_layer = (end - start) * block_weight_flops(shape) + attention
    head = 2 * shape.d_model * shape.d_vocab
    if value_head:
        head += 2 * shape.d_model * 4 * shape.d_model + 2 * 4 * shape.d_model
    return rows * (layers * per_layer + unembedded * head)


def phase_flops(shape: ModelShape, rows: int, prefix_len: int, gen_len: int, passes: int,
                frozen_layers: int = 0, lora: bool = False,
                value_head: bool = False) -> dict[str, int]:
    """Matmul FLOPs of a phase's sampler, evaluation and learning steps (module docstring).

    Args:
        rows: the batch size; passes: learning passes over it (`batches_per_learning_phase`).
        frozen_layers: blocks at the bottom that do not train (their output is kept).
        lora: only adapters train in the trainable blocks (the base weights are frozen, so
            their backward is the input gradient alone; the adapters' own FLOPs are left out).
    """
    seq = prefix_len + gen_len
    sampler = forward_flops(shape, rows, 0, seq - 1, shape.n_layers, gen_len)
    policy_head = forward_flops(shape, rows, 0, 0, 0, gen_len, value_head)
    evaluation = forward_flops(shape, rows, 0, seq - 1, shape.n_layers, gen_len) + policy_head
    trained = shape.n_layers - frozen_layers
    blocks = forward_flops(shape, rows * passes, 0, seq - 1, trained, 0)
    head = forward_flops(shape, rows * passes, 0, 0, 0, gen_len, value_head)
    # LoRA: the base matrices only pass the gradient on (1x); the unembedding is frozen too.
    backward = blocks * (1 if lora else 2) + head * (1 if lora else 2)
    return {"sampler": sampler, "evaluation": evaluation, "learning": blocks + head + backward}


def matmul_shapes(shape: ModelShape, tokens: int) -> list[tuple[int, int, int]]:
    """The (m, k, n) of a block's weight matrices and the unembedding for `tokens` rows."""
    qkv = (shape.n_heads + 2 * shape.n_kv_heads) * shape.d_head
    mlp = [(tokens, shape.d_model, shape.d_mlp)] * (2 if shape.gated_mlp else 1)
    return [(tokens, shape.d_model, qkv), (tokens, shape.n_heads * shape.d_head, shape.d_model),
            *mlp, (tokens, shape.d_mlp, shape.d_model), (tokens, shape.d_model, shape.d_vocab)]


def measure_matmul_rate(shapes: list[tuple[int, int, int]], seconds: float = 0.5) -> float:
    """FLOP/s of `torch.matmul` (float32) over `shapes` in turn, best of repeated rounds
    lasting about `seconds` in all."""
    pairs = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    for a, b in pairs:  # warm up
        torch.matmul(a, b)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        start = time.perf_counter()
        for a, b in pairs:
            torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return flops / best
