"""Rollouts: a hand-written, batched, KV-cached sampler for HookedTransformers.

Stage 2 of the pipeline. Written out (rather than calling `HookedTransformer.generate`) so every
step is visible: tokenize and left-pad the prompts, run the prompt once to fill the key-value cache,
then feed one token at a time. Prompts are left-padded so every prompt ends at the same position
(`prefix_len`) and generated token t sits at position `prefix_len + t` in every row.

Sampling follows the model's own softmax: `softmax(logits / temperature)`, optionally truncated to
the top-k tokens and/or the smallest set whose probability reaches top_p (Holtzman et al. 2020).
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from minirlhf.runtime import fast_path as fast
from minirlhf.runtime.tokens import tokenize_texts
from minirlhf.validation import check_at_least, check_interval, check_positive


@dataclass(frozen=True)
class SamplingConfig:
    """The distribution each token is drawn from: softmax(logits / temperature), truncated."""

    temperature: float = 1.0
    """Divides the logits; the PPO log-probs and the KL use logits / temperature too."""
    top_k: int | None = None
    """Draw only from the k most likely tokens (None: no top-k)."""
    top_p: float | None = None
    """Draw only from the smallest set of tokens whose probability reaches top_p (None: off)."""

    def __post_init__(self):
        check_positive(self, ["temperature"])
        check_at_least(self, ["top_k"], optional=True)
        check_interval(self, ["top_p"], 0.0, 1.0, open_low=True, optional=True)


class Samples(NamedTuple):
    """What a rollout produced."""

    sample_ids: Int[Tensor, "batch seq"]
    """Prompt tokens (left-padded) followed by `gen_len` generated tokens."""
    texts: list[str]
    """Each prompt's text followed by its decoded continuation."""
    attention_mask: Int[Tensor, "batch seq"]
    """1 for real tokens, 0 for left padding."""
    prefix_len: int
    """Position of the first generated token (the padded prompt length)."""
    final_residual: Float[Tensor, "batch gen_len d_model"] | None = None
    """On the fast path, with `return_final_residual`: the final normalised residual stream in
    each state a token was chosen in (positions `prefix_len - 1 .. seq - 2`), as the sampler
    computed it; the trainer reads the policy's log-probs and values from it."""


PLAIN_SAMPLING = SamplingConfig()
"""Plain sampling from the model's softmax: temperature 1, no top-k, no top-p."""


def tokenize_prompts(
    model: HookedTransformer, prompts: list[str], prepend_bos: bool
) -> tuple[Int[Tensor, "batch prefix_len"], Int[Tensor, "batch prefix_len"]]:
    """Token ids of the prompts, left-padded to a common length, and their attention mask."""
    return tokenize_texts(model, prompts, prepend_bos, padding_side="left")


def apply_temperature(
    logits: Float[Tensor, "*batch d_vocab"], temperature: float
) -> Float[Tensor, "*batch d_vocab"]:
    """The logits of the distribution tokens are drawn from, in float32: logits / temperature.
    Every log-prob, entropy and KL of the policy and the reference is computed from these."""
    return logits.float() / temperature


def filter_logits(
    logits: Float[Tensor, "batch d_vocab"],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Float[Tensor, "batch d_vocab"]:
    """Logits of the sampling distribution: scaled by 1/temperature, truncated by top-k / top-p.

    Tokens outside the kept set get -inf, so `softmax` of the result is the distribution sampled.
    """
    logits = apply_temperature(logits, temperature)
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
    sampling: SamplingConfig = PLAIN_SAMPLING,
    prepend_bos: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_at_eos: bool = False,
    fast_path: bool = True,
    return_final_residual: bool = False,
) -> Samples:
    """Sample `gen_len` tokens after each prompt.

    Args:
        prompt: one prompt repeated `batch_size` times, or a list of prompts (one row each).
        sampling: temperature, top-k and top-p.
        seed: the same seed gives the same samples (None, and no generator: torch's global
            random state).
        generator: a `torch.Generator` on the model's device to draw from instead of a seed
            (the trainer keeps one across phases).
        stop_at_eos: once a row emits EOS, its later tokens are all EOS (rows keep equal length).
        fast_path: decode on `minirlhf.runtime.fast_path` (weights laid out once; the same logits,
            1.4-2.3x faster on CPU in benchmarks/rollout_speed.py) where it can run the model;
            else, or with False, on `HookedTransformer.forward` with its own cache.
        return_final_residual: also return `Samples.final_residual` (on the fast path only,
            and not when rows stopped early at EOS; else it stays None).
    """
    prompts = [prompt] * (batch_size or 1) if isinstance(prompt, str) else list(prompt)
    if batch_size is not None and batch_size != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts but batch_size={batch_size}.")
    if gen_len < 1:
        raise ValueError(f"gen_len must be at least 1, got {gen_len}.")
    if seed is not None and generator is not None:
        raise ValueError("get_samples takes a seed or a generator, not both.")
    generator = generator or _make_generator(seed, model)
    prompt_ids, prompt_mask = tokenize_prompts(model, prompts, prepend_bos)
    check_context(prompt_ids.shape[1], gen_len, model.cfg.n_ctx)
    decoder = (_FastDecoder(model, len(prompts), prompt_ids.shape[1] + gen_len)
               if fast.use_fast_path(model, fast_path)
               else _HookedDecoder(model, len(prompts)))
    new_tokens = _sampling_loop(decoder, prompt_ids, prompt_mask, gen_len, sampling, generator,
                                _eos_id(model) if stop_at_eos else None)
    sample_ids = torch.cat([prompt_ids, new_tokens], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(new_tokens)], dim=1)
    samples = [p + _decode(model, row, stop_at_eos) for p, row in zip(prompts, new_tokens)]
    final_residual = None
    if return_final_residual and isinstance(decoder, _FastDecoder) and \
            len(decoder.final_residuals) == gen_len:  # not stopped early at EOS
        final_residual = torch.stack(decoder.final_residuals, dim=1)
    return Samples(sample_ids, samples, attention_mask, prompt_ids.shape[1], final_residual)


