"""Tests for minirlhf.sampling, the hand-written KV-cached sampler, on tiny random models.

Oracles: greedy decoding written here with plain, uncached, unpadded forward passes (one prompt
at a time); the uncached forward pass for the cached one; the model's own softmax for the sampling
distribution (empirical frequencies of many draws, with a chi-square bound); and a top-p example
worked by hand. Each check also rejects a plausible wrong sampler or filter written out here.
"""

import copy
import math
from collections.abc import Callable

import pytest
import torch
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from minirlhf.runtime.loading import load_tiny_model
from minirlhf.sampling import (
    SamplingConfig,
    filter_logits,
    get_samples,
    sample_next_token,
    tokenize_prompts,
)

GREEDY = SamplingConfig(top_k=1)

PROMPT = "This is"
PROMPTS = ["Hello", "This is a much longer prompt, with commas", "A"]


def prompt_tokens(model: HookedTransformer, prompt: str, prepend_bos: bool) -> list[int]:
    """TransformerLens's own tokenisation of one prompt (independent of `tokenize_prompts`)."""
    return model.to_tokens(prompt, prepend_bos=prepend_bos)[0].tolist()


def greedy_oracle(model: HookedTransformer, prompt_ids: list[int], gen_len: int) -> list[int]:
    """Argmax decoding of one unpadded prompt, re-running the whole sequence at every step."""
    tokens = torch.tensor([prompt_ids])
    for _ in range(gen_len):
        next_token = model(tokens)[0, -1].argmax()
        tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    return tokens[0, len(prompt_ids) :].tolist()


# ---------------------------------------------------------------- greedy decoding


def greedy_mismatch(sample_fn: Callable, model: HookedTransformer) -> str | None:
    """None if sample_fn(model, prompts, gen_len) with top-k 1 gives the greedy oracle's tokens,
    else the first row that does not."""
    gen_len = 6
    for prompts in [[PROMPT, PROMPT], PROMPTS]:
        result = sample_fn(model, prompts, gen_len)
        for row, prompt in enumerate(prompts):
            expected = greedy_oracle(model, prompt_tokens(model, prompt, True), gen_len)
            tokens = result.sample_ids[row, result.prefix_len :].tolist()
            if tokens != expected:
                return f"prompt {prompt!r} in {prompts}: got {tokens}, expected {expected}"
    return None


def real_top_k_1(model, prompts, gen_len):
    return get_samples(model, prompts, gen_len=gen_len, sampling=GREEDY, seed=0)


def top_k_not_passed_on(model, prompts, gen_len):
    """top_k dropped on its way to the sampling step: plain sampling instead of greedy."""
    return get_samples(model, prompts, gen_len=gen_len, seed=0)


def greedy_off_by_one(model, prompts, gen_len):
    """Reads the logits of the second-to-last position, which predict the last prompt token."""
    ids, mask = tokenize_prompts(model, prompts, prepend_bos=True)
    prefix_len = ids.shape[1]
    for _ in range(gen_len):
        next_token = model(ids, attention_mask=mask)[:, -2].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    return type("Result", (), {"sample_ids": ids, "prefix_len": prefix_len})


