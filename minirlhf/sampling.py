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
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from minirlhf.runtime import fast_path as fast
from minirlhf.runtime.tokens import tokenize_texts
from minirlhf.token_stats import ChunkLogits
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
    computed it; the trainer reads the policy's log-probs and values from it (zeros after every
    row had ended)."""
    response_mask: Int[Tensor, "batch gen_len"] | None = None
    """With `stop_at_eos`: 1 for each answer's real tokens (its EOS, or the token that completed
    the stop string, included), 0 for the padding after (None: every answer has gen_len)."""
    ended: Bool[Tensor, " batch"] | None = None
    """With `stop_at_eos`: whether each answer ended before the limit (False: truncated)."""
    logprobs: Float[Tensor, "batch gen_len"] | None = None
    """With `return_logprobs`: the log-prob of each token under the distribution the sampler
    drew it from, before top-k and top-p (softmax(logits / temperature))."""
    responses: list[str] | None = None
    """Each answer's text alone: no prompt, no EOS, nothing from the stop string on."""
    prompts: list[str] | None = None
    """Each row's prompt text, as the model read it."""


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


def get_chunk_logits(
    model: HookedTransformer,
    logits: Float[Tensor, "batch gen_len d_vocab"] | None,
    final_residual: Float[Tensor, "batch gen_len d_model"],
    temperature: float,
) -> ChunkLogits:
    """Logits / temperature at a slice of positions: sliced from `logits` when a forward pass
    computed them, else the slice of the final residual stream unembedded (fast path)."""
    if logits is not None:
        return lambda positions: apply_temperature(logits[:, positions], temperature)
    output = fast.get_output_weights(model)
    return lambda positions: apply_temperature(
        fast.unembed(output, final_residual[:, positions]), temperature)


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
    stop_string: str | None = None,
    return_logprobs: bool = False,
) -> Samples:
    """Sample `gen_len` tokens after each prompt (a string repeated `batch_size` times, or a
    list: one row each), from `sampling`'s distribution.

    Args:
        seed: the same seed gives the same samples; or `generator`, a `torch.Generator` on the
            model's device (the trainer keeps one across phases). Neither: torch's global state.
        stop_at_eos: an answer ends at its first EOS (or `stop_string`); the row's later tokens
            are EOS and `Samples.response_mask` marks the end.
        fast_path: decode on `runtime.fast_path` (the same logits, weights laid out once;
            1.4-2.3x faster on CPU) where it can run the model, else `HookedTransformer.forward`.
        return_final_residual, return_logprobs: also return `Samples.final_residual` (on the
            fast path only) and `Samples.logprobs`.
    """
    prompts = _check_arguments(prompt, batch_size, gen_len, seed, generator)
    generator = generator or _make_generator(seed, model)
    prompt_ids, prompt_mask = tokenize_prompts(model, prompts, prepend_bos)
    check_context(prompt_ids.shape[1], gen_len, model.cfg.n_ctx)
    decoder = _make_decoder(model, len(prompts), prompt_ids.shape[1] + gen_len,
                            fast.use_fast_path(model, fast_path))
    eos = _eos_id(model) if stop_at_eos else None
    new_tokens, logprobs = _sampling_loop(decoder, prompt_ids, prompt_mask, gen_len, sampling,
                                          generator, eos, return_logprobs)
    final_residual = _get_final_residual(decoder, gen_len) if return_final_residual else None
    samples = _join_samples(prompt_ids, prompt_mask, new_tokens, prompts, final_residual)
    return _add_answers(model, samples._replace(logprobs=logprobs), eos, stop_string, stop_at_eos)


def _add_answers(model: HookedTransformer, samples: Samples, eos: int | None,
                 stop_string: str | None, can_end: bool) -> Samples:
    """The samples with each answer's text, and where each ends (when answers can end)."""
    new_tokens = samples.sample_ids[:, samples.prefix_len :]
    lengths, ended = find_answer_ends(model, new_tokens, eos, stop_string)
    responses = [_decode(model, row[:n], eos, stop_string) for row, n in zip(new_tokens, lengths)]
    samples = samples._replace(texts=[p + r for p, r in zip(samples.prompts, responses)],
                               responses=responses)
    if not can_end:
        return samples
    positions = torch.arange(new_tokens.shape[1], device=new_tokens.device)
    return samples._replace(response_mask=(positions < lengths[:, None]).long(), ended=ended)


def _check_arguments(prompt: str | list[str], batch_size: int | None, gen_len: int,
                     seed: int | None, generator: torch.Generator | None) -> list[str]:
    """The prompts, one per row, once `get_samples`' arguments are found to agree."""
    prompts = [prompt] * (batch_size or 1) if isinstance(prompt, str) else list(prompt)
    if batch_size is not None and batch_size != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts but batch_size={batch_size}.")
    if gen_len < 1:
        raise ValueError(f"gen_len must be at least 1, got {gen_len}.")
    if seed is not None and generator is not None:
        raise ValueError("get_samples takes a seed or a generator, not both.")
    return prompts


