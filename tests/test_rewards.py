"""Tests for minirlhf.rewards: reward functions, their checks at the stage boundary, normalisation,
and reward functions that ask for prompts, responses or fields of the prompt records.

Oracles are numbers worked by hand and population statistics computed with python floats; each
check also rejects a plausible wrong implementation (the seed's unbiased std, a `get_rewards` that
trusts the reward function, a record field read from the wrong row).
"""

import functools
import json
import math
import statistics
from collections.abc import Callable

import pytest
import torch

from minirlhf.prompts import load_prompts
from minirlhf.rewards import get_rewards, normalize_reward, reward_fn_char_count

SAMPLES = ["This is. A test.", "This is", "This is..."]


# ---------------------------------------------------------------- reward_fn_char_count


def test_char_count_by_hand():
    assert reward_fn_char_count(SAMPLES).tolist() == [2.0, 0.0, 3.0]
    assert reward_fn_char_count(["a!b!!", "?"], char="!").tolist() == [3.0, 0.0]
    assert reward_fn_char_count(SAMPLES).dtype == torch.float32


# ---------------------------------------------------------------- normalize_reward


def normalization_problem(fn: Callable) -> str | None:
    """None if fn gives mean 0, population std 1 (python-float oracle), and zeros, not NaN, when
    there is no spread; else the first case it gets wrong."""
    # By hand: (1, 2, 3, 4) has mean 2.5 and population std sqrt(1.25).
    by_hand = fn(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    expected = [(x - 2.5) / math.sqrt(1.25) for x in [1, 2, 3, 4]]
    if not torch.allclose(by_hand, torch.tensor(expected), atol=1e-4):
        return f"(1, 2, 3, 4) gave {by_hand.tolist()}, expected {expected}"
    rewards = torch.randn(37, generator=torch.Generator().manual_seed(0)) * 5 + 3
    result = fn(rewards).tolist()
    mean, std = statistics.fmean(result), statistics.pstdev(result)
    if abs(mean) > 1e-5 or abs(std - 1) > 1e-4:
        return f"random rewards: mean {mean}, population std {std}, expected 0 and 1"
    for no_spread in [torch.tensor([4.2]), torch.full((8,), 3.0)]:
        result = fn(no_spread)
        if not torch.isfinite(result).all() or result.abs().max() > 1e-6:
            return f"{no_spread.tolist()} (no spread) gave {result.tolist()}, expected zeros"
    return None


def normalize_unbiased(reward, eps=1e-5):
    """The seed's version: `std()` has correction 1, NaN for a batch of one."""
    return (reward - reward.mean()) / (reward.std() + eps)


def normalize_no_eps(reward, eps=1e-5):
    """Population std but no eps: 0 / 0 = NaN for constant rewards."""
    return (reward - reward.mean()) / reward.std(correction=0)


def normalize_centre_only(reward, eps=1e-5):
    return reward - reward.mean()


def test_normalize_reward():
    problem = normalization_problem(normalize_reward)
    assert problem is None, problem


@pytest.mark.filterwarnings("ignore:std")
@pytest.mark.parametrize("wrong", [normalize_unbiased, normalize_no_eps, normalize_centre_only])
def test_normalize_check_rejects_wrong_versions(wrong):
    assert normalization_problem(wrong) is not None


# ---------------------------------------------------------------- get_rewards


def three_periods(samples: list[str]) -> list[float]:
    return [3.0] * len(samples)


def too_few_rewards(samples: list[str]) -> list[float]:
    return [1.0] * (len(samples) - 1)


def nan_for_the_second(samples: list[str]) -> torch.Tensor:
    rewards = torch.ones(len(samples))
    rewards[1] = float("nan")
    return rewards


def raises_key_error(samples: list[str]) -> list[float]:
    return [{"positive": 1.0}["negative"] for _ in samples]


def test_get_rewards_returns_a_float_tensor():
    rewards = get_rewards(three_periods, SAMPLES)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [3.0, 3.0, 3.0]
    assert get_rewards(reward_fn_char_count, SAMPLES).tolist() == [2.0, 0.0, 3.0]
    # A (batch, 1) tensor, as classifiers often return, is flattened to one reward per sample.
    column = get_rewards(lambda s: torch.arange(len(s), dtype=torch.float64)[:, None], SAMPLES)
    assert column.tolist() == [0.0, 1.0, 2.0] and column.dtype == torch.float32


def bad_reward_fn_problem(get_rewards_fn: Callable) -> str | None:
    """None if each bad reward function raises an error naming it and quoting the offending
    sample, else what was raised instead."""
    cases = [
        (too_few_rewards, SAMPLES[0], "one number per sample"),
        (nan_for_the_second, SAMPLES[1], "nan"),
        (raises_key_error, SAMPLES[0], "KeyError"),
    ]
    for reward_fn, sample, detail in cases:
        try:
            get_rewards_fn(reward_fn, SAMPLES)
        except RuntimeError as error:
            message = str(error)
            if reward_fn.__name__ not in message or repr(sample) not in message:
                return f"{reward_fn.__name__}: {message!r} does not name it and quote {sample!r}"
            if detail not in message:
                return f"{reward_fn.__name__}: {message!r} does not say {detail!r}"
        except Exception as error:  # the raw error from inside, naming neither function nor sample
            return f"{reward_fn.__name__}: raised {error!r}, not a RuntimeError that explains it"
        else:
            return f"{reward_fn.__name__}: nothing raised"
    return None


def get_rewards_unchecked(reward_fn, samples, device="cpu"):
    """Trusts the reward function: no length or NaN check, its errors pass through unexplained."""
    return torch.as_tensor(reward_fn(samples), dtype=torch.float32).to(device)


def get_rewards_length_only(reward_fn, samples, device="cpu"):
    rewards = torch.as_tensor(reward_fn(samples), dtype=torch.float32)
    if len(rewards) != len(samples):
        raise RuntimeError(f"{reward_fn.__name__}: one number per sample; got {samples[0]!r}")
    return rewards


def test_get_rewards_errors_name_the_function_and_a_sample():
    problem = bad_reward_fn_problem(get_rewards)
    assert problem is None, problem


@pytest.mark.parametrize("wrong", [get_rewards_unchecked, get_rewards_length_only])
def test_reward_check_rejects_wrong_versions(wrong):
    assert bad_reward_fn_problem(wrong) is not None


def test_get_rewards_rejects_infinity():
    with pytest.raises(RuntimeError, match="inf"):
        get_rewards(lambda samples: [float("inf")] * len(samples), SAMPLES)


# ---------------------------------------------------------------- reward functions that ask


PROMPTS = ["Q: 2+2? A:", "Q: 3+3? A:", "Q: 1+1? A:"]
RESPONSES = [" 4", " 5", " 2"]
TEXTS = [p + r for p, r in zip(PROMPTS, RESPONSES)]
ANSWER_ROWS = [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"},
               {"prompt": "1+1?", "answer": "2", "source": "by hand"}]


def exact_answer(responses: list[str], answer: list[str]) -> list[float]:
    """1 when the response, stripped, is the record's answer (Tulu 3's verifiable reward)."""
    return [float(response.strip() == expected) for response, expected in zip(responses, answer)]


def exact_answer_wrong_row(responses: list[str], answer: list[str]) -> list[float]:
    """The mistake: each response checked against the next record's answer."""
    return exact_answer(responses, answer[1:] + answer[:1])


def get_rewards_first_answer(reward_fn, texts, device="cpu", prompts=None, responses=None,
                             records=None):
    """The mistake: the first record's fields given to every row."""
    return get_rewards(reward_fn, texts, device, prompts, responses,
                       [records[0]] * len(records))


def get_rewards_texts_as_responses(reward_fn, texts, device="cpu", prompts=None,
                                   responses=None, records=None):
    """The mistake: the whole text (prompt included) passed as the response."""
    return get_rewards(reward_fn, texts, device, prompts, texts, records)


def answer_flow_problem(get_rewards_fn: Callable, reward_fn: Callable, tmp_path) -> str | None:
    """None if the "answer" field of a JSONL file reaches `reward_fn` row by row: by hand, " 4"
    answers 2+2, " 5" does not answer 3+3, " 2" answers 1+1."""
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in ANSWER_ROWS))
    records = load_prompts(path)
    rewards = get_rewards_fn(reward_fn, TEXTS, prompts=PROMPTS, responses=RESPONSES,
                             records=records)
    if rewards.tolist() != [1.0, 0.0, 1.0]:
        return f"rewards {rewards.tolist()}, expected [1.0, 0.0, 1.0]"
    return None