def greedy_right_padded(model, prompts, gen_len):
    """Pads on the right: short prompts continue from a pad token, not from their last token."""
    rows = [prompt_tokens(model, p, True) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [model.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    for _ in range(gen_len):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return type("Result", (), {"sample_ids": ids, "prefix_len": width})


def tl_top_k_1(model, prompts, gen_len):
    return get_samples(model, prompts, gen_len=gen_len, sampling=GREEDY, seed=0, fast_path=False)


@pytest.mark.parametrize("sampler", [real_top_k_1, tl_top_k_1], ids=["fast", "transformer_lens"])
def test_top_k_1_is_greedy_decoding(tiny_model, sampler):
    """Also the left-padding oracle: a batch of prompts of different lengths, decoded together,
    gives each prompt's own unpadded greedy continuation. Both decoding paths."""
    problem = greedy_mismatch(sampler, tiny_model)
    assert problem is None, problem


def test_fast_and_transformer_lens_paths_draw_the_same_samples(tiny_model):
    """Same seed, same settings: the same tokens. The logits agree to ~1e-6 (test_fast_path.py),
    so a draw differs only on a near-exact tie at the top-p boundary or in the CDF, after which
    that row's later tokens differ too: one row of eight may (seen on one CPU with this seed);
    a path with a real error differs in every row."""
    for prompt, batch_size in [(PROMPT, 6), (PROMPTS, None)]:
        fast, slow = (
            get_samples(tiny_model, prompt, batch_size, gen_len=10, seed=5,
                        sampling=SamplingConfig(top_p=0.9), fast_path=f)
            for f in (True, False)
        )
        rows_equal = (fast.sample_ids == slow.sample_ids).all(dim=1)
        assert int((~rows_equal).sum()) <= 1, rows_equal


@pytest.mark.parametrize("wrong", [top_k_not_passed_on, greedy_off_by_one, greedy_right_padded])
def test_greedy_check_rejects_wrong_versions(tiny_model, wrong):
    assert greedy_mismatch(wrong, tiny_model) is not None


# ---------------------------------------------------------------- the KV cache


def sample_without_a_cache(model, prompt, batch_size, gen_len, seed):
    """The oracle: the whole sequence through the model at every step, drawing from the same
    generator with the same `sample_next_token`."""
    prompts = [prompt] * batch_size if isinstance(prompt, str) else prompt
    ids, mask = tokenize_prompts(model, prompts, prepend_bos=True)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(gen_len):
        logits = model(ids, attention_mask=mask)[:, -1]
        next_token = sample_next_token(logits, generator=generator)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token[:, None])], dim=1)
    return type("Result", (), {"sample_ids": ids, "attention_mask": mask})


def cache_mismatch(sample_fn: Callable, model: HookedTransformer) -> str | None:
    """None if sample_fn (cached) gives the same tokens as the uncached oracle, for the same
    seed; else the first difference."""
    for prompt, batch_size in [(PROMPT, 4), (PROMPTS, None)]:
        uncached = sample_without_a_cache(model, prompt, batch_size, gen_len=8, seed=3)
        cached = sample_fn(model, prompt, batch_size, gen_len=8, seed=3)
        if not torch.equal(cached.sample_ids, uncached.sample_ids):
            return f"{prompt!r}: cached {cached.sample_ids}, uncached {uncached.sample_ids}"
        if not torch.equal(cached.attention_mask, uncached.attention_mask):
            return f"{prompt!r}: attention masks differ"
    return None


def fast_cached(model, prompt, batch_size, gen_len, seed):
    return get_samples(model, prompt, batch_size, gen_len=gen_len, seed=seed)


def hooked_cached(model, prompt, batch_size, gen_len, seed):
    return get_samples(model, prompt, batch_size, gen_len=gen_len, seed=seed, fast_path=False)


def cache_forgotten_in_the_loop(model, prompt, batch_size, gen_len, seed):
    """Fills the cache with the prompt, then forgets to pass it: each step sees one token."""
    prompts = [prompt] * batch_size if isinstance(prompt, str) else prompt
    ids, mask = tokenize_prompts(model, prompts, prepend_bos=True)
    generator = torch.Generator().manual_seed(seed)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(prompts))
    logits = model(ids, attention_mask=mask, past_kv_cache=cache)[:, -1]
    new_tokens = []
    for _ in range(gen_len):
        next_token = sample_next_token(logits, generator=generator)
        new_tokens.append(next_token)
        logits = model(next_token[:, None])[:, -1]
    new_tokens = torch.stack(new_tokens, dim=1)
    return type("Result", (), {
        "sample_ids": torch.cat([ids, new_tokens], dim=1),
        "attention_mask": torch.cat([mask, torch.ones_like(new_tokens)], dim=1),
    })


@pytest.mark.parametrize("sampler", [fast_cached, hooked_cached])
def test_cache_gives_the_uncached_samples(tiny_model, sampler):
    problem = cache_mismatch(sampler, tiny_model)
    assert problem is None, problem


def test_cache_check_rejects_a_wrong_cached_loop(tiny_model):
    assert cache_mismatch(cache_forgotten_in_the_loop, tiny_model) is not None


# ---------------------------------------------------------------- seeds, shapes, text


