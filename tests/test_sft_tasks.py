"""`minirlhf sft --task NAME` on tiny: the task's demonstrations and split, the text RL will
read, bit-exact --resume, and `train --task NAME --base-model <that run>` with the SFT model as
policy and reference."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from minirlhf import cli, sft
from minirlhf.args import RLHFArgs
from minirlhf.cli import sft as sft_cli
from minirlhf.cli import train as train_cli
from minirlhf.cli.checkpoint import load_checkpoint
from minirlhf.cli.presets import PRESETS, SFT_TASK_ARGS, TASK_PRESET
from minirlhf.cli.run_folder import load_run_policy
from minirlhf.cli.sft import describe_rendering_change
from minirlhf.demonstrations import to_demonstrations
from minirlhf.runtime import lora
from minirlhf.runtime.loading import load_policy, load_tiny_model
from minirlhf.sft import SFTArgs, tokenize_demonstrations
from minirlhf.tasks import get_task

TINY = ["--base-model", "tiny", "--no-chat-template", "--prepend-bos", "--batch-size", "2",
        "--held-out-max", "4", "--eval-every", "2", "--checkpoint-every", "2",
        "--trainable-layers", "none", "--lora-rank", "0"]
"""SFT on tiny (no chat template) with the tiny-smoke preset's BOS, so RL reads the same text."""
LORA = ["--trainable-layers", "1", "--lora-rank", "2", "--lora-alpha", "4"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def task_sft(tmp_path_factory):
    """A finished LoRA SFT run on `add`, 8 demonstrations in 4 steps, at an LR that moves the
    weights well away from tiny's."""
    out = tmp_path_factory.mktemp("task") / "sft"
    cli.main(["sft", "--task", "add", "--num-demonstrations", "8", "--out", str(out), *TINY,
              *LORA, "--base-lr", "1e-2"])
    return out


def test_sft_task_learns_the_train_split_and_holds_out_the_held_out_one(task_sft):
    run = json.loads((task_sft / "run.json").read_text())
    assert run["sft"]["task"] == "add" and run["sft"]["num_demonstrations"] == 8
    assert "data" not in run["sft"] and len(run["sft"]["demonstrations_sha256"]) == 64
    task = get_task("add")
    assert run["args"]["prefix"] == task.get_demonstrations("held_out", 1)[0]["prompt"]
    assert len(read_jsonl(task_sft / "metrics.jsonl")) == 4  # 8 demonstrations, 2 a step
    assert (task_sft / "policy.pt").is_file()


def test_task_defaults_render_as_the_rl_task_preset():
    """`sft --task` without flags learns the text `train --task` samples from."""
    rl = PRESETS[TASK_PRESET]["args"]
    for key in ("base_model", "chat_template", "prepend_bos"):
        assert SFT_TASK_ARGS[key] == rl[key], key
    assert SFT_TASK_ARGS["prompt_template"] == rl.get("prompt_template")
    assert SFT_TASK_ARGS["append_eos"] is rl["stop_at_eos"] is True


CHAT = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<bot>"


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_a_task_demonstration_is_the_chat_prompt_then_the_answer_then_eos(prepend_bos):
    """Oracle: the chat template filled by hand, tokenized without BOS (as the task preset
    has it), the answer, then EOS. With an extra BOS the batch is not that text."""
    model = load_tiny_model(n_layers=1, d_model=16, n_heads=1)
    model.tokenizer.chat_template = CHAT
    rendering = {key: SFT_TASK_ARGS[key] for key in ("chat_template", "prompt_template")}
    args = SFTArgs(base_model="tiny", prepend_bos=prepend_bos, **rendering)
    demo = get_task("add").get_demonstrations("train", 1)[0]
    batch = tokenize_demonstrations(model, to_demonstrations([demo]), args)
    text = f"<user>{demo['prompt']}</user><bot>"
    expected = (model.tokenizer(text, add_special_tokens=False)["input_ids"]
                + model.tokenizer(demo["response"], add_special_tokens=False)["input_ids"]
                + [model.tokenizer.eos_token_id])
    assert (batch.tokens[0].tolist() == expected) is (not prepend_bos)


def test_sft_task_refuses_mixed_sources(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    cases = [(["--task", "add", "--data", str(tmp_path / "d.jsonl")], "not both"),
             (["--data", str(tmp_path / "d.jsonl"), "--num-demonstrations", "4"], "goes with"),
             (["--task", "add", "--num-demonstrations", "0"], "goes with"),
             ([], "--data or --task"),
             (["--task", "add", "--num-demonstrations", "99999"], "asked for 99999")]
    for flags, message in cases:
        with pytest.raises(SystemExit):
            cli.main(["sft", "--out", str(tmp_path / "o"), *TINY, *flags])
        assert message in capsys.readouterr().err, flags
    assert not (tmp_path / "o").exists()


def interrupt(out, monkeypatch, flags):
    """`sft` stopped (as by Ctrl-C) in its fifth step: the checkpoint of step 4 stays."""
    real_step, calls = sft.SFTTrainer.train_step, []

    def stop_in_fifth_step(self, rows):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(self, rows)

    monkeypatch.setattr(sft.SFTTrainer, "train_step", stop_in_fifth_step)
    with pytest.raises(SystemExit):
        cli.main(["sft", "--out", str(out), *flags])
    monkeypatch.undo()


def test_a_resumed_task_sft_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    flags = ["--task", "reverse", "--num-demonstrations", "12", *TINY, "--base-lr", "1e-3"]
    cli.main(["sft", "--out", str(tmp_path / "straight"), *flags])
    interrupt(tmp_path / "resumed", monkeypatch, flags)
    assert load_checkpoint(tmp_path / "resumed").trainer["phase"] == 4
    with pytest.raises(SystemExit):
        cli.main(["sft", "--out", str(tmp_path / "resumed"), "--resume", "--task", "sort"])
    assert "drop --task" in capsys.readouterr().err
    cli.main(["sft", "--out", str(tmp_path / "resumed"), "--resume"])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert read_jsonl(resumed / "metrics.jsonl") == read_jsonl(straight / "metrics.jsonl")
    assert (resumed / "policy.pt").read_bytes() == (straight / "policy.pt").read_bytes()


def test_resume_refuses_a_task_whose_demonstrations_changed(tmp_path, monkeypatch, capsys):
    flags = ["--task", "add", "--num-demonstrations", "12", *TINY]
    interrupt(tmp_path / "run", monkeypatch, flags)
    real = sft_cli.get_task_splits

    def changed(name, count):  # as if the task's generator had changed
        train, held_out = real(name, count)
        return [d._replace(response=d.response + "0") for d in train], held_out

    monkeypatch.setattr(sft_cli, "get_task_splits", changed)
    with pytest.raises(SystemExit):
        cli.main(["sft", "--out", str(tmp_path / "run"), "--resume"])
    assert "demonstrations have changed" in capsys.readouterr().err


def test_train_task_from_a_task_sft_run(task_sft, tmp_path, monkeypatch, capsys):
    """End to end: `train --task add --base-model <sft run>` for 2 GRPO phases; the reference's
    log-probs are the SFT model's (LoRA merged), not tiny's."""
    made = []

    def keep_trainer(*args, **kwargs):
        made.append(real_make_trainer(*args, **kwargs))
        return made[-1]

    real_make_trainer = train_cli.make_trainer
    monkeypatch.setattr(train_cli, "make_trainer", keep_trainer)
    out = tmp_path / "grpo"
    cli.main(["train", "--task", "add", "--preset", "tiny-smoke", "--base-model", str(task_sft),
              "--advantage-estimator", "grpo", "--group-size", "4", "--batch-size", "8",
              "--total-phases", "2", "--eval-every", "1", "--held-out-max", "4",
              "--eval-pass-k", "2", "--gen-len", "4", "--stop-at-eos", "--table-every", "0",
              "--out", str(out)])
    assert "rendered otherwise" not in capsys.readouterr().err  # SFT learned this text
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 2 and all("eval/pass_at_1" in row for row in rows)
    reference, sft_model = made[0].reference.model, load_run_policy(task_sft).policy
    tokens = sft_model.to_tokens(get_task("add").get_demonstrations("held_out", 2)[1]["prompt"])
    with torch.no_grad(), lora.adapters_off(reference):
        ref_logprobs = reference(tokens).log_softmax(-1)
        sft_logprobs = sft_model(tokens).log_softmax(-1)
        base_logprobs = load_policy("tiny")(tokens).log_softmax(-1)
    torch.testing.assert_close(ref_logprobs, sft_logprobs, atol=1e-5, rtol=0)
    assert (ref_logprobs - base_logprobs).abs().max() > 1e-2  # the check can fail


def test_train_warns_when_it_renders_prompts_otherwise_than_sft(task_sft):
    same = RLHFArgs(base_model=str(task_sft), prepend_bos=True, stop_at_eos=True)
    assert describe_rendering_change(same) is None
    other = RLHFArgs(base_model=str(task_sft), prepend_bos=False, stop_at_eos=True)
    assert "prepend_bos True -> False" in describe_rendering_change(other)
    assert describe_rendering_change(RLHFArgs(base_model="tiny")) is None


# ---------------------------------------------------------------- benchmarks/tasks.py


def load_benchmark():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "tasks.py"
    spec = importlib.util.spec_from_file_location("tasks_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpo_phases_are_sized_from_the_probes_phases_after_the_first():
    size_phases = load_benchmark().size_phases
    # By hand: the first phase (10 s) warms up and is left out; median(4, 6) = 5 s; 60 s / 5 s.
    assert size_phases([10.0, 4.0, 6.0], 60.0, 3, 200) == 12  # median(10, 4, 6) would give 10
    assert size_phases([10.0, 4.0, 6.0], 6.0, 3, 200) == 3  # never fewer than the probe ran
    assert size_phases([1.0, 1.0], 900.0, 3, 200) == 200
    assert size_phases([2.0], 9.0, 1, 200) == 4  # a probe of one phase: that phase


@pytest.mark.slow  # about a minute: SFT, GRPO and three evaluations on tiny, then resumed
def test_the_benchmark_runs_its_stages_and_skips_those_done(tmp_path, monkeypatch, capsys):
    benchmark = load_benchmark()
    argv = ["tasks.py", "--smoke", "--tasks", "add", "--threads", "1", "--runs-dir",
            str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    monkeypatch.setattr("sys.argv", argv)
    benchmark.main()
    result = json.loads((tmp_path / "results" / "tasks-smoke-add.json").read_text())
    assert set(benchmark.STAGES) <= set(result)
    assert result["sft"]["samples"] == 8 and result["grpo"]["samples"] == 8
    assert 0.0 <= result["grpo"]["pass_at_1"] <= 1.0 and result["grpo"]["phases"] == 1
    assert "| `add` |" in (tmp_path / "results" / "tasks-smoke.md").read_text()
    capsys.readouterr()
    benchmark.main()
    assert capsys.readouterr().out.count("skipped") == 3


@pytest.mark.parametrize("task", ["add", "three-words", "question"])
def test_sft_task_without_a_count_learns_at_most_every_training_problem(task, tmp_path):
    """The format tasks have 148 training problems, fewer than the default 256: `sft --task
    three-words` learns all 148 instead of failing."""
    parser = cli.build_parser()
    ns = parser.parse_args(["sft", "--task", task, "--out", str(tmp_path / "run")])
    _, (train, held_out) = sft_cli.args_and_demonstrations(ns, parser)
    problems = len(get_task(task).get_problems("train"))
    assert len(train) == min(256, problems) and held_out
