"""Issue 29's items 7-12, re-run as a tester would (see `reliability_probes.py`)."""

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from probe_harness import (
    FAST,
    LONG_TRAIN,
    PREFS,
    TWO_PHASES,
    Lab,
    edit_json,
    kill_tree,
    metric_lines,
    notes_file,
    read_metrics,
    replace_file,
    same_tensors,
    shared_prefs,
    shared_run,
    untouched,
    wait_for,
    without_times,
    write_demos,
)

# ---- 7 and 8. a large prompt file, an over-long prompt, a prompt file fixed afterwards ----


def probe_large_prompt_file(lab: Lab):
    """20,000 prompts (the issue: 100,000): held-out evaluation capped and in batches."""
    prompts, run = lab.path("prompts.txt"), lab.path("big")
    words = ["movie", "food", "weather", "book", "song", "city", "game", "team"]
    prompts.write_text("".join(f"The {words[i % 8]} number {i} was\n" for i in range(20_000)))
    r = lab.cli("train", *FAST, "--prompts", str(prompts), "--total-phases", "2",
                "--eval-every", "1", "--out", str(run))
    base = read_metrics(shared_run(lab) / "metrics.jsonl")
    rows = read_metrics(run / "metrics.jsonl") if r.rc == 0 else []
    times = [round(row["charts/phase_time"], 1) for row in rows]
    base_times = [round(row["charts/phase_time"], 1) for row in base]
    lab.record("7", "train --prompts with 20,000 lines (2,000 held out), --eval-every 1, 2 "
               "phases", f"{r.brief()}; phase times {times} s (no held-out file: {base_times}"
               f" s); peak memory {r.rss_mb:.0f} MB",
               r.rc == 0 and bool(times) and max(times) < 30 and r.rss_mb < 2000)
    if r.rc != 0:
        return
    lines = prompts.read_text().splitlines(keepends=True)
    replace_file(prompts, "".join(lines[:100] + lines[101:]).encode())
    r = lab.cli("train", "--out", str(run), "--resume", "--total-phases", "3")
    lab.record("8", "that prompt file 'fixed' (one line removed), then train --resume",
               r.brief(), r.rc != 0 and r.has("prompt file", "changed"))


def probe_overlong_prompt(lab: Lab):
    prompts, run = lab.path("prompts.txt"), lab.path("long")
    long = " ".join(["word"] * 400)
    prompts.write_text(f"A short one\nAnother short one\n{long}\nThe last one\n")
    r = lab.cli("train", *FAST, "--prompts", str(prompts), "--total-phases", "2",
                "--out", str(run))
    lab.record("8", "train --prompts with line 3 of 400 words (context 128 tokens)",
               f"{r.brief()}; folder left: {run.exists()}",
               r.rc == 2 and r.has(f"{prompts}:3") and not run.exists() and not r.traceback)


# ---- 9 (and 1, 2, 5, 12 on the same runs). stopping dpo, sft, train, torchrun ----

DPO = ["--base-model", "tiny", "--epochs", "6", "--batch-size", "2", "--eval-every", "3",
       "--base-lr", "1e-3", "--checkpoint-every", "3", "--judge", "char_count"]
SFT = ["--base-model", "tiny", "--epochs", "6", "--batch-size", "2", "--eval-every", "3",
       "--base-lr", "1e-3", "--checkpoint-every", "3", "--held-out-fraction", "0.2"]


def story_dpo(lab: Lab):
    """dpo on pairs given twice; SIGTERM mid-run; copies of the stopped run probed."""
    prefs = lab.path("prefs-twice.jsonl")
    prefs.write_text(shared_prefs(lab).read_text() * 2)
    straight = lab.path("dpo-straight")
    r = lab.cli("dpo", "--data", str(prefs), "--out", str(straight), *DPO)
    warned = r.has("copies of training pairs")
    lab.record("12", "dpo on a preference file holding every pair twice", f"{r.brief()}; "
               f"duplicate warning: {warned}", r.rc == 0 and warned)
    stop_and_resume(lab, "dpo", ["--data", str(prefs), *DPO], straight, signal.SIGTERM, 143,
                    "Stopped: saved step", prefs, {"beta": 0.5}, "dpo.png")


