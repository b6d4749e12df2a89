"""Re-run issue 29's probe list as a tester would: the real command line (`python -m minirlhf
...` in subprocesses), the tiny preset, small phases, temporary folders.

Each probe prints the item of issue 29 it re-runs, what was done, what was seen (exit code, the
last line of output, whether a file was left untouched, a folder left behind, a resume worked)
and PASS or FAIL against the issue's expectation; NOTE where something is only observed.
Scaled down from the issue: a 20,000-line prompt file on `tiny` (the issue: 100,000 lines, phase 0
took 322 s), 24 preference pairs (the issue: 60), torchrun with 2 processes on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/reliability_probes.py            # every probe
    OMP_NUM_THREADS=1 python benchmarks/reliability_probes.py --only 1,9 --jobs 2
    ... --save benchmarks/results/reliability-probes.txt

Items 1-6 live here, 7-12 in `reliability_probes_late.py`; the harness in `probe_harness.py`.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from probe_harness import (
    REPO,
    RM,
    TWO_PHASES,
    Lab,
    edit_json,
    notes_file,
    replace_file,
    rerecord_checkpoint,
    shared_prefs,
    shared_reward_model,
    shared_run,
    untouched,
    wait_for,
    write_table,
)
from reliability_probes_late import LATE_PROBES

# ---- 1. symbolic links in a run folder ----

def probe_symlinks(lab: Lab):
    """`train --resume` with a run file linked to a user's file, then `eval` and `inspect`."""
    base = shared_run(lab)
    for name in ("metrics.jsonl", "run.lock", "reward_kl.png"):
        run, notes = lab.copy(base, "link"), notes_file(lab)
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(notes)
        r = lab.cli("train", "--out", str(run), "--resume", "--total-phases", "3")
        record_link(lab, f"train --resume, {name} -> a user's file", r, notes)
    run, notes = lab.copy(base, "link-eval"), notes_file(lab)
    (run / "eval.json").symlink_to(notes)
    r = lab.cli("eval", "--run", str(run), "--max-prompts", "2", "--samples-per-prompt", "1",
                "--gen-len", "4")
    record_link(lab, "eval --run, eval.json -> a user's file", r, notes)
    run, notes = lab.copy(base, "link-inspect"), notes_file(lab)
    (run / "inspect").mkdir()
    (run / "inspect" / "report.md").symlink_to(notes)
    r = lab.cli("inspect", "--run", str(run), "--prompts", "2", "--layers", "0,1",
                "--scales", "1")
    record_link(lab, "inspect --run, inspect/report.md -> a user's file", r, notes)


def record_link(lab: Lab, what: str, r, notes: Path, item: str = "1"):
    kept = untouched(notes)
    ok = r.rc != 0 and kept and r.has("symbolic link") and not r.traceback
    lab.record(item, what, f"{r.brief()}; target {'untouched' if kept else 'WRITTEN THROUGH'}",
               ok)


def probe_history_payload(lab: Lab):
    """A checkpoint whose history holds a shell command as a string (plain data)."""
    import torch

    run, marker = lab.copy(shared_run(lab), "history"), lab.path("marker")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["trainer"]["history"][0]["charts/reward_mean"] = f"$(touch {marker})"
    torch.save(state, run / "checkpoint.pt")
    rerecord_checkpoint(run / "checkpoint.pt")
    r = lab.cli("train", "--out", str(run), "--resume", "--total-phases", "3")
    clean = all(c.isascii() and "$(" not in c for c in (run / "metrics.jsonl").read_text())
    ok = (r.rc == 0 and r.has("history[0], which is not a row of metric name -> number")
          and r.has("checkpoint.prev.pt") and clean and not marker.exists())
    lab.record("1", "train --resume on a checkpoint whose history[0] holds '$(touch FILE)' "
               "(record re-made to match)",
               f"{r.brief()}; history named: {r.has('history[0]')}; fell back to prev: "
               f"{r.has('Loaded checkpoint.prev.pt')}; string in metrics.jsonl: {not clean}", ok)


# ---- 2. a changed base model folder or reward model ----