def _make_decoder(model: HookedTransformer, batch: int, max_len: int,
                  on_fast_path: bool) -> "_FastDecoder | _HookedDecoder":
    """What computes each next token's logits: the fast path (weights laid out once, a cache of
    `max_len` positions), or `HookedTransformer.forward` with TransformerLens's own cache."""
    return _FastDecoder(model, batch, max_len) if on_fast_path else _HookedDecoder(model, batch)


def _get_final_residual(
    decoder: "_FastDecoder | _HookedDecoder", gen_len: int
) -> Float[Tensor, "batch gen_len d_model"] | None:
    """The final normalised residual stream of each generated token's state, on the fast path
    only; zeros at the positions left after every row had ended (padding, never read)."""
    if not isinstance(decoder, _FastDecoder):
        return None
    residual = torch.stack(decoder.final_residuals, dim=1)
    return torch.nn.functional.pad(residual, (0, 0, 0, gen_len - residual.shape[1]))


def _join_samples(
    prompt_ids: Int[Tensor, "batch prefix_len"],
    prompt_mask: Int[Tensor, "batch prefix_len"],
    new_tokens: Int[Tensor, "batch gen_len"],
    prompts: list[str],
    final_residual: Float[Tensor, "batch gen_len d_model"] | None,
) -> Samples:
    """The rollout: each row's prompt tokens followed by its generated ones, and their mask
    (the texts come with the answers, `_add_answers`)."""
    sample_ids = torch.cat([prompt_ids, new_tokens], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(new_tokens)], dim=1)
    return Samples(sample_ids, [], attention_mask, prompt_ids.shape[1], final_residual,
                   prompts=prompts)


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


def find_answer_ends(
    model: HookedTransformer, new_tokens: Int[Tensor, "batch gen_len"], eos: int | None,
    stop_string: str | None = None,
) -> tuple[Int[Tensor, " batch"], Bool[Tensor, " batch"]]:
    """Each answer's length (its tokens up to and including its first EOS, or the token whose
    decoding completes `stop_string`) and whether it ended before gen_len tokens ran out."""
    batch, gen_len = new_tokens.shape
    is_eos = torch.zeros_like(new_tokens, dtype=torch.bool) if eos is None else new_tokens == eos
    ended = is_eos.any(dim=-1)
    lengths = torch.where(ended, is_eos.int().argmax(dim=-1) + 1, gen_len)
    for row in range(batch if stop_string else 0):
        ids = new_tokens[row, : lengths[row]].tolist()
        if stop_string not in model.tokenizer.decode(ids):
            continue
        end = next(t for t in range(1, len(ids) + 1)
                   if stop_string in model.tokenizer.decode(ids[:t]))
        lengths[row], ended[row] = end, True
    return lengths, ended


def _sampling_loop(
    decoder: "_FastDecoder | _HookedDecoder",
    prompt_ids: Int[Tensor, "batch prefix_len"],
    prompt_mask: Int[Tensor, "batch prefix_len"],
    gen_len: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    eos: int | None,
    return_logprobs: bool = False,
) -> tuple[Int[Tensor, "batch gen_len"], Float[Tensor, "batch gen_len"] | None]:
    """The decoding loop: one forward pass over the prompt, then one per new token. With `eos`,
    a row that emitted it keeps emitting it, and the loop ends once every row has (the rest is
    EOS, with log-prob 0). Returns the tokens and, if asked, each one's log-prob."""
    tokens, mask = prompt_ids, prompt_mask
    logits = decoder.next_logits(tokens, mask)
    finished = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
    new_tokens, logprobs = [], []
    for step in range(gen_len):
        check_logits(logits, step)
        next_token = sample_next_token(logits, sampling.temperature, sampling.top_k,
                                       sampling.top_p, generator=generator)
        if eos is not None:
            next_token = torch.where(finished, eos, next_token)
            finished |= next_token == eos
        new_tokens.append(next_token)
        if return_logprobs:
            tempered = apply_temperature(logits, sampling.temperature).log_softmax(dim=-1)
            logprobs.append(tempered.gather(-1, next_token[:, None]).squeeze(-1))
        if step == gen_len - 1 or bool(finished.all()):
            break
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token[:, None])], dim=1)
        logits = decoder.next_logits(tokens, mask)
    pad = gen_len - len(new_tokens)
    new = torch.nn.functional.pad(torch.stack(new_tokens, dim=1), (0, pad), value=eos or 0)
    if not return_logprobs:
        return new, None
    return new, torch.nn.functional.pad(torch.stack(logprobs, dim=1), (0, pad))


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


def _decode(model: HookedTransformer, tokens: Int[Tensor, " length"], eos: int | None,
            stop_string: str | None) -> str:
    """An answer's text: its tokens without the EOS, cut before the stop string."""
    ids = tokens.tolist()
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    text = model.tokenizer.decode(ids)
    return text.split(stop_string)[0] if stop_string else text
