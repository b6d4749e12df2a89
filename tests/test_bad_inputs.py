"""Bad data refused where it enters, with the place named: NaN/inf margins and undecodable bytes
in preference files (the line), reward functions that return no numbers (the function and a
sample), and a non-finite pairwise loss (stopped before the optimiser step spreads it)."""

import json

import pytest
import torch
from rich.console import Console

from minirlhf.pairs.preferences import Preference, read_preferences
from minirlhf.pairs.reward_model import RewardModel
from minirlhf.pairs.reward_training import RewardModelArgs, check_pairs_fit, train_reward_model
from minirlhf.rewards import get_rewards
from minirlhf.runtime.loading import load_tiny_model

GOOD_LINE = '{"prompt": "", "chosen": "fine", "rejected": "also fine"}\n'


def test_python_json_reads_nan_and_infinity_so_the_check_is_needed():
    """The known-wrong reader: json.loads takes these margins without complaint."""
    assert json.loads('{"margin": NaN}')["margin"] != json.loads('{"margin": NaN}')["margin"]
    assert json.loads('{"margin": -Infinity}')["margin"] == float("-inf")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("key", ["margin", "chosen_score", "rejected_score"])
def test_a_non_finite_margin_or_score_names_its_line(tmp_path, key, value):
    path = tmp_path / "prefs.jsonl"
    path.write_text(GOOD_LINE + f'{{"prompt": "", "chosen": "a", "rejected": "b", '
                                f'"{key}": {value}}}\n')
    with pytest.raises(ValueError, match=f"prefs.jsonl, line 2: '{key}' must be a finite"):
        read_preferences(path)


def test_a_preference_built_in_code_refuses_nan_too():
    with pytest.raises(ValueError, match="'margin' must be a finite number"):
        Preference("", "a", "b", margin=float("nan"))


def test_a_byte_order_mark_is_accepted_and_a_latin1_byte_names_its_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_LINE.encode())  # what Windows editors write
    assert read_preferences(path) == [Preference("", "fine", "also fine")]
    path.write_bytes(GOOD_LINE.encode() * 2 + '{"prompt": "", "chosen": "café", '
                     '"rejected": "b"}\n'.encode("latin-1"))
    # 0xe9 is latin-1 "é", the 30th character of its line (counted by hand).
    with pytest.raises(ValueError, match="line 3: byte 0xe9 at column 30 is not UTF-8"):
        read_preferences(path)


@pytest.mark.parametrize("returned", [["good", "bad"], None, {"a": 1.0, "b": 2.0}, "1.0 2.0"])
def test_a_reward_function_returning_no_numbers_is_named(returned):
    def judge_of_sorts(samples: list[str]):
        return returned

    with pytest.raises(RuntimeError, match="The reward function judge_of_sorts returned") as caught:
        get_rewards(judge_of_sorts, ["first sample", "second"])
    assert "one number per sample" in str(caught.value) and "'first sample'" in str(caught.value)


def test_a_non_finite_pairwise_loss_stops_training_before_the_step():
    """A margin beyond float32's range is finite in Python but inf as a float32 tensor."""
    torch.manual_seed(0)
    model = RewardModel(load_tiny_model(n_layers=1, d_model=32, n_heads=2, n_ctx=64))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pairs = [Preference("It was ", "lovely", "awful", margin=1e39)] * 4
    args = RewardModelArgs(epochs=1, batch_size=4, trainable_layers=None)
    with pytest.raises(FloatingPointError, match="pairwise loss is inf.*'It was lovely'"):
        train_reward_model(model, pairs, pairs[:1], args, console=Console(quiet=True))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_an_over_long_preference_is_refused_before_training(printable_model):
    """A text longer than the model's context names its pair before any training step."""
    reward_model = RewardModel(printable_model, prepend_bos=False)
    fine = Preference("A", "B" * 10, "C" * 10)
    too_long = Preference("A", " B" * 100, "C")  # 101 tokens (" B" is one) + the end token
    check_pairs_fit(reward_model, [fine])
    with pytest.raises(ValueError, match=r"Preference pair 2 \(chosen.*reads at most 64"):
        check_pairs_fit(reward_model, [fine, too_long])