def probe_changed_base_model(lab: Lab):
    """A LoRA run on an exported model folder; another model exported into that folder."""
    model, lora = lab.path("model"), lab.path("lora-run")
    steps = [lab.cli("export", "--run", str(shared_run(lab)), "--out", str(model)),
             lab.cli("train", *TWO_PHASES, "--base-model", str(model), "--lora-rank", "2",
                     "--out", str(lora))]
    steps.append(lab.cli("export", "--run", str(lora), "--out", str(model), "--force"))
    if any(step.rc != 0 for step in steps):
        return lab.record("2", "set-up (export, LoRA run, re-export)", steps[-1].brief(), False)
    export = lab.path("export")
    eval_flags = ["--max-prompts", "2", "--samples-per-prompt", "1", "--gen-len", "4"]
    for label, args in [
            ("train --resume", ["train", "--out", str(lora), "--resume", "--total-phases", "3"]),
            ("sample", ["sample", "--run", str(lora), "-n", "2", "--gen-len", "2"]),
            ("export", ["export", "--run", str(lora), "--out", str(export)]),
            ("eval", ["eval", "--run", str(lora), *eval_flags]),
            ("inspect", ["inspect", "--run", str(lora), "--prompts", "2", "--layers", "0,1",
                         "--scales", "1"])]:
        r = lab.cli(*args)
        ok = (r.rc != 0 and r.has("base model folder", "changed") and not r.traceback
              and not export.exists())
        lab.record("2", f"{label} on a LoRA run whose base model folder was re-exported",
                   r.brief(), ok)
    r = lab.cli("sample", "--run", str(lora), "-n", "2", "--gen-len", "2",
                "--accept-changed-inputs")
    lab.record("2", "sample --accept-changed-inputs on that run", r.brief(),
               r.rc == 0 and r.has("--accept-changed-inputs"))


def probe_changed_reward_model(lab: Lab):
    """A PPO run on a reward model; another reward model trained into the same folder."""
    rm, run = lab.copy(shared_reward_model(lab), "rm"), lab.path("rm-run")
    first = lab.cli("train", *TWO_PHASES, "--reward-model", str(rm), "--out", str(run))
    again = lab.cli("reward-model", "--data", str(shared_prefs(lab)), "--out", str(rm),
                    "--force", *RM, "--seed", "7")
    if first.rc or again.rc:
        return lab.record("2", "set-up (PPO on a reward model, retrain it)",
                          f"{first.brief()} / {again.brief()}", False)
    for label, args in [("train --resume", ["--out", str(run), "--resume", "--total-phases",
                                            "3"])]:
        r = lab.cli("train", *args)
        lab.record("2", f"{label} on a PPO run whose reward model folder was retrained",
                   r.brief(), r.rc != 0 and r.has("reward model", "changed"))
    r = lab.cli("sample", "--run", str(run), "-n", "2", "--gen-len", "2")
    lab.record("2", "sample on that run (scores with the reward model)", r.brief(),
               r.rc != 0 and r.has("reward model", "changed"))


# ---- 3. a fallback followed by a kill inside the next save ----

def probe_fallback_then_kill(lab: Lab):
    run = lab.copy(shared_run(lab), "fallback")
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    replace_file(run / "checkpoint.pt", bytes(data))
    process = lab.start("train", "--out", str(run), "--resume", "--total-phases", "60",
                        "--checkpoint-every", "1")
    in_save = wait_for(lambda: (run / "checkpoint.pt.tmp").exists(), process, 300, 0.001)
    process.signal(signal.SIGKILL)
    killed = process.wait(60)
    left = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint"))
    r = lab.cli("train", "--out", str(run), "--resume", "--total-phases", "3")
    ok = in_save and r.rc == 0 and not r.traceback
    lab.record("3", "latest checkpoint damaged; train --resume (falls back to prev); "
               "SIGKILL as soon as checkpoint.pt.tmp appears; train --resume again",
               f"killed inside the save: {in_save} (exit {killed.rc}); left {left}; "
               f"next resume: {r.brief()}", ok)


# ---- 4. no message leads to weights_only=False ----