def check_context(prefix_len: int, gen_len: int, n_ctx: int):
    """Refuse, before sampling, a prompt and gen_len that do not fit the model's context."""
    if prefix_len + gen_len > n_ctx:
        raise ValueError(
            f"The prompt takes {prefix_len} tokens and gen_len is {gen_len}: "
            f"{prefix_len + gen_len} positions, but the model reads at most {n_ctx}. "
            "Shorten the prompt or gen_len."
        )


def _make_generator(seed: int | None, model: HookedTransformer) -> torch.Generator | None:
    """A private generator on the model's device, seeded (None: torch's global random state)."""
    return None if seed is None else torch.Generator(model.cfg.device).manual_seed(seed)


def _eos_id(model: HookedTransformer) -> int | None:
    return model.tokenizer.eos_token_id if model.tokenizer is not None else None


def _sampling_loop(
    decoder: "_FastDecoder | _HookedDecoder",
    prompt_ids: Int[Tensor, "batch prefix_len"],
    prompt_mask: Int[Tensor, "batch prefix_len"],
    gen_len: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    eos: int | None,
) -> Int[Tensor, "batch gen_len"]:
    """The decoding loop: one forward pass over the prompt, then one per new token. With `eos`,
    a row that emitted it keeps emitting it, and the loop ends once every row has."""
    batch = prompt_ids.shape[0]
    tokens, mask = prompt_ids, prompt_mask
    logits = decoder.next_logits(tokens, mask)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    new_tokens = []
    for step in range(gen_len):
        check_logits(logits, step)
        next_token = sample_next_token(logits, sampling.temperature, sampling.top_k,
                                       sampling.top_p, generator=generator)
        if eos is not None:
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
        logits = decoder.next_logits(tokens, mask)
    return torch.stack(new_tokens, dim=1)


def check_logits(logits: Float[Tensor, "batch d_vocab"], step: int):
    """Refuse logits no token can be drawn from (NaN, or every token -inf): the draw would
    otherwise return an arbitrary token (the last of the vocabulary, often EOS) without a word."""
    broken = logits.isnan().any(dim=-1) | ~(logits > float("-inf")).any(dim=-1)
    if bool(broken.any()):
        rows = broken.nonzero().flatten().tolist()
        raise FloatingPointError(
            f"The model's next-token logits at generated token {step} are NaN or all -inf in "
            f"rows {rows[:8]}: its weights or inputs are broken (a damaged checkpoint, training "
            "that diverged, or a hook that returns NaN), so there is nothing to sample."
        )


class _HookedDecoder:
    """Next-token logits from `HookedTransformer.forward`, with TransformerLens's own KV cache:
    only the tokens not seen yet go through the model."""

    def __init__(self, model: HookedTransformer, batch: int):
        self.model = model
        self.cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)
        self.seen = 0

    def next_logits(
        self, tokens: Int[Tensor, "batch seq"], mask: Int[Tensor, "batch seq"]
    ) -> Float[Tensor, "batch d_vocab"]:
        new_tokens, new_mask = tokens[:, self.seen :], mask[:, self.seen :]
        self.seen = tokens.shape[1]  # the cache extends its own mask
        return self.model(new_tokens, attention_mask=new_mask, past_kv_cache=self.cache)[:, -1]


class _FastDecoder:
    """Next-token logits from the fast path: weights laid out once, a preallocated KV cache.
    Keeps the final normalised residual stream of each last position in `final_residuals`."""

    def __init__(self, model: HookedTransformer, batch: int, max_len: int):
        self.weights = fast.get_fast_weights(model)
        self.cache = fast.make_cache(self.weights, batch, max_len, model.cfg.dtype,
                                     model.cfg.device)
        self.seen = 0
        self.final_residuals: list[Float[Tensor, "batch d_model"]] = []

    def next_logits(
        self, tokens: Int[Tensor, "batch seq"], mask: Int[Tensor, "batch seq"]
    ) -> Float[Tensor, "batch d_vocab"]:
        residual = fast.forward(self.weights, tokens[:, self.seen :], mask, self.cache,
                                start=self.seen)
        self.seen = tokens.shape[1]
        self.final_residuals.append(residual[:, -1])
        return fast.unembed(self.weights.output, residual[:, -1])


def _decode(model: HookedTransformer, tokens: Int[Tensor, " gen_len"], stop_at_eos: bool) -> str:
    ids = tokens.tolist()
    eos = model.tokenizer.eos_token_id
    if stop_at_eos and eos in ids:
        ids = ids[: ids.index(eos)]
    return model.tokenizer.decode(ids)
