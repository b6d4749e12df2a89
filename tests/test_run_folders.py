"""Run folders through the command line: kill -9 and SIGTERM then --resume, one process per
folder, no run landing on another, flags given with --resume, damaged checkpoints.

The oracle for every interruption is one uninterrupted run of the same command: the resumed
run's metrics (every key but the timings) must equal it exactly. Interruptions are real signals
sent to a real `minirlhf train` process, at a chosen moment (scripts below patch the process to
signal itself), so the tests do not depend on timing.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minirlhf import cli
from minirlhf.cli.checkpoint import load_checkpoint

FAST = ["--preset", "tiny-smoke", "--table-every", "0", "--batch-size", "4", "--gen-len", "6"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timings(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.endswith("_time")} for m in metrics]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[dict]:
    """The metrics of one uninterrupted 3-phase run: what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    cli.main(["train", *FAST, "--checkpoint-every", "10", "--out", str(out)])
    return without_timings(read_jsonl(out / "metrics.jsonl"))


def run_train_process(tmp_path: Path, patch: str, *flags: str) -> subprocess.CompletedProcess:
    """`minirlhf train` in a new process, after running `patch` in it (on one thread, as the
    tests here run, so its numbers match theirs bit for bit)."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        import torch
        from minirlhf import cli
        from minirlhf.cli import train as train_command
        from minirlhf.trainer import RLHFTrainer
        torch.set_num_threads(1)
    """) + textwrap.dedent(patch) + "\ncli.main(['train', *sys.argv[1:]])\n")
    return subprocess.run([sys.executable, str(script), *FAST, *flags], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)


SIGTERM_IN_SECOND_ROLLOUT = """
    real_phase = RLHFTrainer.train_one_phase
    def phase(self):
        if self.phase == 1:
            self.rollout_phase()  # the random streams have moved on: the save must undo that
            os.kill(os.getpid(), signal.SIGTERM)
        return real_phase(self)
    RLHFTrainer.train_one_phase = phase
"""

SIGTERM_IN_SECOND_LEARNING_PHASE = """
    real_objective = RLHFTrainer.compute_rlhf_objective
    def objective(self, mb):
        if self.phase == 1 and self.global_step == 3:  # 2 minibatches a phase: 1 step into it
            os.kill(os.getpid(), signal.SIGTERM)
        return real_objective(self, mb)
    RLHFTrainer.compute_rlhf_objective = objective
"""

SIGKILL_AFTER_THIRD_METRICS_LINE = """
    real_append = train_command.append_metrics
    def append(path, metrics):
        real_append(path, metrics)
        if metrics["charts/phase"] == 2:  # written, but its checkpoint never will be
            os.kill(os.getpid(), signal.SIGKILL)
    train_command.append_metrics = append
"""


def test_sigterm_saves_like_ctrl_c_and_the_resumed_run_matches(straight, tmp_path, capsys):
    out = tmp_path / "run"
    stopped = run_train_process(tmp_path, SIGTERM_IN_SECOND_ROLLOUT, "--checkpoint-every", "10",
                                "--out", str(out))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "saved phase 1" in stopped.stdout and "--resume" in stopped.stdout
    assert load_checkpoint(out).trainer["phase"] == 1
    cli.main(["train", "--out", str(out), "--resume", "--table-every", "0"])
    assert without_timings(read_jsonl(out / "metrics.jsonl")) == straight


def test_sigterm_mid_update_finishes_the_phase_then_saves_it(straight, tmp_path, capsys):
    """Ctrl-C there would lose the phase (the last boundary's checkpoint stands); a SIGTERM
    waits for the phase to end, so phase 2 is saved."""
    out = tmp_path / "run"
    stopped = run_train_process(tmp_path, SIGTERM_IN_SECOND_LEARNING_PHASE,
                                "--checkpoint-every", "10", "--out", str(out))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "saved phase 2" in stopped.stdout and len(read_jsonl(out / "metrics.jsonl")) == 2
    assert load_checkpoint(out).trainer["phase"] == 2
    cli.main(["train", "--out", str(out), "--resume", "--table-every", "0"])
    assert without_timings(read_jsonl(out / "metrics.jsonl")) == straight


def test_kill_9_then_resume_matches_without_duplicate_lines(straight, tmp_path, capsys):
    out = tmp_path / "run"
    killed = run_train_process(tmp_path, SIGKILL_AFTER_THIRD_METRICS_LINE,
                               "--checkpoint-every", "2", "--out", str(out))
    assert killed.returncode == -signal.SIGKILL
    assert len(read_jsonl(out / "metrics.jsonl")) == 3 and (out / "run.lock").exists()
    assert load_checkpoint(out).trainer["phase"] == 2
    cli.main(["train", "--out", str(out), "--resume", "--table-every", "0"])
    printed = capsys.readouterr().out
    assert "no longer running" in printed  # the dead process's run.lock was taken over
    assert without_timings(read_jsonl(out / "metrics.jsonl")) == straight
    assert not (out / "run.lock").exists()


