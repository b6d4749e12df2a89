"""Nothing lost, nothing let in (issue 29): symlinks in a run folder, a kill inside the save
after a fallback, old checkpoint formats, plain data in a checkpoint.

Oracles: the bytes of the file a symlink points to (untouched), `load_checkpoint` itself (a
usable checkpoint is left, or not), and a file planted to run code (a marker file it would
create). Each check names the known-wrong behaviour it replaces.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minirlhf import cli
from minirlhf.cli import checkpoint as checkpoint_module
from minirlhf.cli.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minirlhf.cli.report import append_metrics, plot_metrics
from minirlhf.cli.safe_files import UnsafeFileError

FAST = ["--preset", "tiny-smoke", "--table-every", "0", "--batch-size", "4", "--gen-len", "6"]
TWO_PHASES = [*FAST, "--total-phases", "2", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-phase tiny run with a checkpoint after each phase (latest and previous)."""
    out = tmp_path_factory.mktemp("run") / "run"
    cli.main(["train", *TWO_PHASES, "--out", str(out)])
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    for path in run.iterdir():
        if path.is_file() and not path.name.endswith(".png"):
            (out / path.name).write_bytes(path.read_bytes())
    return out


# ---- 1. symlinks in a run folder are refused, their targets untouched ----

@pytest.mark.parametrize("name", ["metrics.jsonl", "run.lock", "reward_kl.png"])
def test_a_symlinked_run_file_is_refused_and_its_target_untouched(finished_run, tmp_path,
                                                                 capsys, name):
    out = copy_run(finished_run, tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(notes)
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(out), "--resume", "--total-phases", "3"])
    assert notes.read_text() == "my notes\n"
    error = capsys.readouterr().err
    assert f"{out / name} is a symbolic link" in error and "Traceback" not in error


def test_the_writers_refuse_a_symlink_themselves(tmp_path):
    """Below the folder check: the metrics line, the plot and the checkpoint's files refuse a
    link too (the old `open(path, "a")` and `savefig(path)` wrote through it)."""
    target = tmp_path / "target"
    target.write_text("keep")
    for name in ("metrics.jsonl", "plot.png", "checkpoint.pt.tmp"):
        (tmp_path / name).symlink_to(target)
    with pytest.raises(UnsafeFileError):
        append_metrics(tmp_path / "metrics.jsonl", {"a": 1.0})
    row = {"charts/phase": 1.0, "charts/reward_mean": 0.0, "charts/reward_std": 0.0,
           "charts/kl": 0.0}
    with pytest.raises(UnsafeFileError):
        plot_metrics([row], tmp_path / "plot.png")
    with pytest.raises((UnsafeFileError, CheckpointError)):
        save_checkpoint({"phase": 1, "global_step": 1, "w": torch.ones(2)}, tmp_path)
    assert target.read_text() == "keep"


def test_a_history_row_that_is_not_numbers_is_refused(tmp_path):
    """Plain data passes weights-only loading, so its shape is checked: a metric row holding a
    shell command (`"$(touch FILE)"`) is refused, not written to metrics.jsonl."""
    state = {"phase": 1, "global_step": 1, "history": [{"charts/kl": "$(touch FILE)"}]}
    save_checkpoint(state, tmp_path)
    with pytest.raises(CheckpointError, match=r"history\[0\]"):
        load_checkpoint(tmp_path)
    state["history"] = [{"charts/kl": 0.5}]
    save_checkpoint(state, tmp_path)
    assert load_checkpoint(tmp_path).trainer["history"] == [{"charts/kl": 0.5}]


# ---- 3. a kill inside the save after a fallback leaves a usable checkpoint ----

def damage(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("set_aside", [True, False])
def test_a_kill_inside_the_save_after_a_fallback_leaves_a_checkpoint(tmp_path, monkeypatch,
                                                                     set_aside):
    """The latest is damaged, the previous loads; the next save is killed mid-write. The old
    save deleted checkpoint.prev.pt first (and renamed the damaged latest over it): nothing
    usable was left. With or without the resume's set-aside, the loaded file survives."""
    for phase in (1, 2):
        save_checkpoint({"phase": phase, "global_step": phase, "w": torch.ones(2)}, tmp_path)
    damage(tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path, set_aside_damaged=set_aside)
    assert loaded.trainer["phase"] == 1 and loaded.note

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as SIGKILL would, mid-write; the temporary file goes

    monkeypatch.setattr(checkpoint_module.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"phase": 2, "global_step": 2, "w": torch.ones(2)}, tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path).trainer["phase"] == 1
    save_checkpoint({"phase": 2, "global_step": 2, "w": torch.ones(2)}, tmp_path)
    assert load_checkpoint(tmp_path).trainer["phase"] == 2
    assert load_checkpoint(tmp_path).note is None