def story_sft(lab: Lab):
    demos = write_demos(lab.path("demos.jsonl"))
    straight = lab.path("sft-straight")
    r = lab.cli("sft", "--data", str(demos), "--out", str(straight), *SFT)
    if r.rc != 0:
        return lab.record("9", "sft set-up", r.brief(), False)
    stop_and_resume(lab, "sft", ["--data", str(demos), *SFT], straight, signal.SIGINT, 130,
                    "Stopped: saved step", demos, {"base_lr": 0.5}, "metrics.jsonl")


def stop_and_resume(lab: Lab, command: str, flags: list[str], straight: Path, number: int,
                    code: int, message: str, data: Path, edit: dict, link: str):
    """Stop `command` after its first checkpoint, probe copies of the stopped folder (a link,
    a run.json edit, a changed data file), then resume it and compare with `straight`."""
    out = lab.path(f"{command}-stopped")
    process = lab.start(command, *flags, "--out", str(out))
    wait_for(lambda: (out / "checkpoint.json").exists(), process, 300, 0.01)
    process.signal(number)
    stopped = process.wait(120)
    copies = [lab.copy(out, f"{command}-{name}") for name in ("link", "edit", "data")]
    resumed = lab.cli(command, "--out", str(out), "--resume")
    same = (resumed.rc == 0 and without_times(read_metrics(out / "metrics.jsonl"))
            == without_times(read_metrics(straight / "metrics.jsonl"))
            and same_tensors(out / "checkpoint.pt", straight / "checkpoint.pt"))
    name = signal.Signals(number).name
    lab.record("9", f"{command}: {name} after its first checkpoint, then {command} --resume",
               f"stop: {stopped.brief()}; resume: exit {resumed.rc}; metrics and final "
               f"checkpoint equal to an uninterrupted run: {same}",
               stopped.rc == code and stopped.has(message) and not stopped.traceback and same)
    probe_stopped_copies(lab, command, copies, data, edit, link)


def probe_stopped_copies(lab: Lab, command: str, copies: list[Path], data: Path, edit: dict,
                         link: str):
    run, notes = copies[0], notes_file(lab)
    (run / link).unlink(missing_ok=True)
    (run / link).symlink_to(notes)
    r = lab.cli(command, "--out", str(run), "--resume")
    kept = untouched(notes)
    lab.record("1", f"{command} --resume on a stopped run, {link} -> a user's file",
               f"{r.brief()}; target {'untouched' if kept else 'WRITTEN THROUGH'}",
               r.rc != 0 and kept and r.has("symbolic link") and not r.traceback)
    edit_json(copies[1] / "run.json", lambda saved: saved[command]["args"].update(edit))
    r = lab.cli(command, "--out", str(copies[1]), "--resume")
    lab.record("5", f"{command} --resume after editing run.json ({edit})", r.brief(),
               r.rc != 0 and r.has("run.json was edited") and not r.traceback)
    lines = data.read_text().splitlines(keepends=True)
    replace_file(data, "".join(lines[:-1]).encode())
    r = lab.cli(command, "--out", str(copies[2]), "--resume")
    lab.record("2", f"{command} --resume after its --data file lost its last line", r.brief(),
               r.rc != 0 and r.has("changed") and not r.traceback)


def probe_train_ctrl_c(lab: Lab):
    out = lab.path("train-stopped")
    process = lab.start("train", *LONG_TRAIN, "--out", str(out))
    wait_for(lambda: metric_lines(out / "metrics.jsonl") >= 2, process)
    process.signal(signal.SIGINT)
    stopped = process.wait(120)
    saved = re.search(r"saved phase (\d+)", stopped.text)
    phases = int(saved.group(1)) if saved else 0
    resumed = lab.cli("train", "--out", str(out), "--resume", "--total-phases", str(phases + 1))
    rows = [row["charts/phase"] for row in read_metrics(out / "metrics.jsonl")]
    ok = (stopped.rc == 130 and saved is not None and not stopped.traceback
          and resumed.rc == 0 and rows == list(range(phases + 1)))
    lab.record("12", "train: Ctrl-C (SIGINT) after 2 phases, then --resume one more phase",
               f"stop: {stopped.brief()}; resume: {resumed.brief()}; phases {rows}", ok)