def reproducibility_problem(sample_fn: Callable, model: HookedTransformer) -> str | None:
    """None if the same seed gives the same samples and a different seed different ones."""
    first, again, other = (sample_fn(model, seed) for seed in (0, 0, 1))
    if not torch.equal(first.sample_ids, again.sample_ids):
        return "seed 0 twice gave different samples"
    if torch.equal(first.sample_ids, other.sample_ids):
        return "seeds 0 and 1 gave the same samples"
    return None


def real_seeded(model, seed):
    return get_samples(model, PROMPT, batch_size=4, gen_len=10, seed=seed)


def seed_ignored(model, seed):
    """Draws from torch's global generator: the seed changes nothing, repeats differ."""
    return get_samples(model, PROMPT, batch_size=4, gen_len=10)


def test_same_seed_same_samples(tiny_model):
    problem = reproducibility_problem(real_seeded, tiny_model)
    assert problem is None, problem


def test_reproducibility_check_rejects_an_ignored_seed(tiny_model):
    assert reproducibility_problem(seed_ignored, tiny_model) is not None


def test_a_kept_generator_moves_on_and_a_reseeded_one_repeats(tiny_model):
    generator = torch.Generator().manual_seed(5)
    first = get_samples(tiny_model, PROMPT, 4, gen_len=6, generator=generator)
    second = get_samples(tiny_model, PROMPT, 4, gen_len=6, generator=generator)
    assert not torch.equal(first.sample_ids, second.sample_ids)
    assert torch.equal(first.sample_ids, get_samples(tiny_model, PROMPT, 4, gen_len=6,
                                                     seed=5).sample_ids)


def test_a_seed_and_a_generator_together_are_refused(tiny_model):
    """Which one would draw is not obvious, so neither does."""
    with pytest.raises(ValueError, match="a seed or a generator, not both"):
        get_samples(tiny_model, PROMPT, 2, gen_len=3, seed=5,
                    generator=torch.Generator().manual_seed(5))


def test_shapes_and_text_of_a_repeated_prompt(tiny_model):
    result = get_samples(tiny_model, PROMPT, batch_size=3, gen_len=5, seed=0)
    prompt_ids = prompt_tokens(tiny_model, PROMPT, True)
    assert result.prefix_len == len(prompt_ids)
    assert result.sample_ids.shape == (3, len(prompt_ids) + 5)
    assert result.sample_ids.dtype == torch.long
    assert torch.equal(result.attention_mask, torch.ones_like(result.sample_ids))
    assert (result.sample_ids[:, : result.prefix_len] == torch.tensor(prompt_ids)).all()
    assert len(result.texts) == 3
    for row, sample in zip(result.sample_ids, result.texts, strict=True):
        assert sample == PROMPT + tiny_model.tokenizer.decode(row[result.prefix_len :])


def test_left_padding_of_prompts_of_different_lengths(tiny_model):
    result = get_samples(tiny_model, PROMPTS, gen_len=4, seed=0)
    lengths = [len(prompt_tokens(tiny_model, p, True)) for p in PROMPTS]
    assert result.prefix_len == max(lengths)
    for row, (prompt, length) in enumerate(zip(PROMPTS, lengths, strict=True)):
        pad = result.prefix_len - length
        expected_mask = [0] * pad + [1] * (length + 4)
        assert result.attention_mask[row].tolist() == expected_mask
        real_prompt = result.sample_ids[row, pad : result.prefix_len].tolist()
        assert real_prompt == prompt_tokens(tiny_model, prompt, True)
        assert result.texts[row].startswith(prompt)


def test_bad_arguments(tiny_model, printable_model):
    with pytest.raises(ValueError, match="batch_size"):
        get_samples(tiny_model, PROMPTS, batch_size=5)
    with pytest.raises(ValueError, match="gen_len"):
        get_samples(tiny_model, PROMPT, gen_len=0)
    with pytest.raises(ValueError, match="prepend_bos"):
        get_samples(printable_model, "", prepend_bos=False)


