"""How an answer reads, beside what the reward says of it: repetition, diversity, and how likely
the reference model finds it. Pure functions of texts and log-probs.

A policy that hacks a word-counting reward ("a great success and is a great success story")
keeps its reward high while its answers repeat themselves; these measures show it. Used by the
rollout metrics (`metrics.get_rollout_metrics`, every phase) and by `evaluation.evaluate_policy`.

Words: an answer is lowercased, then split into runs of word characters and apostrophes
(`[\\w']+`: letters, digits, underscores, apostrophes) and single punctuation marks (every other
character that is not whitespace is a token of its own). "Great movie, isn't it!" is
`great movie , isn't it !` (6 words).

References: Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
Models" (distinct-n, pooled over a set of answers); Welleck et al. 2020, "Neural Text Generation
with Unlikelihood Training" (the share of repeated n-grams within a continuation).
"""

import math
import re

import torch
from jaxtyping import Float, Int
from torch import Tensor

WORD = re.compile(r"[\w']+|[^\w\s]")
"""A word (word characters and apostrophes) or one punctuation mark."""


def get_words(answer: str) -> list[str]:
    """The answer's words, lowercased, punctuation marks as words of their own."""
    return WORD.findall(answer.lower())


def get_ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    """Every run of `n` consecutive words, in order (none when there are fewer than `n`)."""
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def calc_distinct_n(answers: list[str], n: int) -> float:
    """Distinct-n, pooled over the answers: the number of different n-grams in all of them over
    the number of n-grams in all of them (Li et al. 2016). 1: no n-gram is used twice anywhere;
    near 0: the answers say the same things. It falls as answers are added, so compare sets of
    the same size. NaN when no answer has `n` words."""
    ngrams = [gram for answer in answers for gram in get_ngrams(get_words(answer), n)]
    return len(set(ngrams)) / len(ngrams) if ngrams else float("nan")


def calc_repeated_ngram_share(answer: str, n: int = 3) -> float:
    """The share of the answer's n-grams that already occurred earlier in it: 0 for an answer
    that never repeats itself, towards 1 for one that loops. NaN with fewer than `n` words."""
    seen, repeated = set(), 0
    ngrams = get_ngrams(get_words(answer), n)
    for gram in ngrams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(ngrams) if ngrams else float("nan")


def calc_mean_repeated_ngram_share(answers: list[str], n: int = 3) -> float:
    """`calc_repeated_ngram_share` averaged over the answers that have `n` words (each answer
    counts once, whatever its length); NaN when none has."""
    shares = [calc_repeated_ngram_share(answer, n) for answer in answers]
    shares = [share for share in shares if not math.isnan(share)]
    return sum(shares) / len(shares) if shares else float("nan")


def calc_logprob_per_token(
    ref_logprobs: Float[Tensor, "batch gen_len"],
    response_mask: Int[Tensor, "batch gen_len"] | None = None,
) -> Float[Tensor, " batch"]:
    """Each answer's log-likelihood under the reference model per real token (mask 1): its
    summed log-probs over its length, in nats. Near the base model's own level: the answer reads
    like the model's text; far below it: text the reference finds unlikely. NaN for an answer
    with no real token."""
    if response_mask is None:
        response_mask = torch.ones_like(ref_logprobs, dtype=torch.long)
    real = response_mask.bool()
    total = torch.where(real, ref_logprobs, 0.0).sum(dim=-1)
    return total / real.sum(dim=-1)  # 0 / 0 is NaN: an empty answer has no per-token value


def get_fluency_metrics(answers: list[str]) -> dict[str, float]:
    """The text measures of a set of answers, by the names the logs give them."""
    return {"fluency/distinct_1": calc_distinct_n(answers, 1),
            "fluency/distinct_2": calc_distinct_n(answers, 2),
            "fluency/repeated_3gram": calc_mean_repeated_ngram_share(answers, 3)}
