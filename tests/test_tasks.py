"""Tasks with checkable answers (minirlhf.tasks): checkers on hand-written answers, the ways a
policy could game a loose checker, seeded splits, rewards through get_rewards, pass@k against a
brute-force enumeration, and `minirlhf train --task` end to end on a tiny random model."""

import itertools
import json
import re

import pytest
import torch
from rich.console import Console

from minirlhf import cli
from minirlhf.args import RLHFArgs
from minirlhf.pass_at_k import calc_pass_at_k, get_pass_metrics
from minirlhf.rewards import get_rewards
from minirlhf.tasks import TASKS, Task, get_task
from minirlhf.tasks.arithmetic import check_sum, make_sum_problems
from minirlhf.tasks.formats import check_question, check_word_count
from minirlhf.tasks.letters import check_letters
from minirlhf.trainer import RLHFTrainer

# ---------------------------------------------------------------- checkers, by hand

SUM_CASES = [  # 47 + 38 = 85
    ("85", 1.0), (" 85 \n", 1.0), ("85.", 1.0), ("47 + 38 = 85", 1.0), ("47+38=85.", 1.0),
    ("38 + 47 = 85", 0.0), ("40 + 45 = 85", 0.0), ("47 + 38 = 85 = 85", 0.0),
    ("The answer is 85.", 0.5), ("85 is the sum", 0.5),
    ("84", 0.25), ("95", 0.25), ("75", 0.25), ("96", 0.0), ("8 5", 0.0),
    ("", 0.0), ("eighty-five", 0.0), ("a85b", 0.0), ("x85", 0.0), ("1859", 0.0),
    ("85 85", 0.0), ("84 85 86", 0.0), ("84, 85 or 86", 0.0), ("47 + 38 = 84", 0.0),
    ("85. What is 2 + 2? 4", 0.0), ("085", 0.0), ("+85", 0.0), ("85.0", 0.0), ("-85", 0.0),
]
LETTER_CASES = [  # reverse "stone"
    ("enots", 1.0), ("Enots", 1.0), (' "enots" ', 1.0), ("enots.", 1.0), ("`enots`", 1.0),
    ("eotns", 0.25), ("stone", 0.0), ("enot", 0.0), ("enotss", 0.0), ("e n o t s", 0.0),
    ("e-n-o-t-s", 0.0), ("enots enots", 0.0), ("enots, stone", 0.0), ("enots!", 0.0),
    ("The reversed word is enots.", 0.0), ("enots\nstone", 0.0), ('"enots', 0.0), ("", 0.0),
]
COUNT_CASES = [  # exactly three words
    ("Warm, soft, cozy.", 1.0), ("warm soft cozy", 1.0), ("Sky-blue and calm.", 1.0),
    ("Don't touch it!", 1.0), ("Warm and soft, cozy.", 0.25), ("Warm, soft.", 0.25),
    ("the the the", 0.0), ("Warm warm cozy", 0.0), ("1. warm 2. soft 3. cozy", 0.0),
    ("Warm soft cozy :)", 0.0), ("", 0.0), ("...", 0.0), ("One two three four five", 0.0),
    ("Warm (soft) cozy", 0.0),
]
QUESTION_CASES = [  # a question about a "lamp"
    ("What makes a lamp bright?", 1.0), ("  Why do lamps flicker?  ", 1.0),
    ("What do you think about it?", 0.5), ("Sure! What makes a lamp bright?", 0.25),
    ("What is a lamp? I wonder.", 0.25), ("Why? Why? Why lamp?", 0.25),
    ("What lamp?", 0.0), ("?", 0.0), ("A lamp is bright.", 0.0), ("", 0.0),
    ("What is a lampshade?", 0.5), ("What lights a lamp.", 0.0),
]


@pytest.mark.parametrize(("response", "expected"), SUM_CASES)
def test_check_sum(response, expected):
    assert check_sum(response, answer="85", question="47 + 38") == expected


@pytest.mark.parametrize(("response", "expected"), LETTER_CASES)
def test_check_letters(response, expected):
    assert check_letters(response, answer="enots", word="stone") == expected


UPPER_CASES = [("STONE", 1.0), ('"STONE".', 1.0), ("Stone", 0.0), ("stone", 0.0),
               ("STOEN", 0.25), ("STONE STONE", 0.0), ("S T O N E", 0.0)]


@pytest.mark.parametrize(("response", "expected"), UPPER_CASES)
def test_check_letters_in_capitals(response, expected):
    assert check_letters(response, answer="STONE", word="stone") == expected


@pytest.mark.parametrize(("response", "expected"), COUNT_CASES)
def test_check_word_count(response, expected):
    assert check_word_count(response, count=3) == expected


@pytest.mark.parametrize(("response", "expected"), QUESTION_CASES)
def test_check_question(response, expected):
    assert check_question(response, topic="lamp") == expected


# ---------------------------------------------------------------- gaming a loose checker