def test_stop_at_eos_pads_with_eos_and_cuts_the_text():
    """A model that emits EOS often: after a row's first EOS, every later token is EOS."""
    model = load_tiny_model(n_layers=1, d_model=32, n_heads=2)
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():
        model.unembed.b_U[eos] = 10.0  # e^10 against ~50k logits near 0: P(EOS) about 0.3
    result = get_samples(model, PROMPT, batch_size=8, gen_len=12, seed=0, stop_at_eos=True)
    generated = result.sample_ids[:, result.prefix_len :]
    assert generated.shape == (8, 12)
    cut_after_text = 0  # rows with some text, then EOS
    for row, sample in zip(generated.tolist(), result.texts, strict=True):
        first = row.index(eos) if eos in row else len(row)
        assert all(token == eos for token in row[first:])
        assert sample == PROMPT + model.tokenizer.decode(row[:first])
        cut_after_text += 0 < first < len(row)
    assert cut_after_text > 0


# ---------------------------------------------------------------- the sampling distribution

N_DRAWS = 10_000
TEMPERATURE, TOP_K = 2.0, 5
CHI2_LIMIT = 30.0
"""Chi-square bound for 5 cells (4 degrees of freedom): P(chi2 > 30) is about 5e-6 for a correct
sampler, so noise cannot fail the test; a wrong temperature gives chi2 in the thousands here."""


@pytest.fixture(scope="module")
def peaked_model(make_printable_model) -> HookedTransformer:
    """The 94-token model with a spread of unembedding biases, so the top 5 differ clearly."""
    model = make_printable_model(seed=1)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        model.unembed.b_U[:] = torch.randn(model.cfg.d_vocab, generator=generator) * 2.0
    return model


def oracle_probabilities(model: HookedTransformer) -> tuple[list[int], torch.Tensor]:
    """softmax(top-5 logits / 2), computed directly from one forward pass of the prompt."""
    logits = model(model.to_tokens("A", prepend_bos=False))[0, -1]
    top = logits.topk(TOP_K)
    return top.indices.tolist(), torch.softmax(top.values / TEMPERATURE, dim=-1)


def draw_mismatch(sample_fn: Callable, model: HookedTransformer) -> str | None:
    """None if the first-token frequencies of N_DRAWS samples fit the oracle probabilities (chi-
    square), else how they do not."""
    tokens, probs = oracle_probabilities(model)
    first_tokens = sample_fn(model)
    outside = [token for token in first_tokens.unique().tolist() if token not in tokens]
    if outside:
        return f"drew tokens {outside}, outside the top {TOP_K} {tokens}"
    counts = torch.tensor([(first_tokens == token).sum().item() for token in tokens])
    expected = probs * len(first_tokens)
    assert expected.min() > 50, "each cell needs enough expected draws for the chi-square bound"
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    if not chi2 < CHI2_LIMIT:
        return f"counts {counts.tolist()}, expected {expected.tolist()}: chi2 {chi2:.1f}"
    return None


def draw(model, temperature=TEMPERATURE, top_k=TOP_K) -> torch.Tensor:
    result = get_samples(
        model, "A", batch_size=N_DRAWS, gen_len=1, sampling=SamplingConfig(temperature, top_k),
        prepend_bos=False, seed=0,
    )
    return result.sample_ids[:, -1]


def draw_transformer_lens(model) -> torch.Tensor:
    result = get_samples(
        model, "A", batch_size=N_DRAWS, gen_len=1, sampling=SamplingConfig(TEMPERATURE, TOP_K),
        prepend_bos=False, seed=0, fast_path=False,
    )
    return result.sample_ids[:, -1]


@pytest.mark.parametrize("sampler", [draw, draw_transformer_lens], ids=["fast", "transformer_lens"])
def test_sampling_distribution_is_the_models_softmax(peaked_model, sampler):
    problem = draw_mismatch(sampler, peaked_model)
    assert problem is None, problem


@pytest.mark.parametrize(
    "wrong",
    [
        lambda model: draw(model, temperature=1.0),  # temperature forgotten
        lambda model: draw(model, temperature=4.0),  # temperature applied twice
        lambda model: draw(model, top_k=None),  # top-k forgotten
    ],
    ids=["temperature_forgotten", "temperature_twice", "top_k_forgotten"],
)
def test_distribution_check_rejects_wrong_samplers(peaked_model, wrong):
    assert draw_mismatch(wrong, peaked_model) is not None


# ---------------------------------------------------------------- filter_logits