TORCHRUN = ["--standalone", "--nproc-per-node=2", "-m", "minirlhf", "train"]


def probe_torchrun_sigterm(lab: Lab):
    out = lab.path("torchrun")
    process = lab.start(*TORCHRUN, *LONG_TRAIN, "--device", "cpu", "--out", str(out),
                        module="torch.distributed.run")
    wait_for(lambda: metric_lines(out / "metrics.jsonl") >= 2, process)
    process.signal(signal.SIGTERM)
    stopped = process.wait(120)
    import torch
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]["phase"]
    logged = metric_lines(out / "metrics.jsonl")
    advice = re.search(r"Continue with: torchrun (.*?--resume)", " ".join(stopped.text.split()))
    args = advice.group(1).split() if advice else []
    resumed = lab.cli(*args, "--total-phases", str(saved + 1), module="torch.distributed.run")
    rows = [row["charts/phase"] for row in read_metrics(out / "metrics.jsonl")]
    ok = (saved == logged >= 2 and advice is not None and resumed.rc == 0
          and rows == list(range(saved + 1)))
    lab.record("9", "torchrun 2 processes (CPU): SIGTERM to torchrun after 2 phases; then the "
               "resume command it printed (+ --total-phases N+1)",
               f"stop: {stopped.brief()}; saved phase {saved}, logged {logged}; advice: "
               f"torchrun {advice.group(1) if advice else None}; resume: {resumed.brief()}", ok)


def probe_torchrun_stall(lab: Lab):
    out = lab.path("torchrun-stall")
    process = lab.start(*TORCHRUN, *LONG_TRAIN, "--device", "cpu", "--out", str(out),
                        "--collective-timeout", "5", module="torch.distributed.run")
    wait_for(lambda: metric_lines(out / "metrics.jsonl") >= 1, process)
    stalled = worker_pid(process.pid, rank=1)
    os.kill(stalled, signal.SIGSTOP)
    start = time.monotonic()
    r = process.wait(180)
    waited = time.monotonic() - start
    kill_tree(stalled)
    lab.record("12", "torchrun 2 processes, --collective-timeout 5: SIGSTOP rank 1 after 1 "
               "phase", f"{r.brief()}; ended {waited:.0f} s after the SIGSTOP",
               r.rc != 0 and r.has("process 1 did not reach") and waited < 90)


def worker_pid(launcher: int, rank: int) -> int:
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise RuntimeError(f"no worker of rank {rank}")


def probe_reward_model_sigterm(lab: Lab):
    out = lab.path("rm-stopped")
    process = lab.start("reward-model", "--data", str(shared_prefs(lab)), "--out", str(out),
                        "--base-model", "tiny", "--epochs", "200", "--batch-size", "4")
    wait_for(lambda: metric_lines(out / "metrics.jsonl") >= 2, process)
    process.signal(signal.SIGTERM)
    r = process.wait(120)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    resumable = "--resume" in lab.cli("reward-model", "--help").out
    lab.record("9", "reward-model: SIGTERM mid-training (no checkpoints in the issue)",
               f"{r.brief()}; left {left}; reward-model has --resume: {resumable}",
               None if not r.traceback else False)


# ---- 10. preferences --out over an existing file ----

