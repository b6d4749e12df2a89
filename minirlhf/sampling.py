"""Rollouts: a hand-written, batched, KV-cached sampler for HookedTransformers.

Stage 2 of the pipeline. Written out (rather than calling `HookedTransformer.generate`) so every
step is visible: tokenize and left-pad the prompts, run the prompt once to fill the key-value cache,
then feed one token at a time. Prompts are left-padded so every prompt ends at the same position
(`prefix_len`) and generated token t sits at position `prefix_len + t` in every row.

Sampling follows the model's own softmax: `softmax(logits / temperature)`, optionally truncated to
the top-k tokens and/or the smallest set whose probability reaches top_p (Holtzman et al. 2020).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from minirlhf import fast_forward


class Samples(NamedTuple):
    """What a rollout produced."""

    sample_ids: Int[Tensor, "batch seq"]
    """Prompt tokens (left-padded) followed by `gen_len` generated tokens."""
    samples: list[str]
    """Each prompt's text followed by its decoded continuation."""
    attention_mask: Int[Tensor, "batch seq"]
    """1 for real tokens, 0 for left padding."""
    prefix_len: int
    """Position of the first generated token (the padded prompt length)."""
    normalized: Float[Tensor, "batch gen_plus_one d_model"] | None = None
    """With `return_normalized`: the policy's final normalised residual stream at positions
    `prefix_len - 1` to the end (each state a token was chosen in, and the final one), as the
    fast path computed it while sampling; the trainer reads values and log-probs from it."""


def tokenize_prompts(
    model: HookedTransformer, prompts: list[str], prepend_bos: bool
) -> tuple[Int[Tensor, "batch prefix_len"], Int[Tensor, "batch prefix_len"]]:
    """Token ids of the prompts, left-padded to a common length, and their attention mask."""
    tokenizer = model.tokenizer
    assert tokenizer is not None, "the model needs a tokenizer to sample from text prompts"
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("This tokenizer has no BOS token: use prepend_bos=False.")
        rows = [[tokenizer.bos_token_id, *row] for row in rows]
    if min(len(row) for row in rows) == 0:
        raise ValueError("A prompt is empty and prepend_bos is False: give every row a token.")
    prefix_len = max(len(row) for row in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), prefix_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), prefix_len), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, prefix_len - len(row) :] = torch.tensor(row)
        mask[i, prefix_len - len(row) :] = 1
    return ids.to(model.cfg.device), mask.to(model.cfg.device)