# Probabilities (0.15, 0.5, 0.05, 0.3), deliberately not sorted. Sorted: 0.5, 0.3, 0.15, 0.05;
# the mass ranked above each is 0, 0.5, 0.8, 0.95. top_p keeps a token while that mass < top_p.
PROBS = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
# At temperature 2 the distribution is proportional to sqrt(p): (0.207, 0.379, 0.120, 0.293),
# mass above each in rank order 0, 0.379, 0.672, 0.879, so top_p 0.7 keeps three tokens there.
FILTER_CASES = [
    # (temperature, top_k, top_p, indices kept)
    (1.0, None, 0.7, [1, 3]),
    (1.0, None, 0.4, [1]),
    (1.0, None, 0.9, [0, 1, 3]),
    (1.0, None, 1.0, [0, 1, 2, 3]),
    (1.0, 2, None, [1, 3]),
    (1.0, 3, 0.7, [1, 3]),
    (2.0, None, 0.7, [0, 1, 3]),
    (2.0, None, None, [0, 1, 2, 3]),
]


def filter_mismatch(fn: Callable) -> str | None:
    """None if fn keeps the hand-worked tokens with their tempered probabilities in every case,
    else the first case it gets wrong."""
    logits = PROBS.log()
    for temperature, top_k, top_p, kept in FILTER_CASES:
        case = f"temperature={temperature}, top_k={top_k}, top_p={top_p}"
        filtered = fn(logits, temperature, top_k, top_p)
        kept_by_fn = sorted(torch.isfinite(filtered[0]).nonzero().flatten().tolist())
        if kept_by_fn != kept:
            return f"{case}: kept {kept_by_fn}, expected {kept}"
        # The kept tokens have their tempered probabilities, renormalised.
        tempered = PROBS[0, kept] ** (1 / temperature)
        probs = filtered[0].softmax(-1)[kept]
        if not torch.allclose(probs, tempered / tempered.sum(), atol=1e-5):
            return f"{case}: probabilities {probs}, expected {tempered / tempered.sum()}"
    return None