def probe_preferences_out(lab: Lab):
    existing = lab.path("prefs.jsonl")
    existing.write_bytes(shared_prefs(lab).read_bytes())
    before = existing.read_bytes()
    short = [*PREFS[:4], "--num-pairs", "2", *PREFS[6:]]
    r = lab.cli("preferences", *short, "--out", str(existing))
    lab.record("10", "preferences --out an existing 24-pair file, no --force",
               f"{r.brief()}; file untouched: {existing.read_bytes() == before}",
               r.rc != 0 and existing.read_bytes() == before and r.has("--force"))
    r = lab.cli("preferences", *short, "--out", str(existing), "--force")
    left = [p.name for p in existing.parent.iterdir() if p.name.startswith(existing.name + ".")]
    count = len(existing.read_text().splitlines())
    lab.record("10", "the same with --force", f"{r.brief()}; {count} records now; temporary "
               f"files left: {left}", r.rc == 0 and count == 2 and not left)
    notes, link = notes_file(lab), lab.path("link.jsonl")
    link.symlink_to(notes)
    r = lab.cli("preferences", *short, "--out", str(link), "--force")
    lab.record("10", "preferences --out a symbolic link to a user's file, with --force",
               f"{r.brief()}; target {'untouched' if untouched(notes) else 'WRITTEN THROUGH'}",
               untouched(notes) and not r.traceback)


# ---- 11 and 12. configuration errors and bad inputs: one line, no folder left ----

def probe_config_errors(lab: Lab):
    binary, latin1, broken = lab.path("b.txt"), lab.path("l.txt"), lab.path("p.jsonl")
    binary.write_bytes(bytes(range(256)) * 4)
    latin1.write_bytes("Café au lait was\nThe crème brûlée\n".encode("latin-1"))
    broken.write_text('{"prompt": "A fine"}\n{"prompt": "cut sh\n')
    cases = [("11", "--gen-len 500 (context 128)", ["train", *FAST, "--gen-len", "500"]),
             ("11", "--prefix '' --no-prepend-bos", ["train", *FAST, "--prefix", "",
                                                     "--no-prepend-bos"]),
             ("11", "--prompts a missing file", ["train", *FAST, "--prompts", "/nonexistent"]),
             ("12", "--prompts a binary file", ["train", *FAST, "--prompts", str(binary)]),
             ("12", "--prompts a latin-1 file", ["train", *FAST, "--prompts", str(latin1)]),
             ("12", "--prompts broken JSONL", ["train", *FAST, "--prompts", str(broken)]),
             ("11", "sft --data a missing file", ["sft", "--base-model", "tiny", "--data",
                                                  "/nonexistent.jsonl"]),
             ("11", "dpo --data broken JSONL", ["dpo", "--base-model", "tiny", "--data",
                                                str(broken)])]
    for item, what, args in cases:
        out = lab.path("config")
        r = lab.cli(*args, "--out", str(out))
        lab.record(item, f"{args[0]} {what}", f"{r.brief()}; folder left: {out.exists()}",
                   r.rc in (1, 2) and not out.exists() and not r.traceback
                   and "--resume" not in r.line)


