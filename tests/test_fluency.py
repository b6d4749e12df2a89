"""Tests for minirlhf.fluency: distinct-n, the share of repeated 3-grams, the reference
log-likelihood per token.

Oracle: numbers worked by hand. "great movie great movie great movie" has 6 words: 2 different
(distinct-1 2/6), 5 bigrams of which 2 differ (distinct-2 2/5), and 4 trigrams (g m g, m g m,
g m g, m g m) of which the last two occurred earlier (repeated share 2/4). Each check is also run
on a known-wrong version (per-answer instead of pooled, both copies of a repeat counted, no
lowercasing, padding counted) and must reject it.
"""

import math

import pytest
import torch

from minirlhf import fluency
from minirlhf.fluency import (
    calc_distinct_n,
    calc_logprob_per_token,
    calc_mean_repeated_ngram_share,
    calc_repeated_ngram_share,
    get_fluency_metrics,
    get_words,
)
from minirlhf.metrics import get_rollout_metrics
from minirlhf.models import GlobalBatch, RolloutOutputs

REPEATED = "great movie great movie great movie"
VARIED = "The film was quietly moving."
FLUENCY_KEYS = ("fluency/distinct_1", "fluency/distinct_2", "fluency/repeated_3gram")


def test_words_are_lowercased_with_punctuation_apart():
    assert get_words("Great movie, isn't it!") == ["great", "movie", ",", "isn't", "it", "!"]
    assert get_words("  ") == []


@pytest.mark.parametrize("answers, n, expected", [
    ([REPEATED], 1, 2 / 6),
    ([REPEATED], 2, 2 / 5),
    ([VARIED], 1, 1.0),       # the film was quietly moving . : 6 different words
    ([VARIED], 2, 1.0),
    (["great"], 1, 1.0),
    (["GREAT great"], 1, 1 / 2),             # lowercased: one word twice
    (["great movie", "great film"], 1, 3 / 4),  # pooled: "great" is shared by the two answers
    (["great movie", "great film"], 2, 1.0),
])
def test_distinct_n_by_hand(answers, n, expected):
    assert calc_distinct_n(answers, n) == pytest.approx(expected)


@pytest.mark.parametrize("answers, n", [([""], 1), (["great"], 2), (["", "one"], 2)])
def test_distinct_n_is_nan_without_an_ngram(answers, n):
    assert math.isnan(calc_distinct_n(answers, n))


@pytest.mark.parametrize("answer, expected", [
    (REPEATED, 2 / 4),
    (VARIED, 0.0),
    ("a b c a b c", 1 / 4),  # abc bca cab abc: only the second abc repeats
    ("Great movie great MOVIE great movie!", 2 / 5),  # lowercased; "!" is a word
])
def test_repeated_3gram_share_by_hand(answer, expected):
    assert calc_repeated_ngram_share(answer, 3) == pytest.approx(expected)


@pytest.mark.parametrize("answer", ["", "great", "great movie"])
def test_repeated_share_is_nan_under_three_words(answer):
    assert math.isnan(calc_repeated_ngram_share(answer, 3))


def test_mean_repeated_share_counts_each_answer_once_and_skips_short_ones():
    # (1/4 + 0) / 2, not the pooled 1/8 over both answers' trigrams; "hi" has no trigram.
    assert calc_mean_repeated_ngram_share(["a b c a b c", "x y z w", "hi"]) == pytest.approx(1 / 8)
    assert math.isnan(calc_mean_repeated_ngram_share(["", "hi"]))


def test_fluency_metrics_by_name():
    metrics = get_fluency_metrics([REPEATED])
    assert metrics == pytest.approx({"fluency/distinct_1": 2 / 6, "fluency/distinct_2": 2 / 5,
                                     "fluency/repeated_3gram": 0.5})


def test_logprob_per_token_by_hand():
    ref_logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0], [-4.0, -4.0, -4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    per_token = calc_logprob_per_token(ref_logprobs, mask)
    assert per_token[:2].tolist() == pytest.approx([-2.0, -0.5])
    assert torch.isnan(per_token[2])  # an empty answer has no per-token log-likelihood
    assert calc_logprob_per_token(ref_logprobs[:1]).tolist() == pytest.approx([-2.0])


# ---- each check rejects a known-wrong version ----

def distinct_per_answer(answers, n):
    """Wrong: distinct-n of each answer, averaged (not pooled)."""
    return sum(calc_distinct_n([a], n) for a in answers) / len(answers)


def repeated_both_copies(answer, n=3):
    """Wrong: every occurrence of a repeated n-gram counted, the first one too."""
    grams = fluency.get_ngrams(get_words(answer), n)
    return sum(grams.count(g) > 1 for g in grams) / len(grams)


def words_not_lowercased(answer):
    """Wrong: case kept."""
    return fluency.WORD.findall(answer)


def logprob_padding_counted(ref_logprobs, response_mask=None):
    """Wrong: the mean over gen_len, padding included."""
    return ref_logprobs.mean(dim=-1)


def test_distinct_check_rejects_per_answer_mean():
    assert distinct_per_answer(["great movie", "great film"], 1) != pytest.approx(3 / 4)


def test_repeated_check_rejects_counting_both_copies():
    assert repeated_both_copies("a b c a b c") != pytest.approx(1 / 4)
    assert repeated_both_copies(REPEATED) != pytest.approx(2 / 4)


def test_lowercasing_check_rejects_case_kept(monkeypatch):
    monkeypatch.setattr(fluency, "get_words", words_not_lowercased)
    assert calc_distinct_n(["GREAT great"], 1) != pytest.approx(1 / 2)


def test_logprob_check_rejects_padding_counted():
    ref_logprobs = torch.tensor([[-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 0, 0]])
    assert logprob_padding_counted(ref_logprobs, mask).tolist() != pytest.approx([-0.5])


# ---- every phase's rollout metrics ----

def make_global_batch(texts: list[str], responses: list[str] | None):
    """A two-row batch of 3-token answers with zero KL and entropy: only the texts matter."""
    zeros = torch.zeros(len(texts), 3)
    outputs = RolloutOutputs(zeros, None, zeros, zeros, zeros, {})
    return GlobalBatch(texts, torch.zeros(len(texts)), outputs, None, None, None,
                       slice(0, len(texts)), responses)


def test_rollout_metrics_read_the_answers_alone():
    """Pooled over the two answers: 8 different words of 12, 7 different bigrams of 10; the
    repeated share is (1/2 + 0) / 2. The prompt "Review:" must not count."""
    answers = [REPEATED, VARIED]
    batch = make_global_batch([f"Review: {a}" for a in answers], answers)
    metrics = get_rollout_metrics(batch, torch.zeros(2, 3), "exact", 1, 0.1)
    assert {key: metrics[key] for key in FLUENCY_KEYS} == pytest.approx(
        {"fluency/distinct_1": 8 / 12, "fluency/distinct_2": 7 / 10,
         "fluency/repeated_3gram": 0.25})
    # The same check rejects metrics read from the whole texts (prompt included).
    wrong = get_rollout_metrics(make_global_batch(batch.texts, None), torch.zeros(2, 3),
                                "exact", 1, 0.1)
    assert wrong["fluency/distinct_1"] != pytest.approx(8 / 12)