def filter_mask_left_sorted(logits, temperature=1.0, top_k=None, top_p=None):
    """Computes the top-p mask in sorted order but applies it to the unsorted logits."""
    logits = logits / temperature
    if top_k is not None:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
    if top_p is not None:
        sorted_probs = logits.sort(descending=True).values.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def filter_drops_the_crossing_token(logits, temperature=1.0, top_k=None, top_p=None):
    """Drops the token whose probability carries the mass past top_p (keeps too few)."""
    logits = logits / temperature
    if top_k is not None:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(descending=True)
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) > top_p
        drop_sorted[:, 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def filter_top_p_before_temperature(logits, temperature=1.0, top_k=None, top_p=None):
    """Truncates the untempered distribution, then applies the temperature."""
    return filter_logits(logits, 1.0, top_k, top_p) / temperature


def test_filter_logits_hand_worked():
    problem = filter_mismatch(filter_logits)
    assert problem is None, problem


@pytest.mark.parametrize(
    "wrong",
    [filter_mask_left_sorted, filter_drops_the_crossing_token, filter_top_p_before_temperature],
)
def test_filter_check_rejects_wrong_versions(wrong):
    assert filter_mismatch(wrong) is not None


def test_filter_keeps_the_top_token_even_for_tiny_top_p():
    filtered = filter_logits(PROBS.log(), top_p=1e-6)
    assert torch.isfinite(filtered).sum() == 1 and math.isfinite(filtered[0, 1].item())


# ---------------------------------------------------------------- one draw, by inverse CDF

DRAW_PROBS = torch.tensor([0.0, 0.1, 0.0, 0.45, 0.05, 0.4, 0.0])
"""Hand-picked probabilities with zeros between and at both ends: a zero is never drawn."""


def inverse_cdf_mismatch(
    draw_fn: Callable, probs: torch.Tensor = DRAW_PROBS, n: int = 20_000
) -> str | None:
    """Chi-square of `n` draws against `probs` (the independent oracle: the numbers above): None
    if they fit, else the counts."""
    logits = probs.log().expand(n, -1)
    tokens = draw_fn(logits, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    if (counts[probs == 0] > 0).any():
        return f"counts {counts.tolist()}: drew a token of probability 0 ({probs.tolist()})"
    expected = probs[probs > 0].double() * n
    chi2 = ((counts[probs > 0] - expected) ** 2 / expected).sum().item()
    if not chi2 < 16.3:  # chi-square, 3 degrees of freedom, p = 0.001
        return f"counts {counts.tolist()} for probabilities {probs.tolist()}: chi2 {chi2:.1f}"
    return None


def test_sample_next_token_draws_the_softmax():
    problem = inverse_cdf_mismatch(sample_next_token)
    assert problem is None, problem


def shifted_by_one(logits, generator):
    """The inverse CDF read one token too far (searchsorted's index + 1)."""
    return (sample_next_token(logits, generator=generator) + 1).clamp(max=logits.shape[-1] - 1)


def uniform_over_vocab(logits, generator):
    return torch.randint(0, logits.shape[-1], (logits.shape[0],), generator=generator)


@pytest.mark.parametrize("wrong", [shifted_by_one, uniform_over_vocab])
def test_draw_check_rejects_wrong_samplers(wrong):
    assert inverse_cdf_mismatch(wrong) is not None


# ---------------------------------------------------------------- the states the sampler saw


def states_mismatch(states: torch.Tensor, model, result) -> str | None:
    """States against TransformerLens's own ln_final.hook_normalized over the finished samples,
    in the states that chose the tokens, prefix_len - 1 .. seq - 2 (padding never reaches a real
    position): None if they agree, else how they differ."""
    _, cache = model.run_with_cache(result.sample_ids, attention_mask=result.attention_mask)
    expected = cache["ln_final.hook_normalized"][:, result.prefix_len - 1 : -1]
    if states.shape != expected.shape:
        return f"states of shape {tuple(states.shape)}, expected {tuple(expected.shape)}"
    if not torch.allclose(states, expected, atol=1e-5):
        return f"states differ from the hook's by up to {(states - expected).abs().max():.3g}"
    return None


def test_return_final_residual_gives_the_states_of_the_forward_pass(tiny_model):
    result = get_samples(tiny_model, PROMPTS, gen_len=5, seed=0, return_final_residual=True)
    problem = states_mismatch(result.final_residual, tiny_model, result)
    assert problem is None, problem
    # The same check sees states shifted by one position (the state after each token instead
    # of the state it was chosen in).
    shifted = torch.cat([result.final_residual[:, 1:], result.final_residual[:, -1:]], dim=1)
    assert states_mismatch(shifted, tiny_model, result) is not None
    assert get_samples(tiny_model, PROMPTS, gen_len=5, seed=0, fast_path=False,
                       return_final_residual=True).final_residual is None


# ---------------------------------------------------------------- broken models


def nan_model(model: HookedTransformer) -> HookedTransformer:
    """A copy of `model` whose unembedding bias holds one NaN: every logit row is NaN."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.unembed.b_U[0] = float("nan")
    return broken


@pytest.mark.parametrize("fast_path", [True, False])
def test_nan_logits_are_refused_not_sampled(tiny_model, fast_path):
    with pytest.raises(FloatingPointError, match="NaN or all -inf"):
        get_samples(nan_model(tiny_model), PROMPT, 2, gen_len=3, seed=0, fast_path=fast_path)


def test_without_the_check_nan_logits_give_tokens_silently(tiny_model, monkeypatch):
    """What the check prevents: the draw turns NaN logits into some token, with no error."""
    from minirlhf import sampling
    monkeypatch.setattr(sampling, "check_logits", lambda logits, step: None)
    result = get_samples(nan_model(tiny_model), PROMPT, 2, gen_len=3, seed=0)
    assert result.sample_ids.shape == (2, result.prefix_len + 3)


def test_a_prompt_and_gen_len_past_the_context_are_refused_before_sampling(printable_model):
    """The printable model reads 64 positions: 1 prompt token + 64 new ones do not fit."""
    with pytest.raises(ValueError, match="reads at most 64"):
        get_samples(printable_model, "A", 2, gen_len=64, prepend_bos=False, seed=0)
    assert get_samples(printable_model, "A", 2, gen_len=63, prepend_bos=False,
                       seed=0).sample_ids.shape == (2, 64)


def test_sampling_config_names_the_bad_field():
    for bad in [dict(temperature=0.0), dict(top_k=0), dict(top_p=1.5)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)