def test_a_resume_moves_a_damaged_latest_aside(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    damage(out / "checkpoint.pt")
    cli.main(["train", "--out", str(out), "--resume", "--total-phases", "3"])
    assert "moved aside to checkpoint.damaged-1.pt" in capsys.readouterr().out
    assert (out / "checkpoint.damaged-1.pt").exists()
    assert load_checkpoint(out).trainer["phase"] == 3


# ---- 4. no converter, no weights_only=False; old formats refused with the version ----

PAYLOAD = """
import os, torch
class Boom:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"trainer": Boom(), "extra": {{}}}}, {path!r})
"""


def test_the_converter_is_gone_and_never_runs_a_payload(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "checkpoint.pt"
    subprocess.run([sys.executable, "-c", PAYLOAD.format(marker=marker, path=str(path))],
                   check=True)
    result = subprocess.run([sys.executable, "-m", "minirlhf.cli.checkpoint", str(tmp_path)],
                            capture_output=True, text=True)
    assert not marker.exists()
    assert not hasattr(checkpoint_module, "upgrade_checkpoint")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path)
    assert "python -m" not in str(caught.value) and not marker.exists()
    assert result.returncode == 0 and not result.stdout  # a module with nothing to run
    source = Path(checkpoint_module.__file__).read_text() + "".join(
        p.read_text() for p in Path(cli.__file__).parent.glob("*.py"))
    assert "weights_only=False" not in source


def test_an_older_format_is_refused_naming_both_versions(tmp_path):
    save_checkpoint({"phase": 1, "global_step": 1}, tmp_path)
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    assert record["format"] == "minirlhf-checkpoint-3"
    (tmp_path / "checkpoint.json").write_text(json.dumps({**record,
                                                          "format": "minirlhf-checkpoint-2"}))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path)
    message = str(caught.value)
    assert message.count("minirlhf-checkpoint-2") == 1  # once, though both files are named
    assert "minirlhf-checkpoint-3" in message and "python -m" not in message
    os.remove(tmp_path / "checkpoint.json")
    with pytest.raises(CheckpointError, match="no checkpoint.json") as caught:
        load_checkpoint(tmp_path)
    assert "python -m" not in str(caught.value)


# ---- 10. preferences --out: guarded and atomic ----

PREFS = ["preferences", "--base-model", "tiny", "--prompt", "This is", "--num-pairs", "2",
         "--gen-len", "4", "--batch-size", "8", "--judge", "char_count", "--char", "e",
         "--min-gap", "0.0"]


def test_preferences_keeps_an_existing_file_unless_forced(tmp_path, capsys):
    """The old command overwrote --out (60 records became 2) in place, with no --force."""
    out, target = tmp_path / "prefs.jsonl", tmp_path / "elsewhere.jsonl"
    out.write_text("60 records\n")
    with pytest.raises(SystemExit):
        cli.main([*PREFS, "--out", str(out)])
    assert "already exists" in capsys.readouterr().err and out.read_text() == "60 records\n"
    target.write_text("keep\n")
    (tmp_path / "link.jsonl").symlink_to(target)
    with pytest.raises(SystemExit):
        cli.main([*PREFS, "--out", str(tmp_path / "link.jsonl"), "--force"])
    assert "symbolic link" in capsys.readouterr().err and target.read_text() == "keep\n"
    cli.main([*PREFS, "--out", str(out), "--force"])
    assert len(out.read_text().splitlines()) == 2
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


# ---- 9. Ctrl-C: one line, no traceback ----