def test_record_fields_reach_the_reward_function(tmp_path):
    problem = answer_flow_problem(get_rewards, exact_answer, tmp_path)
    assert problem is None, problem


@pytest.mark.parametrize("get_rewards_fn, reward_fn", [
    (get_rewards, exact_answer_wrong_row),
    (get_rewards_first_answer, exact_answer),
    (get_rewards_texts_as_responses, exact_answer),
])
def test_answer_flow_check_rejects_wrong_versions(get_rewards_fn, reward_fn, tmp_path):
    assert answer_flow_problem(get_rewards_fn, reward_fn, tmp_path) is not None


def test_the_one_argument_form_still_gets_the_texts():
    seen = []

    def old_style(samples):
        seen.append(samples)
        return [len(sample) for sample in samples]

    rewards = get_rewards(old_style, TEXTS, prompts=PROMPTS, responses=RESPONSES,
                          records=ANSWER_ROWS)
    assert seen == [TEXTS] and rewards.tolist() == [12.0, 12.0, 12.0]
    # "Q: 2+2? A: 4" has no period, "This is. A test." two: the texts, not the responses.
    assert get_rewards(reward_fn_char_count, SAMPLES, prompts=SAMPLES, responses=["", "", ""],
                       records=[{"prompt": "x"}] * 3).tolist() == [2.0, 0.0, 3.0]
    assert get_rewards(functools.partial(reward_fn_char_count, char="i"), SAMPLES).tolist() == [
        2.0, 2.0, 2.0]