GAMES = {  # name -> (checker, fields, responses that hold the answer but are not it)
    "add": (check_sum, {"answer": "85", "question": "47 + 38"},
            ["84 85 86", "85 85", "a85b", "1859", "40 + 45 = 85", "85. Next: 2 + 2 = 4",
             "Is it 85 or 58?"]),
    "reverse": (check_letters, {"answer": "enots", "word": "stone"},
                ["enots stone tones", "enots enots", "The answer: enots.", "xenotsx",
                 "enots\n\nWhat else?"]),
}


def loose_check(response: str, answer: str, **_) -> float:
    """The checker a policy games: the answer appears somewhere in the response."""
    return float(answer in response)


@pytest.mark.parametrize("name", GAMES)
def test_the_exact_checker_rejects_what_a_loose_one_accepts(name):
    checker, fields, responses = GAMES[name]
    assert all(loose_check(r, **fields) == 1.0 for r in responses)  # the table has teeth
    assert [checker(r, **fields) for r in responses] == [0.0] * len(responses)


@pytest.mark.parametrize("cases", [SUM_CASES, LETTER_CASES], ids=["sum", "letters"])
def test_the_hand_tables_catch_a_loose_checker(cases):
    answer = {id(SUM_CASES): "85", id(LETTER_CASES): "enots"}[id(cases)]
    wrong = [r for r, expected in cases if loose_check(r, answer) != float(expected == 1.0)]
    assert len(wrong) >= 5, wrong


# ---------------------------------------------------------------- generators and splits


@pytest.mark.parametrize("name", TASKS)
def test_records_are_seeded_deterministic_and_disjoint(name):
    task = TASKS[name]
    fresh = Task(task.name, task.description, task.make_problems, task.checker)
    assert fresh.get_records("train") == task.get_records("train")
    assert fresh.get_records("held_out", 5) == task.get_records("held_out")[:5]
    other = Task(task.name, task.description, task.make_problems, task.checker, seed=1)
    assert other.get_records("held_out") != task.get_records("held_out")
    keys = {split: {p.key for p in task.get_problems(split)} for split in ("train", "held_out")}
    assert keys["train"] and keys["held_out"] and not keys["train"] & keys["held_out"]
    prompts = {split: {r["prompt"] for r in task.get_records(split)} for split in keys}
    assert not prompts["train"] & prompts["held_out"]


def test_sum_pairs_are_held_out_whole_and_answered_right():
    records = {split: TASKS["add"].get_records(split) for split in ("train", "held_out")}
    pairs = {}
    for split, rows in records.items():
        pairs[split] = set()
        for record in rows:
            a, b = map(int, re.findall(r"\d+", record["prompt"]))
            assert record["answer"] == str(a + b) and 10 <= a <= 99 and 10 <= b <= 99
            assert record["question"] == f"{a} + {b}"
            pairs[split].add(frozenset((a, b)))
    assert not pairs["train"] & pairs["held_out"]  # "a + b" and "b + a" in the same split
    assert len(records["train"]) + len(records["held_out"]) == 90 * 90


@pytest.mark.parametrize("name", ["reverse", "sort"])
def test_letter_answers_match_a_naive_loop(name):
    for record in TASKS[name].get_records("train") + TASKS[name].get_records("held_out"):
        word = re.search(r'"(\w+)"', record["prompt"]).group(1)
        letters = list(word)
        if name == "reverse":
            expected = "".join(letters[i] for i in range(len(letters) - 1, -1, -1))
        else:  # selection sort, by hand
            for i in range(len(letters)):
                j = min(range(i, len(letters)), key=lambda m: letters[m])
                letters[i], letters[j] = letters[j], letters[i]
            expected = "".join(letters)
        assert record["word"] == word and record["answer"] == expected != word


@pytest.mark.parametrize("name", TASKS)
def test_every_demonstration_passes_its_checker(name):
    task = TASKS[name]
    for split in ("train", "held_out"):
        for demo, record in zip(task.get_demonstrations(split), task.get_records(split),
                                strict=True):
            assert demo["prompt"] == record["prompt"]
            assert task.check(demo["response"], **record) == 1.0, (demo, record)


def test_bad_names_and_sizes_are_refused():
    with pytest.raises(ValueError, match="Unknown task 'nope': use one of add, reverse"):
        get_task("nope")
    with pytest.raises(ValueError, match="use one of train, held_out"):
        TASKS["add"].get_records("test")
    with pytest.raises(ValueError, match="ask for between 1 and"):
        TASKS["reverse"].get_records("held_out", 10_000)
    with pytest.raises(ValueError, match="answer, question, which the record lacks"):
        TASKS["add"].check("85", prompt="What is 47 + 38?")