def test_ctrl_c_after_the_save_exits_with_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the second rollout: phase 1 is saved and the command says so. The old command
    then re-raised KeyboardInterrupt, and Python printed a 30-line traceback under that line."""
    from minirlhf.trainer import RLHFTrainer

    real_phase = RLHFTrainer.train_one_phase

    def interrupted(self):
        if self.phase == 1:
            raise KeyboardInterrupt
        return real_phase(self)

    monkeypatch.setattr(RLHFTrainer, "train_one_phase", interrupted)
    with pytest.raises(SystemExit) as caught:
        cli.main(["train", *TWO_PHASES, "--checkpoint-every", "5", "--out", str(tmp_path)])
    assert caught.value.code == 130
    printed = capsys.readouterr()
    assert "Stopped: saved phase 1" in printed.out and printed.err == ""  # that line alone
    assert load_checkpoint(tmp_path).trainer["phase"] == 1


# ---- 12. one line for the errors of the file system, the parser and run.json ----

def test_a_negative_number_in_scientific_notation_is_a_value(capsys):
    """argparse's own pattern (-1, -0.5) took -1e-3 for an option: "expected one argument"."""
    ns = cli.build_parser().parse_args(["train", "--base-lr", "-1e-3", "--kl-coef", "-2.5E+1"])
    assert ns.base_lr == -1e-3 and ns.kl_coef == -25.0
    with pytest.raises(SystemExit):
        cli.main(["train", *FAST, "--base-lr", "-1e-3"])
    error = capsys.readouterr().err
    assert "base_lr" in error and "expected one argument" not in error


def test_a_read_only_out_is_one_line(tmp_path, monkeypatch, capsys):
    from minirlhf.cli import train as train_command

    def read_only(out, *args):
        raise OSError(errno.EROFS, "Read-only file system", str(out / "run.json"))

    monkeypatch.setattr(train_command, "start_run_folder", read_only)
    with pytest.raises(SystemExit) as caught:
        cli.main(["train", *FAST, "--total-phases", "1", "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert caught.value.code == 1 and error.count("\n") == 1
    assert "run.json: Read-only file system (the disk is read-only: pick another --out)" in error


@pytest.mark.parametrize("command", ["train", "sample", "dpo"])
def test_a_truncated_run_json_is_named_in_one_line(finished_run, tmp_path, capsys, command):
    """json's own error ("Expecting value: line 1 column 1") named no file, under a traceback."""
    out = copy_run(finished_run, tmp_path)
    text = (out / "run.json").read_text()
    (out / "run.json").write_text(text[: len(text) // 2])
    argv = {"train": ["train", "--out", str(out), "--resume"],
            "sample": ["sample", "--run", str(out)], "dpo": ["dpo", "--out", str(out), "--resume"]}
    with pytest.raises(SystemExit):
        cli.main(argv[command])
    error = capsys.readouterr().err
    assert f"{out / 'run.json'} is not valid JSON" in error and error.count("\n") == 1


def test_held_out_copies_of_training_pairs_are_reported(tmp_path, capsys):
    """The old split said nothing: held-out accuracy then measured memorised pairs."""
    from minirlhf.cli.run_folder import args_and_pairs
    from minirlhf.pairs.dpo_training import DPOArgs

    rows = [{"prompt": "This is", "chosen": f" a{' e' * (k % 3)}", "rejected": " b"}
            for k in range(12)]  # 3 distinct pairs, 4 copies each
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    parser = cli.build_parser()
    ns = parser.parse_args(["dpo", "--data", str(tmp_path / "prefs.jsonl"), "--out", "x"])
    _, train, held_out = args_and_pairs(ns, parser, DPOArgs)
    printed = capsys.readouterr().out
    assert f"{len(held_out)} of the {len(held_out)} held-out pairs" in printed
    assert "remove the duplicates" in printed


@pytest.mark.parametrize("name", [".", "..", "link"])
def test_export_refuses_the_current_folder_and_a_symlinked_out(tmp_path, monkeypatch, name):
    """The old new_folder raised ValueError ("has an empty name") on `--out .`, and after the
    whole export, rmtree's OSError on a link: neither as a one-line error."""
    from minirlhf.cli.run_folder import RunFolderError, new_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "model")
    with pytest.raises(RunFolderError, match="current folder|symbolic link"):
        with new_folder(Path(name), force=True):
            pass
    assert (tmp_path / "model").is_dir() and (tmp_path / "link").is_symlink()
