"""Tests for minirlhf.shaping.penalize_repetition: a reward minus its answer's repetition.

Oracle: numbers worked by hand. "bad bad bad bad bad" has 5 words and 3 3-grams, all "bad bad
bad": the 2nd and 3rd repeat the 1st, share 2/3, so weight 1.5 takes 1.0 off. "a fine film" has
one 3-gram (share 0); "so bad" has none (share 0, too short to repeat). Each check also runs on
a known-wrong version (the penalty added, counted on prompt + response, both copies of a repeat
counted) and must reject it.
"""

import pytest
import torch

from minirlhf.rewards import get_rewards
from minirlhf.shaping import get_repetition, penalize_repetition

PROMPT = "Review: "
RESPONSES = ["bad bad bad bad bad", "a fine film", "so bad"]
SHARES = [2 / 3, 0.0, 0.0]


def constant(texts):
    """The plain form: 1.0 for every text."""
    return torch.ones(len(texts))


def on_responses(responses):
    """The keyword form: the number of words of the answer alone."""
    return torch.tensor([float(len(r.split())) for r in responses])


def with_field(responses, bonus):
    """A record field, as task rewards take `answer`."""
    return torch.tensor([float(b) for b in bonus])


def wrong_penalty_added(reward_fn, weight):
    def shaped(texts, responses=None):
        return get_rewards(reward_fn, texts, responses=responses) + weight * get_repetition(
            responses)
    return shaped


def wrong_on_whole_text(reward_fn, weight):
    def shaped(texts, responses=None):
        return get_rewards(reward_fn, texts, responses=responses) - weight * get_repetition(texts)
    return shaped


def wrong_both_copies(reward_fn, weight):
    """Counts every 3-gram that occurs more than once, first copy included (3/3 for "bad x5")."""
    def share(answer):
        words = answer.split()
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        return sum(grams.count(g) > 1 for g in grams) / len(grams) if grams else 0.0

    def shaped(texts, responses=None):
        return (get_rewards(reward_fn, texts, responses=responses)
                - weight * torch.tensor([share(r) for r in responses]))
    return shaped


def calc_shaped(make, reward_fn, weight, prompt=PROMPT, records=None):
    texts = [prompt + response for response in RESPONSES]
    return get_rewards(make(reward_fn, weight), texts, prompts=[prompt] * len(texts),
                       responses=RESPONSES, records=records)


def check_by_hand(make) -> str | None:
    """None when `make` gives the hand-worked rewards, else what differed."""
    for reward_fn, base in [(constant, [1.0, 1.0, 1.0]), (on_responses, [5.0, 3.0, 2.0])]:
        # A prompt that repeats itself: it is not the answer's doing.
        got = calc_shaped(make, reward_fn, 1.5, prompt="so so so so so so: ")
        expected = torch.tensor([b - 1.5 * s for b, s in zip(base, SHARES)])
        if not torch.allclose(got, expected):
            return f"{reward_fn.__name__}: got {got.tolist()}, expected {expected.tolist()}"
    return None


def test_the_rewards_worked_by_hand():
    assert check_by_hand(penalize_repetition) is None


@pytest.mark.parametrize("make", [wrong_penalty_added, wrong_on_whole_text, wrong_both_copies])
def test_the_check_rejects_a_wrong_shaping(make):
    assert check_by_hand(make) is not None


def test_record_fields_reach_the_inner_reward():
    records = [{"bonus": 2}, {"bonus": 3}, {"bonus": 4}]
    got = calc_shaped(penalize_repetition, with_field, 3.0, records=records)
    assert torch.allclose(got, torch.tensor([2.0 - 2.0, 3.0, 4.0]))


def test_without_responses_the_whole_text_is_judged():
    shaped = penalize_repetition(constant, 1.0)
    got = get_rewards(shaped, ["bad bad bad bad bad", "a fine film"])
    assert torch.allclose(got, torch.tensor([1.0 - 2 / 3, 1.0]))
    assert shaped.__name__ == "constant - 1 x repeated 3-grams"


def test_weight_zero_changes_nothing():
    assert torch.equal(calc_shaped(penalize_repetition, on_responses, 0.0),
                       torch.tensor([5.0, 3.0, 2.0]))


@pytest.mark.parametrize("weight, n", [(-1.0, 3), (float("nan"), 3), (float("inf"), 3), (1.0, 0)])
def test_a_bad_weight_is_refused_by_name(weight, n):
    with pytest.raises(ValueError, match="penalize_repetition needs a finite weight"):
        penalize_repetition(constant, weight, n)
