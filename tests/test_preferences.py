"""Preference records, their JSONL files (and the errors bad lines give), and RLAIF pairs."""

import json

import pytest
import torch

from minirlhf.pairs.preferences import (
    Preference,
    label_pair,
    make_preferences,
    read_preferences,
    split_preferences,
    write_preferences,
)


def digit_count(samples: list[str]) -> torch.Tensor:
    """A judge for the printable model: how many digits a text has (10 of its 94 characters)."""
    return torch.tensor([float(sum(c.isdigit() for c in s)) for s in samples])


def test_jsonl_round_trip_keeps_every_field(tmp_path):
    records = [Preference("Q: ", "yes", "no"),
               Preference("", "good film", "bad film", margin=0.5, chosen_score=0.8,
                          rejected_score=-0.3)]
    path = write_preferences(records, tmp_path / "prefs.jsonl")
    assert read_preferences(path) == records
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"prompt": "Q: ", "chosen": "yes", "rejected": "no"}  # no nulls written
    assert records[0].chosen_text == "Q: yes"


def test_unknown_keys_and_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "human.jsonl"
    path.write_text('{"id": 7, "labeller": "ann", "prompt": "", "chosen": "a", "rejected": "b"}'
                    '\n\n{"prompt": "p", "chosen": "c", "rejected": "d", "margin": 2}\n')
    assert read_preferences(path) == [Preference("", "a", "b"), Preference("p", "c", "d", 2.0)]


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "", "chosen": "a"', "line 2: not valid JSON"),
    ('["a", "b"]', "line 2: expected a JSON object, got list"),
    ('{"chosen": "a", "rejected": "b"}', "line 2: missing ['prompt']"),
    ('{"prompt": "", "chosen": 1, "rejected": "b"}', "'chosen' must be a string"),
    ('{"prompt": "", "chosen": "a", "rejected": "b", "margin": "big"}',
     "'margin' must be a number or null"),
    ('{"prompt": "", "chosen": "a", "rejected": "b", "margin": true}',
     "'margin' must be a number or null"),
    ('{"prompt": "", "chosen": "a", "rejected": "a"}', "the same text"),
])
def test_a_bad_line_names_its_line_and_problem(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "", "chosen": "fine", "rejected": "also fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match="bad.jsonl") as caught:
        read_preferences(path)
    assert message in str(caught.value)


def test_an_empty_or_missing_file_says_so(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no preference records"):
        read_preferences(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="minirlhf preferences"):
        read_preferences(tmp_path / "missing.jsonl")


def test_split_is_seeded_disjoint_and_complete():
    records = [Preference("", f"c{i}", f"r{i}") for i in range(10)]
    train, heldout = split_preferences(records, 0.2, seed=3)
    assert len(train) == 8 and len(heldout) == 2
    assert sorted(train + heldout, key=lambda p: int(p.chosen[1:])) == records
    assert split_preferences(records, 0.2, seed=3) == (train, heldout)
    assert split_preferences(records, 0.2, seed=4) != (train, heldout)
    assert len(split_preferences(records[:2], 0.01)[1]) == 1  # never an empty side
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_preferences(records, 1.0)


def test_label_pair_prefers_the_higher_score_and_drops_ties():
    pair = label_pair("P", " low", " high", 0.1, 0.9)
    assert (pair.chosen, pair.rejected, pair.margin) == (" high", " low", None)
    assert (pair.chosen_score, pair.rejected_score) == (0.9, 0.1)
    assert label_pair("P", " a", " b", 0.5, 0.5) is None
    assert label_pair("P", " a", " b", 0.5, 0.7, min_gap=0.3) is None
    assert label_pair("P", " a", " a", 0.0, 1.0) is None  # the same text cannot be preferred
    assert label_pair("P", " a", " b", 0.0, 1.0, margin=True).margin == 1.0


def test_rlaif_pairs_come_from_the_policy_and_the_judge(printable_model):
    prefs = make_preferences(printable_model, digit_count, ["A", "B"], num_pairs=40, gen_len=12,
                             batch_size=16, min_gap=1.0, seed=0, prepend_bos=False)
    assert len(prefs) == 40
    assert {p.prompt for p in prefs} == {"A", "B"}
    for p in prefs:
        assert p.chosen_score == digit_count([p.chosen_text]).item()
        assert p.rejected_score == digit_count([p.rejected_text]).item()
        assert p.chosen_score - p.rejected_score > 1.0
        assert len(p.chosen) == len(p.rejected) == 12  # one character per token
    again = make_preferences(printable_model, digit_count, ["A", "B"], num_pairs=40, gen_len=12,
                             batch_size=16, min_gap=1.0, seed=0, prepend_bos=False)
    assert again == prefs


def test_a_judge_that_calls_everything_a_tie_stops_with_a_message(printable_model):
    with pytest.raises(RuntimeError, match="the judge calls most pairs ties"):
        make_preferences(printable_model, lambda s: torch.zeros(len(s)), ["A"], num_pairs=4,
                         gen_len=4, batch_size=8, max_batches=2, prepend_bos=False)
    with pytest.raises(ValueError, match="even"):
        make_preferences(printable_model, digit_count, ["A"], num_pairs=4, batch_size=7)