def test_keyword_form_gets_what_it_names():
    def by_name(texts, prompts, responses, source=None, scale=2.0):
        assert (texts, prompts, responses) == (TEXTS, PROMPTS, RESPONSES)
        assert source is None  # not every record has it: the default stays
        return [scale * len(r) for r in responses]

    def everything(**kwargs):
        assert kwargs == {"texts": TEXTS, "responses": RESPONSES,
                          "prompt": ["2+2?", "3+3?", "1+1?"], "answer": ["4", "6", "2"]}
        return [0.0] * 3

    def texts_only(texts):  # a name of the vocabulary: passed by keyword, same list
        return [len(text) for text in texts]

    assert get_rewards(by_name, TEXTS, prompts=PROMPTS, responses=RESPONSES,
                       records=ANSWER_ROWS).tolist() == [4.0, 4.0, 4.0]
    assert get_rewards(everything, TEXTS, responses=RESPONSES, records=ANSWER_ROWS).tolist() == [
        0.0, 0.0, 0.0]
    assert get_rewards(texts_only, TEXTS).tolist() == [12.0, 12.0, 12.0]


def wants_source(texts, source):
    return [0.0] * len(texts)


def wants_prompts(prompts):
    return [0.0] * len(prompts)


def wants_responses(texts, responses):
    return [0.0] * len(texts)


def test_asking_for_what_is_not_there_says_what_to_change():
    with pytest.raises(ValueError, match=r'wants_source asks for source, but prompt record 0 has '
                                         r'no "source" field \(it has answer, prompt\)'):
        get_rewards(wants_source, TEXTS, records=ANSWER_ROWS)
    with pytest.raises(ValueError, match="wants_source asks for source, which is not an input "
                                         r"\(texts, prompts, responses\) and no prompt records"):
        get_rewards(wants_source, TEXTS)
    with pytest.raises(ValueError, match="asks for prompts, but get_rewards was not given "
                                         "prompts=: pass prompts="):
        get_rewards(wants_prompts, TEXTS, responses=RESPONSES)
    with pytest.raises(ValueError, match="asks for responses, but get_rewards was not given "
                                         "responses=: pass responses="):
        get_rewards(wants_responses, TEXTS, prompts=PROMPTS)
    with pytest.raises(ValueError, match="got 2 records for 3 texts"):
        get_rewards(exact_answer, TEXTS, responses=RESPONSES, records=ANSWER_ROWS[:2])


def test_keyword_form_keeps_the_output_checks():
    def too_few(responses):
        return [1.0] * (len(responses) - 1)

    with pytest.raises(RuntimeError, match=r"too_few returned 2 rewards for 3 samples"):
        get_rewards(too_few, TEXTS, responses=RESPONSES)