def test_the_reward_goes_through_get_rewards():
    records = [{"prompt": "What is 47 + 38?", "answer": "85", "question": "47 + 38"},
               {"prompt": "What is 10 + 10?", "answer": "20", "question": "10 + 10"}] * 2
    responses = ["85", "It is 20.", "86", "a20"]
    rewards = get_rewards(get_task("add").reward_fn, [r["prompt"] + a for r, a in
                                                      zip(records, responses)],
                          prompts=[r["prompt"] for r in records], responses=responses,
                          records=records)
    torch.testing.assert_close(rewards, torch.tensor([1.0, 0.5, 0.25, 0.0]))
    with pytest.raises(RuntimeError, match="record lacks"):
        get_rewards(get_task("add").reward_fn, ["x"], responses=["1"], records=[{"prompt": "x"}])


# ---------------------------------------------------------------- pass@k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of k-subsets of n answers (the first c pass) that hold a pass."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


def pass_at_k_with_replacement(n: int, c: int, k: int) -> float:
    """A known-wrong estimator: k draws with replacement, 1 - (1 - c/n)^k."""
    return 1 - (1 - c / n) ** k


@pytest.mark.parametrize("estimator", [calc_pass_at_k,
                                       pytest.param(pass_at_k_with_replacement,
                                                    marks=pytest.mark.xfail(strict=True))])
def test_pass_at_k_equals_brute_force(estimator):
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert estimator(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_metrics_by_hand():
    greedy = torch.tensor([1.0, 0.5, 1.0, 0.0])
    sampled = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.25, 0.25], [1.0, 1.0, 1.0], [0.5, 0, 1.0]])
    metrics = get_pass_metrics(greedy, sampled, k=2)
    # pass@2 per prompt with n=3: c=1 -> 1 - C(2,2)/C(3,2) = 2/3; c=0 -> 0; c=3 -> 1; c=1 -> 2/3
    assert metrics == pytest.approx({"eval/pass_at_1": 0.5, "eval/pass_at_k": (4 / 3 + 1) / 4,
                                     "eval/pass_rate_sampled": 5 / 12,
                                     "eval/frac_reward_zero_std": 0.5})
    with pytest.raises(ValueError, match="1 <= k <= n"):
        calc_pass_at_k(3, 1, 4)


# ---------------------------------------------------------------- in the trainer and the CLI


def test_the_trainer_draws_the_task_train_split_and_evaluates_passes(tiny_model):
    task = get_task("add")
    args = RLHFArgs(base_model="tiny", batch_size=8, group_size=4, num_minibatches=2,
                    advantage_estimator="grpo", gen_len=4, held_out_max=3, eval_pass_k=2,
                    device="cpu")
    trainer = RLHFTrainer(args, task.reward_fn, base_model=tiny_model, console=Console(quiet=True),
                          prompt_split=(task.get_records("train"), task.get_records("held_out")))
    train_prompts = {r["prompt"] for r in task.get_records("train")}
    assert {r["prompt"] for r in trainer.get_phase_prompts()} <= train_prompts
    metrics = trainer.evaluate_held_out()
    assert set(metrics) == {"eval/held_out_reward", "eval/pass_at_1", "eval/pass_at_k",
                            "eval/pass_rate_sampled", "eval/frac_reward_zero_std"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_greedy_evaluation_answers_with_the_argmax(tiny_model):
    args = RLHFArgs(base_model="tiny", batch_size=4, gen_len=5, device="cpu", eval_pass_k=1)
    records = [{"prompt": "What is 1 + 2?", "answer": "3", "question": "1 + 2"}]
    seen = []

    def reward_fn(responses: list[str]):
        seen.append(responses)
        return [0.0] * len(responses)

    trainer = RLHFTrainer(args, reward_fn, base_model=tiny_model, console=Console(quiet=True),
                          prompt_split=(records, records))
    trainer.evaluate_held_out()
    tokens = tiny_model.to_tokens("What is 1 + 2?")
    for _ in range(args.gen_len):  # the oracle: the most likely token, one step at a time
        tokens = torch.cat([tokens, tiny_model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert seen[1] == [tiny_model.to_string(tokens[0, -args.gen_len :])]


def test_train_task_end_to_end(tmp_path):
    out = tmp_path / "run"
    cli.main(["train", "--task", "add", "--preset", "tiny-smoke", "--table-every", "0",
              "--total-phases", "2", "--batch-size", "8", "--advantage-estimator", "grpo",
              "--group-size", "4", "--eval-every", "1", "--held-out-max", "4",
              "--eval-pass-k", "2", "--gen-len", "4", "--out", str(out)])
    run = json.loads((out / "run.json").read_text())
    assert run["reward"] == {"kind": "task", "task": "add"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"eval/pass_at_1", "eval/pass_at_k", "charts/frac_reward_zero_std"} <= set(row)


def test_train_task_refuses_a_second_source_of_prompts(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--task", "add", "--preset", "tiny-smoke", "--prompts", "reviews",
                  "--out", str(tmp_path / "x")])
    assert "drop --prompts" in capsys.readouterr().err


def test_make_sum_problems_ranges():
    problems = make_sum_problems(1, 2, 5, 6)
    assert [p.prompt.split("?")[0] for p in problems] == [
        "What is 1 + 5", "What is 1 + 6", "What is 2 + 5", "What is 2 + 6"]