def filter_logits(
    logits: Float[Tensor, "batch d_vocab"],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Float[Tensor, "batch d_vocab"]:
    """Logits of the sampling distribution: scaled by 1/temperature, truncated by top-k / top-p.

    Tokens outside the kept set get -inf, so `softmax` of the result is the distribution sampled.
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top one stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: Float[Tensor, "batch d_vocab"],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """Draw one token per row from the filtered softmax distribution.

    By inverting the cumulative distribution at one uniform draw per row: the first token whose
    cumulative probability exceeds it (a token of probability 0 never is). `torch.multinomial`
    draws the same distribution with one random number per vocabulary entry, which at d_vocab
    49k was 14% of a SmolLM2 rollout on the CPU.
    """
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    cdf = probs.double().cumsum(dim=-1)  # float64: 49k float32 additions would drift by ~1e-5
    uniform = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    tokens = torch.searchsorted(cdf, uniform.double() * cdf[:, -1:], right=True).squeeze(-1)
    return tokens.clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def get_samples(
    model: HookedTransformer,
    prompt: str | list[str],
    batch_size: int | None = None,
    gen_len: int = 20,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    prepend_bos: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_at_eos: bool = False,
    use_cache: bool = True,
    fast: bool = True,
    return_normalized: bool = False,
) -> Samples:
    """Sample `gen_len` tokens after each prompt.

    Args:
        prompt: one prompt repeated `batch_size` times, or a list of prompts (one row each).
        seed: seeds a private generator, so the same seed gives the same samples.
        generator: a generator to draw from instead (the trainer keeps one across phases).
        stop_at_eos: once a row emits EOS, its later tokens are all EOS (rows keep equal length).
        use_cache: reuse keys and values of earlier positions (False recomputes the whole
            sequence each step: slower, the same distribution; kept to test the cache).
        fast: decode with `minirlhf.fast_forward` (weights laid out once; the same logits,
            1.4-2.3x faster on CPU in benchmarks/rollout_speed.py). False, or a model the fast
            path does not support, calls `HookedTransformer.forward` with its own cache.
        return_normalized: also return `Samples.normalized` (one more decoding step, to feed
            the last token; on the fast path only, else it stays None).
    """
    if isinstance(prompt, str):
        prompts = [prompt] * (batch_size if batch_size is not None else 1)
    else:
        prompts = list(prompt)
        if batch_size is not None and batch_size != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but batch_size={batch_size}.")
    if gen_len < 1:
        raise ValueError(f"gen_len must be at least 1, got {gen_len}.")
    device = model.cfg.device
    prompt_ids, prompt_mask = tokenize_prompts(model, prompts, prepend_bos)
    if seed is not None:
        if generator is not None:
            raise ValueError("Pass either seed or generator, not both.")
        generator = torch.Generator(device=device).manual_seed(seed)

    batch, states = prompt_ids.shape[0], []
    if fast and use_cache and fast_forward.unsupported_reason(model) is None:
        next_logits = _fast_next_logits(model, batch, prompt_ids.shape[1] + gen_len, states)
    else:
        next_logits = _tl_next_logits(model, batch, use_cache)
    new_tokens = _sampling_loop(
        model, prompt_ids, prompt_mask, gen_len, (temperature, top_k, top_p), generator,
        stop_at_eos, next_logits,
    )
    sample_ids = torch.cat([prompt_ids, new_tokens], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(new_tokens)], dim=1)
    samples = [p + _decode(model, row, stop_at_eos) for p, row in zip(prompts, new_tokens)]
    normalized = None
    if return_normalized and len(states) == gen_len:  # fast path, no early stop at EOS
        next_logits(sample_ids, attention_mask)  # the state after the last token
        normalized = torch.stack(states, dim=1)
    return Samples(sample_ids, samples, attention_mask, prompt_ids.shape[1], normalized)


def _sampling_loop(
    model: HookedTransformer,
    prompt_ids: Int[Tensor, "batch prefix_len"],
    prompt_mask: Int[Tensor, "batch prefix_len"],
    gen_len: int,
    sampling: tuple[float, int | None, float | None],
    generator: torch.Generator | None,
    stop_at_eos: bool,
    next_logits: Callable[[Tensor, Tensor], Tensor],
) -> Int[Tensor, "batch gen_len"]:
    """The decoding loop: one forward pass over the prompt, then one per new token."""
    batch = prompt_ids.shape[0]
    eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    tokens, mask = prompt_ids, prompt_mask
    logits = next_logits(tokens, mask)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    new_tokens = []
    for step in range(gen_len):
        next_token = sample_next_token(logits, *sampling, generator=generator)
        if stop_at_eos and eos is not None:
            next_token = torch.where(finished, eos, next_token)
            finished |= next_token == eos
            if finished.all():
                new_tokens.append(next_token)
                pad = next_token.new_full((batch, gen_len - step - 1), eos)
                return torch.cat([torch.stack(new_tokens, dim=1), pad], dim=1)
        new_tokens.append(next_token)
        if step == gen_len - 1:
            break
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token[:, None])], dim=1)
        logits = next_logits(tokens, mask)
    return torch.stack(new_tokens, dim=1)


def _tl_next_logits(model: HookedTransformer, batch: int, use_cache: bool):
    """Next-token logits from HookedTransformer.forward, with TransformerLens's own KV cache."""
    cache = None
    if use_cache:
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)
    seen = 0

    def next_logits(tokens: Tensor, mask: Tensor) -> Tensor:
        nonlocal seen
        if cache is None:  # the whole sequence again
            return model(tokens, attention_mask=mask)[:, -1]
        # Only the new tokens go through the model; the cache extends its own mask.
        new_tokens, new_mask = tokens[:, seen:], mask[:, seen:]
        seen = tokens.shape[1]
        return model(new_tokens, attention_mask=new_mask, past_kv_cache=cache)[:, -1]

    return next_logits


def _fast_next_logits(model: HookedTransformer, batch: int, max_len: int, states: list[Tensor]):
    """Next-token logits from the fast path: weights laid out once, a preallocated KV cache.
    Appends the final normalised residual of each last position to `states`."""
    weights = fast_forward.get_fast_weights(model)
    cache = fast_forward.make_cache(weights, batch, max_len, model.cfg.dtype, model.cfg.device)
    seen = 0

    def next_logits(tokens: Tensor, mask: Tensor) -> Tensor:
        nonlocal seen
        normalized = fast_forward.forward(weights, tokens[:, seen:], mask, cache, start=seen)
        seen = tokens.shape[1]
        states.append(normalized[:, -1])
        return fast_forward.unembed(weights.output, normalized[:, -1])

    return next_logits


def _decode(model: HookedTransformer, tokens: Int[Tensor, " gen_len"], stop_at_eos: bool) -> str:
    ids = tokens.tolist()
    eos = model.tokenizer.eos_token_id
    if stop_at_eos and eos in ids:
        ids = ids[: ids.index(eos)]
    return model.tokenizer.decode(ids)
