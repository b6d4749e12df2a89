"""`minirlhf dpo` stopped by SIGTERM or Ctrl-C (issue 29 item 9): the step in progress is saved,
the command ends with one line (no traceback), and `--resume` continues bit for bit.

The oracle is one uninterrupted run of the same command: the resumed run's metrics.jsonl and
saved policy must equal it exactly. The signal is real, sent by a real `minirlhf dpo` process to
itself at a chosen step (a patch in the script), so the test does not depend on timing.
"""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minirlhf import cli
from minirlhf.cli.checkpoint import load_checkpoint

DPO = ["--base-model", "tiny", "--epochs", "2", "--batch-size", "2", "--eval-every", "3",
       "--checkpoint-every", "3", "--judge", "char_count"]
"""8 training pairs in steps of 2: 8 steps in all; checkpoints after steps 3, 6 and 8."""

SIGNAL_IN_FIFTH_STEP = """
    real_step = dpo_training.train_step
    calls = []
    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # arrives mid-step: step 5 must still be finished and saved
            os.kill(os.getpid(), {signum})
        return real_step(*args, **kwargs)
    dpo_training.train_step = step
"""


def write_prefs(path: Path):
    rows = [{"prompt": "This is", "chosen": f" the{' e' * k}", "rejected": " a cat"}
            for k in range(1, 11)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """One uninterrupted run (its folder holds prefs.jsonl and run/)."""
    folder = tmp_path_factory.mktemp("dpo")
    write_prefs(folder / "prefs.jsonl")
    cli.main(["dpo", "--data", str(folder / "prefs.jsonl"), "--out", str(folder / "run"), *DPO])
    return folder


def run_dpo_process(folder: Path, out: Path, patch: str) -> subprocess.CompletedProcess:
    """`minirlhf dpo` in a new process, on one thread (as the tests run), after `patch`."""
    script = out.parent / "dpo_process.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        import torch
        from minirlhf import cli
        from minirlhf.cli import dpo as dpo_command
        from minirlhf.pairs import dpo_training
        torch.set_num_threads(1)
    """) + textwrap.dedent(patch) + "\ncli.main(['dpo', *sys.argv[1:]])\n")
    return subprocess.run([sys.executable, str(script), "--data", str(folder / "prefs.jsonl"),
                           "--out", str(out), *DPO], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # about 25 s: a process of its own, then a resume
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_and_the_resumed_run_matches(straight, tmp_path, signum):
    out = tmp_path / "run"
    stopped = run_dpo_process(straight, out, SIGNAL_IN_FIFTH_STEP.format(signum=int(signum)))
    assert stopped.returncode == 128 + signum, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr and stopped.stderr.strip() == ""
    assert f"Stopped: saved step 5 to {out / 'checkpoint.pt'}" in stopped.stdout
    assert "--resume" in stopped.stdout
    assert load_checkpoint(out).trainer["phase"] == 5  # not the checkpoint of step 3
    assert len(read_jsonl(out / "metrics.jsonl")) == 5
    cli.main(["dpo", "--out", str(out), "--resume"])
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(straight / "run" / "metrics.jsonl")
    resumed, uninterrupted = load_checkpoint(out).trainer, load_checkpoint(straight / "run").trainer
    assert resumed["phase"] == uninterrupted["phase"] == 8
    for name, weight in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], weight), name


@pytest.mark.slow
def test_without_the_handler_the_steps_since_the_checkpoint_are_lost(straight, tmp_path):
    """The known-wrong behaviour the test above rejects: no handler (SIGTERM's default action)
    kills the process at once; steps 4 and 5 are lost and nothing says how to continue."""
    out = tmp_path / "run"
    patch = textwrap.dedent(SIGNAL_IN_FIFTH_STEP.format(signum=int(signal.SIGTERM))) + (
        "import contextlib\n"
        "dpo_command.stop_between_steps = lambda *args: contextlib.nullcontext(lambda: None)\n")
    stopped = run_dpo_process(straight, out, patch)
    assert stopped.returncode == -signal.SIGTERM
    assert load_checkpoint(out).trainer["phase"] == 3 and "--resume" not in stopped.stdout


def test_ctrl_c_mid_step_exits_with_one_line(straight, tmp_path, monkeypatch, capsys):
    """A second signal (or Ctrl-C where no handler runs) stops at once: the last checkpoint
    stands, and the command says so in one line, exit code 130, instead of a traceback."""
    from minirlhf.pairs import dpo_training

    real_step, calls = dpo_training.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(dpo_training, "train_step", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as caught:
        cli.main(["dpo", "--data", str(straight / "prefs.jsonl"), "--out", str(out), *DPO])
    assert caught.value.code == 130
    printed = capsys.readouterr().out
    assert "Stopped mid-step: the checkpoint of step 3 stands" in printed and "--resume" in printed


@pytest.mark.parametrize("section, field, value", [("dpo", "beta", 0.5), ("args", "gen_len", 3),
                                                   ("reward", "char", "e")])
def test_a_run_json_edit_is_refused_on_resume(straight, tmp_path, capsys, section, field, value):
    """Each checkpoint keeps run.json's configuration: an edit since (a DPO hyperparameter, what
    `sample` reads) is refused by name instead of silently applied (issue 29 item 5)."""
    out = tmp_path / "run"
    shutil.copytree(straight / "run", out)
    run = json.loads((out / "run.json").read_text())
    target = run["dpo"]["args"] if section == "dpo" else run[section]
    assert target[field] != value
    target[field] = value
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit) as stop:
        cli.main(["dpo", "--out", str(out), "--resume"])
    assert stop.value.code == 1
    error = capsys.readouterr().err
    assert "run.json was edited since the last checkpoint" in error and section in error
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(straight / "run" / "metrics.jsonl")
