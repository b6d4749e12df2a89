"""Sentiment rewards: VADER (offline), Hugging Face classifiers, and control-token tasks.

Stage 3 of the pipeline, for the headline job of steering a model's sentiment.

- VADER (Hutto & Gilbert 2014) ships its lexicon in the `vaderSentiment` package, so it works with
  no model hub; its compound score lies in [-1, 1]. The offline default.
- Any Hugging Face sequence-classification model, e.g. `lvwerra/distilbert-imdb` as in TRL's
  sentiment notebook (needs the hub, or a local folder): the probability or logit of the wanted
  class.
- Control tokens (after TRL's control-token sentiment notebook): prompts start with `[positive]`,
  `[negative]` or `[neutral]` and each sample is rewarded for the sentiment its prefix asks for,
  so one policy learns all three.
"""

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

Direction = Literal["pos", "neg"]
SentimentScorer = Callable[[list[str]], Float[Tensor, " batch"]]


def _check_direction(direction: str):
    if direction not in ("pos", "neg"):
        raise ValueError(f'direction must be "pos" or "neg", got {direction!r}.')


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(texts: list[str]) -> Float[Tensor, " batch"]:
    """VADER's compound sentiment score of each text, in [-1, 1] (positive is positive)."""
    analyzer = _vader()
    return torch.tensor([analyzer.polarity_scores(t)["compound"] for t in texts])


def reward_fn_vader(samples: list[str], direction: Direction = "pos") -> Float[Tensor, " batch"]:
    """VADER compound score of each sample; negated for direction "neg"."""
    _check_direction(direction)
    scores = vader_compound(samples)
    return scores if direction == "pos" else -scores


def make_vader_reward(direction: Direction = "pos") -> Callable[[list[str]], Tensor]:
    """A reward function (samples -> rewards) for VADER sentiment in the given direction."""
    _check_direction(direction)

    def reward_fn(samples: list[str]) -> Float[Tensor, " batch"]:
        return reward_fn_vader(samples, direction)

    reward_fn.__name__ = f"vader_{direction}"
    return reward_fn


def load_hf_classifier(name_or_path: str, device: torch.device | str = "cpu"):
    """A Hugging Face sequence classifier and its tokenizer (hub name or local folder).

    Fails at once with a clear message when the hub cannot be reached and no local copy exists.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from minirlhf.runtime.loading import hub_reachable

    if not Path(name_or_path).is_dir() and not hub_reachable():
        raise RuntimeError(_no_classifier_message(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path)
    except OSError as error:
        raise RuntimeError(_no_classifier_message(name_or_path)) from error
    return model.to(device).eval(), tokenizer


def _no_classifier_message(name_or_path: str) -> str:
    return (
        f"Could not load the classifier {name_or_path!r}: it is not a local folder and the "
        "Hugging Face hub cannot be reached from here. Use the offline VADER reward "
        "(`make_vader_reward()`; on the command line `--reward vader` or the default preset "
        "smollm2-vader), or pass a local folder."
    )


def make_classifier_reward(
    model,
    tokenizer,
    direction: Direction = "pos",
    output: Literal["prob", "logit"] = "prob",
    positive_label: int = 1,
    batch_size: int = 32,
    max_length: int = 512,
) -> Callable[[list[str]], Tensor]:
    """A reward function from a 2-class sentiment classifier (`reward_fn_sentiment_imdb`).

    The reward is the probability (or logit) of the positive class for direction "pos", of the
    other class for "neg". Runs in batches on the classifier's device, with no gradient.

    Args:
        positive_label: index of the positive class (1 for distilbert-imdb).
    """
    _check_direction(direction)
    if output not in ("prob", "logit"):
        raise ValueError(f'output must be "prob" or "logit", got {output!r}.')
    label = positive_label if direction == "pos" else 1 - positive_label
    device = next(model.parameters()).device

    @torch.no_grad()
    def reward_fn(samples: list[str]) -> Float[Tensor, " batch"]:
        scores = []
        for start in range(0, len(samples), batch_size):
            batch = tokenizer(samples[start : start + batch_size], return_tensors="pt",
                              padding=True, truncation=True, max_length=max_length).to(device)
            logits = model(**batch).logits.float()
            chosen = logits.softmax(-1) if output == "prob" else logits
            scores.append(chosen[:, label])
        return torch.cat(scores).cpu()

    reward_fn.__name__ = f"classifier_{output}_{direction}"
    return reward_fn


# ---- control tokens ----

CONTROL_TOKENS = ("[negative]", "[neutral]", "[positive]")


def make_control_prompts(prefix: str, batch_size: int) -> list[str]:
    """`batch_size` prompts cycling through the control tokens: "[positive] This movie was"..."""
    return [f"{CONTROL_TOKENS[i % len(CONTROL_TOKENS)]} {prefix}" for i in range(batch_size)]


def split_control_token(sample: str) -> tuple[str, str]:
    """("[positive]", "This movie was great") from "[positive] This movie was great"."""
    for token in CONTROL_TOKENS:
        if sample.startswith(token):
            return token, sample[len(token) :].lstrip()
    raise ValueError(
        f"Sample does not start with a control token {CONTROL_TOKENS}: {sample[:60]!r}"
    )


def control_token_reward(
    task: str, score: Float[Tensor, "*batch"], neutral_scale: float = 2.0
) -> Float[Tensor, "*batch"]:
    """Turn a sentiment score into the reward a control token asks for.

    [positive]: score; [negative]: -score; [neutral]: 1 - neutral_scale * |score| (highest when
    the text is neither; the ARENA exercises' -2|logit| + 4, rescaled for scores in [-1, 1]).
    """
    if task == "[positive]":
        return score
    if task == "[negative]":
        return -score
    if task == "[neutral]":
        return 1.0 - neutral_scale * score.abs()
    raise ValueError(f"Unknown control token {task!r}; expected one of {CONTROL_TOKENS}.")


def make_control_token_reward(
    scorer: SentimentScorer = vader_compound,
) -> Callable[[list[str]], Tensor]:
    """A reward function for control-token prompts: each sample rewarded as its prefix asks.

    The control token is removed before scoring, so it cannot sway the sentiment scorer.
    """

    def reward_fn(samples: list[str]) -> Float[Tensor, " batch"]:
        tasks, texts = zip(*(split_control_token(s) for s in samples))
        scores = scorer(list(texts))
        return torch.stack([control_token_reward(t, s) for t, s in zip(tasks, scores)])

    reward_fn.__name__ = "control_tokens"
    return reward_fn