# ---- one process per folder, no run over another ----

LOCK_HOLDER = """
import sys, time
from pathlib import Path
from minirlhf.cli.run_folder import locked
with locked(Path(sys.argv[1]), "train"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_process_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit):
            cli.main(["train", *FAST, "--out", str(out)])
        error = capsys.readouterr().err
        assert f"is in use by process {holder.pid}" in error and "another --out" in error
        assert not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    cli.main(["train", *FAST, "--total-phases", "1", "--out", str(out)])
    assert f"left by process {holder.pid}" in capsys.readouterr().out
    assert len(read_jsonl(out / "metrics.jsonl")) == 1


def test_a_run_killed_before_its_first_checkpoint_is_not_overwritten(straight, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    killed = run_train_process(tmp_path, SIGKILL_AFTER_THIRD_METRICS_LINE, "--checkpoint-every",
                               "10", "--out", str(out))
    assert killed.returncode == -signal.SIGKILL and not (out / "checkpoint.pt").exists()
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "run.lock"}
    with pytest.raises(SystemExit):
        cli.main(["train", *FAST, "--seed", "5", "--out", str(out)])
    error = capsys.readouterr().err
    assert "already holds a run (run.json, metrics.jsonl)" in error and "--resume" in error
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "run.lock"} == files
    cli.main(["train", "--out", str(out), "--resume", "--table-every", "0"])
    assert "starts again from phase 0" in capsys.readouterr().out
    assert without_timings(read_jsonl(out / "metrics.jsonl")) == straight


def test_force_replaces_a_run_and_says_what_it_deleted(tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", *FAST, "--total-phases", "1", "--out", str(out)])
    cli.main(["train", *FAST, "--total-phases", "2", "--seed", "7", "--force", "--out", str(out)])
    assert "--force: deleted run.json, checkpoint.pt, checkpoint.json" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["args"]["seed"] == 7
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    assert not (out / "checkpoint.prev.pt").exists()  # phase 2 is the only save of this run


PREFS = [{"prompt": "It was ", "chosen": good, "rejected": bad}
         for good, bad in [("lovely", "awful"), ("great", "dull"), ("superb", "bad")] * 2]
RM = ["--base-model", "tiny", "--epochs", "1", "--batch-size", "2", "--normalize-samples", "0"]


def test_reward_model_refuses_a_reward_model_or_a_ppo_run(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PREFS))
    cli.main(["reward-model", "--data", str(data), "--out", str(tmp_path / "rm"), *RM])
    cli.main(["train", *FAST, "--total-phases", "1", "--out", str(tmp_path / "ppo")])
    capsys.readouterr()
    for folder, found in [("rm", "a reward model (metrics.jsonl, reward_model.pt"),
                          ("ppo", "a PPO run (run.json, checkpoint.pt")]:
        files = {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir() if p.is_file()}
        with pytest.raises(SystemExit):
            cli.main(["reward-model", "--data", str(data), "--out", str(tmp_path / folder), *RM])
        assert found in capsys.readouterr().err.replace("\n", " ")
        assert {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()
                if p.is_file()} == files


# ---- flags given with --resume ----

@pytest.fixture()
def two_phase_run(tmp_path) -> Path:
    out = tmp_path / "run"
    cli.main(["train", *FAST, "--total-phases", "2", "--out", str(out)])
    return out


def test_resume_refuses_flags_that_change_the_run_and_names_each(two_phase_run, capsys):
    files = {p.name: p.read_bytes() for p in two_phase_run.iterdir() if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(two_phase_run), "--resume", "--total-phases", "3",
                  "--seed", "3", "--batch-size", "8", "--kl-coef", "0.5", "--direction", "neg"])
    error = capsys.readouterr().err.replace("\n", " ")
    for refused in ["--seed 3 (the run has 1)", "--batch-size 8 (the run has 4)",
                    "--kl-coef 0.5 (the run has 0.05)", "--direction neg (the run has None)"]:
        assert refused in error
    assert "--total-phases" in error.split("may change:")[1]
    assert {p.name: p.read_bytes() for p in two_phase_run.iterdir() if p.is_file()} == files


def test_resume_extends_a_run_with_the_schedule_it_announced(two_phase_run, capsys):
    # Flags equal to the saved values are accepted silently.
    cli.main(["train", "--out", str(two_phase_run), "--resume", "--table-every", "0",
              "--total-phases", "5", "--seed", "1", "--batch-size", "4"])
    printed = capsys.readouterr().out.replace("\n", " ")
    assert "--resume applies total_phases: 2 -> 5." in printed
    # tiny-smoke: no warmup, final_scale 0.1. By hand: phase 3 of 5 is 3/4 of the way down
    # from 1 to 0.1, so 1 - 0.9 * 3/4 = 0.325; the old 2-phase schedule had ended at 0.1.
    assert "from phase 3 its multiplier is 0.325 (it would have been 0.1)" in printed
    metrics = read_jsonl(two_phase_run / "metrics.jsonl")
    assert [m["charts/phase"] for m in metrics] == [0, 1, 2, 3, 4]
    assert metrics[3]["charts/lr_base"] == pytest.approx(1e-3 * 0.325)
    run = json.loads((two_phase_run / "run.json").read_text())
    assert run["args"]["total_phases"] == 5
    assert run["resumes"] == [{"phase": 2, "changed": {"total_phases": [2, 5]}}]


def test_resume_refuses_a_total_below_the_phases_done(two_phase_run, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(two_phase_run), "--resume", "--total-phases", "1"])
    assert "below the 2 phases this run has done" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1, got 0"),
    (["--table-every", "-1"], "--table-every must be at least 0"),
    (["--resume", "--force"], "give one of them"),
])
def test_bad_run_flags_fail_before_anything_runs(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        cli.main(["train", *FAST, "--out", str(out), *flags])
    assert message in capsys.readouterr().err and not (out / "run.json").exists()


# ---- damaged and crafted checkpoints through the command line ----

def test_sample_falls_back_to_the_previous_checkpoint_then_names_both_problems(tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", *FAST, "--checkpoint-every", "1", "--out", str(out)])
    latest = out / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    cli.main(["sample", "--run", str(out), "-n", "2"])
    captured = capsys.readouterr()
    assert "after 2 phases" in captured.out and "cut short" in captured.err
    (out / "checkpoint.prev.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as caught:
        cli.main(["sample", "--run", str(out), "-n", "2"])
    error = capsys.readouterr().err
    assert caught.value.code == 1 and error.count("\n") == 1 and "No usable checkpoint" in error


class WritesAFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_sample_and_resume_never_run_a_payload(tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "payload-ran"
    cli.main(["train", *FAST, "--total-phases", "1", "--out", str(out)])
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    payload["extra"]["x"] = WritesAFile(marker)
    torch.save(payload, out / "checkpoint.pt")
    data = (out / "checkpoint.pt").read_bytes()  # a matching sidecar, as an attacker would write
    (out / "checkpoint.json").write_text(json.dumps({
        **json.loads((out / "checkpoint.json").read_text()), "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest()}))
    for command in (["sample", "--run", str(out)], ["train", "--out", str(out), "--resume"]):
        with pytest.raises(SystemExit):
            cli.main(command)
        assert "could run code: refused" in capsys.readouterr().err
    assert not marker.exists()


def test_a_wrong_sigterm_handler_would_lose_the_phases(tmp_path):
    """The known-wrong behaviour the SIGTERM test rejects: without the handler (the default
    action), the process dies at once and nothing is saved."""
    out = tmp_path / "run"
    patch = textwrap.dedent(SIGTERM_IN_SECOND_ROLLOUT) + (
        "import contextlib\n"
        "train_command.stop_on_sigterm = lambda *args: contextlib.nullcontext()\n")
    stopped = run_train_process(tmp_path, patch, "--checkpoint-every", "10", "--out", str(out))
    assert stopped.returncode == -signal.SIGTERM and not (out / "checkpoint.pt").exists()
    assert os.path.exists(out / "run.json")


def test_a_crash_mid_update_saves_nothing_and_resume_restarts_cleanly(straight, tmp_path,
                                                                       monkeypatch, capsys):
    """Weights moved after the last boundary: saving them with that boundary's random states
    would be a checkpoint of no real moment. The optimiser step count tells."""
    from minirlhf.trainer import RLHFTrainer

    real_learning = RLHFTrainer.learning_phase

    def crash_after_learning(self, memory):
        metrics = real_learning(self, memory)  # optimiser steps taken, the phase not counted
        if self.phase == 1:
            raise KeyboardInterrupt
        return metrics

    monkeypatch.setattr(RLHFTrainer, "learning_phase", crash_after_learning)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", *FAST, "--checkpoint-every", "10", "--out", str(out)])
    assert "Stopped mid-update: no checkpoint was saved" in capsys.readouterr().out
    assert not (out / "checkpoint.pt").exists()
    monkeypatch.setattr(RLHFTrainer, "learning_phase", real_learning)
    cli.main(["train", "--out", str(out), "--resume", "--table-every", "0"])
    assert without_timings(read_jsonl(out / "metrics.jsonl")) == straight
