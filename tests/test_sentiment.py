"""Sentiment rewards: VADER, Hugging Face classifiers (tiny random DistilBERT), control tokens."""

import pytest
import torch
from transformers import BertTokenizerFast, DistilBertConfig, DistilBertForSequenceClassification
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from minirlhf.rewards import get_rewards
from minirlhf.sentiment import (
    _check_direction,
    control_token_reward,
    make_classifier_reward,
    make_control_prompts,
    make_control_token_reward,
    make_vader_reward,
    reward_fn_vader,
    split_control_token,
)

TEXTS = ["I loved it, a wonderful film.", "Terrible. I hated every minute.", "It is a film."]


def test_vader_matches_the_analyzer_and_flips_for_neg():
    analyzer = SentimentIntensityAnalyzer()
    expected = torch.tensor([analyzer.polarity_scores(t)["compound"] for t in TEXTS])
    assert expected[0] > 0.5 and expected[1] < -0.5  # the oracle itself is sensible
    torch.testing.assert_close(reward_fn_vader(TEXTS, "pos"), expected)
    torch.testing.assert_close(make_vader_reward("neg")(TEXTS), -expected)


def test_vader_rejects_unknown_direction():
    # Under the jaxtyping/beartype checker the Literal annotation catches it first (TypeError);
    # without it, our own ValueError does, with the message below.
    with pytest.raises((ValueError, TypeError)):
        make_vader_reward("positive")
    with pytest.raises(ValueError, match='"pos" or "neg"'):
        _check_direction("positive")


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A tiny random DistilBERT with a small WordPiece vocabulary: offline stand-in for
    lvwerra/distilbert-imdb."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "i", "loved", "it", ",", "a",
             "wonderful", "film", ".", "terrible", "hated", "every", "minute", "is"]
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(words))
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=len(words), dim=32, n_layers=2, n_heads=2,
                              hidden_dim=64, num_labels=2)
    return DistilBertForSequenceClassification(config).eval(), tokenizer


def classifier_oracle(model, tokenizer, texts):
    """Each text on its own (no padding at all), logits by hand."""
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in texts])


@pytest.mark.parametrize("direction,output", [("pos", "prob"), ("neg", "prob"), ("pos", "logit")])
def test_classifier_reward_matches_unbatched_oracle(tiny_classifier, direction, output):
    model, tokenizer = tiny_classifier
    logits = classifier_oracle(model, tokenizer, TEXTS)
    label = 1 if direction == "pos" else 0
    expected = (logits.softmax(-1) if output == "prob" else logits)[:, label]
    reward_fn = make_classifier_reward(model, tokenizer, direction, output, batch_size=2)
    torch.testing.assert_close(reward_fn(TEXTS), expected, atol=1e-5, rtol=1e-4)
    # The check can fail: the other class's probability does not pass it.
    wrong = (logits.softmax(-1) if output == "prob" else logits)[:, 1 - label]
    assert not torch.allclose(reward_fn(TEXTS), wrong, atol=1e-5)


def test_control_prompts_and_rewards_by_hand():
    prompts = make_control_prompts("This movie was", 4)
    assert prompts == ["[negative] This movie was", "[neutral] This movie was",
                       "[positive] This movie was", "[negative] This movie was"]
    assert split_control_token("[positive] This movie was great") == (
        "[positive]", "This movie was great")
    score = torch.tensor(0.5)
    assert control_token_reward("[positive]", score).item() == 0.5
    assert control_token_reward("[negative]", score).item() == -0.5
    assert control_token_reward("[neutral]", score).item() == 0.0  # 1 - 2 * 0.5
    with pytest.raises(ValueError, match="control token"):
        split_control_token("This movie was great")


def test_control_token_reward_scores_text_without_the_token():
    seen = []

    def scorer(texts):
        seen.extend(texts)
        return torch.tensor([0.8] * len(texts))

    rewards = make_control_token_reward(scorer)(
        ["[positive] Great.", "[negative] Great.", "[neutral] Great."])
    torch.testing.assert_close(rewards, torch.tensor([0.8, -0.8, 1 - 1.6]))
    assert seen == ["Great."] * 3


def test_get_rewards_wraps_sentiment_errors_with_the_function_name():
    reward_fn = make_control_token_reward()
    with pytest.raises(RuntimeError, match="control_tokens.*raised ValueError"):
        get_rewards(reward_fn, ["no control token here"])


def test_classifier_from_an_unreachable_hub_fails_at_once(monkeypatch):
    import time

    import minirlhf.runtime.loading

    monkeypatch.setattr(minirlhf.runtime.loading, "hub_reachable", lambda timeout_s=3.0: False)
    from minirlhf.sentiment import load_hf_classifier

    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="--reward vader"):
        load_hf_classifier("lvwerra/distilbert-imdb")
    assert time.perf_counter() - start < 5


def test_classifier_loads_from_a_local_folder(tiny_classifier, tmp_path):
    from minirlhf.sentiment import load_hf_classifier

    model, tokenizer = tiny_classifier
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_hf_classifier(str(tmp_path))
    expected = make_classifier_reward(model, tokenizer)(TEXTS)
    torch.testing.assert_close(make_classifier_reward(loaded, loaded_tokenizer)(TEXTS), expected)