def probe_truncated_run_json(lab: Lab):
    run = lab.copy(shared_run(lab), "truncated")
    text = (run / "run.json").read_text()
    replace_file(run / "run.json", text[: len(text) // 2].encode())
    for args in (["train", "--out", str(run), "--resume", "--total-phases", "3"],
                 ["sample", "--run", str(run), "-n", "2", "--gen-len", "2"]):
        r = lab.cli(*args)
        lab.record("12", f"{args[0]} on a run whose run.json is cut in half", r.brief(),
                   r.rc != 0 and r.has("not valid JSON") and not r.traceback)


def probe_export_out(lab: Lab):
    here = lab.path("here")
    here.mkdir()
    (here / "mine.txt").write_text("keep")
    r = lab.cli("export", "--run", str(shared_run(lab)), "--out", ".", cwd=here)
    lab.record("12", "export --out . (in a folder holding a file)",
               f"{r.brief()}; folder now {sorted(p.name for p in here.iterdir())}",
               r.rc != 0 and sorted(p.name for p in here.iterdir()) == ["mine.txt"]
               and not r.traceback)
    target, link = lab.path("target"), lab.path("link")
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    link.symlink_to(target)
    r = lab.cli("export", "--run", str(shared_run(lab)), "--out", str(link), "--force")
    kept = sorted(p.name for p in target.iterdir()) == ["mine.txt"]
    lab.record("12", "export --out a symbolic link to a folder, with --force",
               f"{r.brief()}; target untouched: {kept}", r.rc != 0 and kept and not r.traceback)


def probe_full_and_read_only_disk(lab: Lab):
    """tmpfs mounts (needs root): 40 MB (a tiny checkpoint is 79 MB), and a read-only one."""
    for what, options, expect in [("a 40 MB disk (the checkpoint needs 79 MB)", "size=40m",
                                   "full"), ("a read-only disk", "size=4m,ro", "Read-only")]:
        mount = lab.path("mnt")
        mount.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                          capture_output=True).returncode != 0:
            lab.record("12", f"train --out on {what}", "not probed: cannot mount a tmpfs", None)
            continue
        try:
            r = lab.cli("train", *TWO_PHASES, "--out", str(mount / "run"))
            left = [p.name for p in (mount / "run").iterdir()] if (mount / "run").exists() else []
            lab.record("12", f"train --out on {what}", f"{r.brief()}; files left: {left}",
                       r.rc != 0 and r.has(expect) and not r.traceback
                       and not any(name.endswith(".tmp") for name in left))
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True)


def probe_concurrent_sample(lab: Lab):
    """`sample` started while `train` saves a checkpoint every phase (the race is not forced:
    three readers, each loading at some point of the run)."""
    out = lab.path("busy")
    train = lab.start("train", *FAST, "--total-phases", "60", "--checkpoint-every", "1",
                      "--out", str(out))
    wait_for(lambda: metric_lines(out / "metrics.jsonl") >= 2, train)
    readers = [lab.start("sample", "--run", str(out), "-n", "2", "--gen-len", "2")
               for _ in range(3)]
    results = [reader.wait(300) for reader in readers]
    still = train.alive()
    train.signal(signal.SIGTERM)
    train.wait(120)
    damaged = [r.has("cut short or changed") for r in results]
    lab.record("12", "3 x sample --run while train saves every phase (train still running "
               f"after: {still})", "; ".join(r.brief() for r in results),
               all(r.rc == 0 for r in results) and not any(damaged))


def probe_wandb_offline(lab: Lab):
    try:
        socket.getaddrinfo("api.wandb.ai", 443)
        network = "api.wandb.ai resolves: the probe is not offline"
    except OSError:
        network = "no network (api.wandb.ai does not resolve)"
    out = lab.path("wandb")
    r = lab.cli("train", *FAST, "--total-phases", "1", "--wandb", "--wandb-mode", "online",
                "--out", str(out), env={"WANDB_API_KEY": "0" * 40}, timeout=300)
    lab.record("12", f"train --wandb --wandb-mode online, dummy 40-char key, {network}",
               f"{r.brief()}; offline note: {r.has('logging offline instead')}",
               r.rc == 0 and r.has("logging offline instead"))


def probe_negative_lr(lab: Lab):
    out = lab.path("negative")
    r = lab.cli("train", *FAST, "--total-phases", "1", "--base-lr", "-1e-3", "--out", str(out))
    lab.record("12", "train --base-lr -1e-3 (no '=')", r.brief(),
               not r.has("expected one argument") and not r.traceback)


LATE_PROBES = [("7", probe_large_prompt_file), ("8", probe_overlong_prompt),
               ("9", story_dpo), ("9", story_sft), ("12", probe_train_ctrl_c),
               ("9", probe_torchrun_sigterm), ("12", probe_torchrun_stall),
               ("9", probe_reward_model_sigterm), ("10", probe_preferences_out),
               ("11", probe_config_errors), ("12", probe_truncated_run_json),
               ("12", probe_export_out), ("12", probe_full_and_read_only_disk),
               ("12", probe_concurrent_sample), ("12", probe_wandb_offline),
               ("12", probe_negative_lr)]