class Payload:
    """Unpickling this runs a shell command (touches a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def probe_old_format_and_payload(lab: Lab):
    import torch

    run = lab.copy(shared_run(lab), "no-record")
    for name in ("checkpoint.json", "checkpoint.prev.json"):
        (run / name).unlink()
    r = lab.cli("train", "--out", str(run), "--resume", "--total-phases", "3")
    bad = r.has("weights_only=False") or r.has("minirlhf.checkpoint")
    lab.record("4", "train --resume with checkpoint.json (and prev's) deleted", r.brief(),
               r.rc != 0 and not bad and not r.traceback)
    run, marker = lab.copy(shared_run(lab), "payload"), lab.path("marker")
    torch.save({"trainer": Payload(marker), "extra": {}}, run / "checkpoint.pt")
    rerecord_checkpoint(run / "checkpoint.pt")
    r = lab.cli("train", "--out", str(run), "--resume", "--total-phases", "3")
    lab.record("4", "train --resume on a crafted checkpoint.pt (os.system in its pickle) "
               "with a matching record", f"{r.brief()}; payload ran: {marker.exists()}",
               not marker.exists() and r.has("which could run code: refused")
               and not r.traceback)
    old = lab.cli(str(run), module="minirlhf.checkpoint")
    r = lab.cli(str(run), module="minirlhf.cli.checkpoint")
    lab.record("4", "the converter the old message advised, python -m minirlhf.checkpoint DIR "
               "(and python -m minirlhf.cli.checkpoint DIR), on that folder",
               f"{old.brief()} / {r.brief()}; payload ran: {marker.exists()}",
               not marker.exists())
    found = subprocess.run(["grep", "-rn", "weights_only=False", "minirlhf"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    lab.record("4", "grep weights_only=False in the package", found or "no occurrence",
               not found)


# ---- 5. run.json edited by hand ----

def probe_run_json_edit(lab: Lab):
    run = lab.copy(shared_run(lab), "edited")
    before = (run / "checkpoint.pt").read_bytes()

    def edit(data):
        data["args"].update(gen_len=7, kl_coef=0.9)
    edit_json(run / "run.json", edit)
    r = lab.cli("train", "--out", str(run), "--resume", "--total-phases", "3")
    both = r.has("gen_len") and r.has("kl_coef")
    lab.record("5", "train --resume after editing run.json (gen_len 6 -> 7, kl_coef 0.05 -> "
               "0.9)", f"{r.brief()}; both named: {both}; checkpoint untouched: "
               f"{(run / 'checkpoint.pt').read_bytes() == before}",
               r.rc != 0 and r.has("run.json was edited") and r.has("gen_len"))


# ---- 6. reward models with missing weights or no record ----

def probe_reward_model_integrity(lab: Lab):
    import torch

    rm = lab.copy(shared_reward_model(lab), "rm-missing")
    saved = torch.load(rm / "reward_model.pt", weights_only=True)
    saved["state_dict"].pop("reward_head.weight")
    torch.save(saved, rm / "reward_model.pt")
    rerecord_checkpoint(rm / "reward_model.pt")
    out = lab.path("ppo")
    r = lab.cli("train", *TWO_PHASES, "--reward-model", str(rm), "--out", str(out))
    lab.record("6", "train --reward-model with reward_head.weight taken out (record re-made)",
               r.brief(), r.rc != 0 and r.has("reward_head.weight") and not r.traceback)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    lab.record("11", "the --out of that refused run (a configuration error: no folder expected)",
               f"folder left: {out.exists()}, holding {left}", not out.exists())
    rm = lab.copy(shared_reward_model(lab), "rm-unrecorded")
    (rm / "reward_model.json").unlink()
    r = lab.cli("train", *TWO_PHASES, "--reward-model", str(rm), "--out", str(lab.path("p")))
    lab.record("6", "train --reward-model with reward_model.json deleted", r.brief(),
               r.rc != 0 and r.has("reward_model.json") and not r.traceback)


EARLY_PROBES = [("1", probe_symlinks), ("1", probe_history_payload),
                ("2", probe_changed_base_model), ("2", probe_changed_reward_model),
                ("3", probe_fallback_then_kill), ("4", probe_old_format_and_payload),
                ("5", probe_run_json_edit), ("6", probe_reward_model_integrity)]


def run_probe(lab: Lab, item: str, probe):
    try:
        probe(lab)
    except Exception as error:  # a probe that breaks is a FAIL of the probe, not the end
        lab.record(item, f"{probe.__name__} raised", f"{type(error).__name__}: {error}", False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated items or probe functions to run "
                        "(e.g. 1,9,probe_export_out)")
    parser.add_argument("--jobs", type=int, default=1, help="probes run side by side")
    parser.add_argument("--save", type=Path, help="write the outcome table to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ns = parser.parse_args()
    probes = [(i, p) for i, p in [*EARLY_PROBES, *LATE_PROBES]
              if ns.only is None or {i, p.__name__} & set(ns.only.split(","))]
    # A shell starting this script in the background (`... &`) ignores SIGINT, and an ignored
    # signal stays ignored in every command started: a handler here makes theirs the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    root = Path(tempfile.mkdtemp(prefix="minirlhf-probes-"))
    lab, start = Lab(root), time.monotonic()
    try:
        with ThreadPoolExecutor(ns.jobs) as pool:
            list(pool.map(lambda pair: run_probe(lab, *pair), probes))
    finally:
        if not ns.keep:
            shutil.rmtree(root, ignore_errors=True)
    header = (f"minirlhf reliability probes (issue 29), {time.strftime('%Y-%m-%d %H:%M')}, "
              f"commit {git_head()}, {ns.jobs} job(s), OMP_NUM_THREADS=1, {os.cpu_count()} CPUs")
    table = write_table(lab.outcomes, time.monotonic() - start, header)
    print("\n" + table)
    if ns.save:
        ns.save.write_text(table)
    sys.exit(1 if any(o.verdict == "FAIL" for o in lab.outcomes) else 0)


def git_head() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
