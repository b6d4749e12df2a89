"""Run folders: one process writes a folder, a new run never lands on an old one, and a resumed
run keeps its configuration except where a change is safe.

Below the command line, above the checkpoints. `locked` holds `run.lock` (the kernel's flock,
so it vanishes with its process however that ends); `claim_folder` refuses a folder that holds
another run's files unless told to delete them; `resume_changes` sorts the flags given with
`--resume` into those applied and those refused, and `resume_trainer` loads the checkpoint;
`CheckpointKeeper` saves at phase boundaries, and after a crash or a signal saves the last
boundary if no weight has moved since; `stop_on_sigterm` makes SIGTERM take Ctrl-C's path.
`load_run_policy` reads a finished run's trained policy back (for `sample` and `export`).
"""

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from transformer_lens import HookedTransformer

from minirlhf.args import RLHFArgs
from minirlhf.cli.checkpoint import (
    CheckpointError,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from minirlhf.models import load_trained_state, prepare_policy
from minirlhf.optim import get_lr_scale
from minirlhf.pairs.preferences import read_preferences, split_preferences
from minirlhf.runtime import distributed, loading
from minirlhf.runtime.lora import merge_lora

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are then guarded by their files only
    fcntl = None

LOCK_NAME = "run.lock"
PPO_FILES = ("run.json", "checkpoint.pt", "checkpoint.prev.pt")
REWARD_MODEL_FILES = ("reward_model.pt", "reward_model.json")
# Everything a run writes, deleted by --force (sidecars and plots included).
RUN_FILES = (*PPO_FILES, "checkpoint.json", "checkpoint.prev.json", "metrics.jsonl",
             "reward_kl.png", *REWARD_MODEL_FILES, "accuracy.png")
# RLHFArgs fields a resumed run may change: how long it runs, where it logs, how it computes.
# Every other field would make the phases before and after the resume different experiments.
RESUMABLE = ("total_phases", "use_wandb", "wandb_project_name", "wandb_entity", "precision",
             "fast_path", "recompute_ref_logits")


class RunFolderError(Exception):
    """A run folder that this command may not write; the message says what to do instead."""


def write_json(path: Path, value):
    """Write JSON to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


# ---- one process per folder ----

@contextmanager
def locked(folder: Path, command: str) -> Iterator[str | None]:
    """Hold `folder/run.lock` while the block runs; yields a note when a dead process had left
    its run.lock behind (stale: taken over).

    Raises:
        RunFolderError: another live process holds the folder (its PID is named).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield None
        return
    path = folder / LOCK_NAME
    file, stale = take_lock(path)
    file.write(json.dumps({"pid": os.getpid(), "command": f"minirlhf {command}",
                           "host": socket.gethostname(), "started": time.strftime("%c")}))
    file.flush()
    try:
        yield stale and f"Took over {path}, left by {stale}, which is no longer running."
    finally:
        path.unlink(missing_ok=True)  # before unlocking, so no one locks a file about to go
        file.close()


def take_lock(path: Path):
    """The open, flock-ed lock file, emptied, and who held it before (None: no one)."""
    while True:
        file = open(path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(path)
            file.close()
            raise RunFolderError(f"{path.parent} is in use by {holder}: wait for it to end or "
                                 "stop it, or pick another --out.") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
            stale = describe_holder(path) if path.stat().st_size else None
            file.seek(0)
            file.truncate()
            return file, stale
        file.close()  # its holder deleted the file just as we locked it: lock the new one


def describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return (f"process {holder['pid']} ({holder['command']} on {holder['host']}, started "
                f"{holder['started']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def claimed(folder: Path, command: str, force: bool, console: Console) -> Iterator[None]:
    """Hold `folder` for `command` while the block runs: locked (saying so when a dead process's
    lock is taken over) and claimed (a previous run's files deleted only with `force`, listed)."""
    with locked(folder, command) as stale:
        if stale:
            console.print(f"[yellow]{stale}", soft_wrap=True)
        removed = claim_folder(folder, command, force)
        if removed:
            console.print(f"[yellow]--force: deleted {', '.join(removed)} from {folder}.",
                          soft_wrap=True)
        yield


def args_and_pairs(ns: argparse.Namespace, parser: argparse.ArgumentParser, cls: type) -> tuple:
    """`cls` (RewardModelArgs, DPOArgs) from the flags, and the preference file `ns.data` split
    into (train, held-out) pairs; a bad flag or file ends the command with its message."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        args = cls(**{k: v for k, v in vars(ns).items() if k in names})
        train, heldout = split_preferences(read_preferences(ns.data), args.heldout_fraction,
                                           seed=args.seed)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return args, train, heldout


# ---- a finished run's policy ----

@dataclasses.dataclass
class RunPolicy:
    """The trained policy of a run folder, and where it came from."""

    policy: HookedTransformer
    """The base model of run.json with the checkpoint's weights, in eval mode."""
    run: dict
    """The run's run.json."""
    phase: int
    """The phase (PPO) or step (DPO) the checkpoint was saved at."""
    note: str | None
    """Why the latest checkpoint was passed over for the previous one, if it was."""


def load_run_policy(run_dir: Path, device="cpu") -> RunPolicy:
    """The policy a `minirlhf train` or `minirlhf dpo` run trained, as a plain HookedTransformer:
    a LoRA run's adapters merged into the weights, the value head left out.

    Raises:
        RunFolderError: `run_dir` holds no run.json.
        CheckpointError: it holds no usable checkpoint.
    """
    if not (run_dir / "run.json").is_file():
        raise RunFolderError(f"{run_dir} is not a run folder (no run.json): pass the --out of "
                             "`minirlhf train` or `minirlhf dpo`.")
    run = json.loads((run_dir / "run.json").read_text())
    args = RLHFArgs.from_dict(run["args"])
    checkpoint = load_checkpoint(run_dir, map_location=device)
    policy = loading.load_policy(args.base_model, device)
    # A LoRA run's checkpoint holds its adapters: the policy needs them before loading it.
    prepare_policy(policy, args.trainable_layers, args.lora_rank, args.lora_alpha,
                   args.lora_targets)
    # The checkpoint holds a TransformerWithValueHead: the policy's weights under "base_model.".
    prefix = "base_model."
    # Frozen weights (a frozen trunk, LoRA's base) are not saved: the base model holds them.
    load_trained_state(policy, {name.removeprefix(prefix): value
                                for name, value in checkpoint.trainer["model"].items()
                                if name.startswith(prefix)})
    return RunPolicy(merge_lora(policy).eval(), run, checkpoint.trainer["phase"],
                     checkpoint.note)


@contextmanager
def new_folder(out: Path, force: bool) -> Iterator[Path]:
    """A scratch folder beside `out` to write into; when the block ends without an error it
    becomes `out` (replacing, with `force`, the model folder there), otherwise it is deleted.

    Raises:
        RunFolderError: `out` is a file, or a non-empty folder without `force`, or (with `force`)
            not a model folder: --force replaces only a folder holding config.json and files.
    """
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} is a file: pick a folder for --out.")
    contents = list(out.iterdir()) if out.is_dir() else []
    if contents and not force:
        raise RunFolderError(f"{out} is not empty: pick another --out, or add --force to "
                             "replace the model folder there.")
    if contents and (not (out / "config.json").is_file() or any(p.is_dir() for p in contents)):
        raise RunFolderError(f"{out} does not look like a model folder (config.json and files "
                             "only), so --force leaves it alone: delete it yourself, or pick "
                             "another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield scratch
        if out.exists():
            shutil.rmtree(out)
        os.replace(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---- a new run never lands on an old one ----

def claim_folder(folder: Path, command: str, force: bool) -> list[str]:
    """Check `folder` holds no other run's files; with `force`, delete them.

    Returns:
        the names of the files deleted.

    Raises:
        RunFolderError: naming the run found and what to do instead.
    """
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if not found:
        return []
    if not force:
        raise RunFolderError(describe_existing_run(folder, found, command))
    for name in found:
        (folder / name).unlink()
    return found


def start_run_folder(out: Path, run: dict, force: bool, console: Console):
    """Write a new run's run.json and an empty metrics.jsonl (call it holding the lock)."""
    removed = claim_folder(out, "train", force)
    if removed:
        console.print(f"[yellow]--force: deleted {', '.join(removed)} from {out}.",
                      soft_wrap=True)
    write_json(out / "run.json", run)
    (out / "metrics.jsonl").write_text("")


def describe_existing_run(folder: Path, found: list[str], command: str) -> str:
    files = ", ".join(found)
    force = "add --force to delete those files and start again"
    if any(name in found for name in PPO_FILES):
        if command == "dpo":
            return (f"{folder} already holds a run ({files}). Continue a DPO run with `minirlhf "
                    f"dpo --out {folder} --resume`, pick another --out, or {force}.")
        if command != "train":
            return f"{folder} holds a PPO run ({files}): pick another --out, or {force}."
        restart = ("" if any(name.startswith("checkpoint") for name in found)
                   else " (it has no checkpoint yet: --resume runs it again from phase 0)")
        return (f"{folder} already holds a run ({files}){restart}. Continue it with "
                f"`minirlhf train --out {folder} --resume`, pick another --out, or {force}.")
    if any(name in found for name in REWARD_MODEL_FILES):
        return f"{folder} holds a reward model ({files}): pick another --out, or {force}."
    return f"{folder} holds another run's {files}: pick another --out, or {force}."


# ---- flags given with --resume ----

def resume_changes(run: dict, given: dict[str, object]) -> tuple[dict, list[str]]:
    """Sort the flags given with `--resume` against the run's saved configuration.

    Args:
        run: the run.json of the run: "preset", "args" (RLHFArgs values), "reward" (its spec).
        given: dest -> value of every RLHFArgs, preset or reward flag typed on the command line
            (`reward_model` as a resolved path, as run.json stores it).

    Returns:
        the changes to apply (field -> (saved, new)), and one line for each refused flag.
    """
    changes, refused = {}, []
    for name, value in given.items():
        saved = saved_value(run, name)
        if value == saved:
            continue
        if name in RESUMABLE:
            changes[name] = (saved, value)
        else:
            refused.append(f"--{name.replace('_', '-')} {value} (the run has {saved})")
    return changes, refused


def saved_value(run: dict, name: str):
    """What run.json holds for the flag `name`."""
    if name in run["args"]:
        return run["args"][name]
    saved = {"preset": run["preset"], "reward": run["reward"]["kind"],
             "reward_model": run["reward"].get("path")}
    return saved[name] if name in saved else run["reward"].get(name)


def resumed_config(run: dict, given: dict[str, object]) -> tuple[dict, dict]:
    """The saved run.json with the flags a resumed run may change applied, and those changes.

    Raises:
        RunFolderError: naming every flag that would change the run's configuration, or the
            value a changed field may not take.
    """
    changes, refused = resume_changes(run, given)
    if refused:
        raise RunFolderError(refused_message(refused))
    try:
        args = RLHFArgs.from_dict({**run["args"], **{k: new for k, (_, new) in changes.items()}})
    except ValueError as error:
        raise RunFolderError(f"--resume: {error}") from None
    return {**run, "args": args.to_dict()}, changes


def refused_message(refused: list[str]) -> str:
    allowed = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE)
    return ("--resume continues a run with its saved configuration; these flags would change "
            f"it: {'; '.join(refused)}. Drop them, or start a new run with another --out. "
            f"Flags a resumed run may change: {allowed}, --checkpoint-every, --table-every, "
            "--wandb-mode.")


def describe_lr_change(args, old_total: int, phase: int) -> str:
    """What stretching the learning-rate schedule to a new total_phases does at `phase`."""
    old = get_lr_scale(phase, args.warmup_steps, old_total, args.final_scale)
    new = get_lr_scale(phase, args.warmup_steps, args.total_phases, args.final_scale)
    return (f"The LR schedule now decays to final_scale over {args.total_phases} phases "
            f"instead of {old_total}: from phase {phase} its multiplier is {new:.3g} "
            f"(it would have been {old:.3g}).")


def resume_trainer(trainer, out: Path, run: dict, changes: dict,
                   console: Console) -> tuple[dict, int | None]:
    """Load the run's checkpoint into the trainer (none yet: it starts again from phase 0),
    rewrite metrics.jsonl to match, and record the changes in run.json.

    Returns:
        the `extra` saved beside the trainer state, and the phase loaded (None: none was).
    """
    extra, saved_phase = {}, None
    if has_checkpoint(out):
        checkpoint = load_checkpoint(out, map_location=trainer.device)
        if checkpoint.note:
            console.print(f"[yellow]{checkpoint.note}", soft_wrap=True)
        trainer.load_state_dict(checkpoint.trainer)
        extra, saved_phase = checkpoint.extra, trainer.phase
    else:
        console.print("[yellow]No checkpoint yet: the run starts again from phase 0 with its "
                      "saved config (the same seed gives the same curve).")
    if trainer.phase > trainer.args.total_phases:
        raise RunFolderError(f"--total-phases {trainer.args.total_phases} is below the "
                             f"{trainer.phase} phases this run has done: give at least that.")
    if not distributed.is_main():  # process 0 alone writes the folder
        return extra, saved_phase
    # Phases after the checkpoint are re-run, so their old metric lines go.
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in trainer.history))
    console.print(f"Resumed at phase {trainer.phase} of {trainer.args.total_phases}.")
    for name, (saved, new) in changes.items():
        console.print(f"[yellow]--resume applies {name}: {saved} -> {new}.", soft_wrap=True)
    if "total_phases" in changes:
        console.print(describe_lr_change(trainer.args, changes["total_phases"][0],
                                         trainer.phase + 1), soft_wrap=True)
    if changes:
        resumes = run.get("resumes", []) + [{"phase": trainer.phase, "changed": changes}]
        write_json(out / "run.json", {**run, "resumes": resumes})
    return extra, saved_phase


# ---- saving at boundaries, and after a crash or a signal ----

class CheckpointKeeper:
    """Saves the run at phase boundaries, and after a crash the last boundary it saw.

    Between boundaries the weights move (an optimiser step) while the random states run on,
    so the keeper remembers each boundary's random states and optimiser step count, and after a
    crash saves only when no optimiser step was taken since.
    """

    def __init__(self, trainer, out: Path, every: int, total_phases: int, extra: dict,
                 saved_phase: int | None):
        self.out, self.every, self.total_phases, self.extra = out, every, total_phases, extra
        self.saved_phase = saved_phase
        self.stop_signal: int | None = None  # a SIGTERM waiting for the phase to end
        self.mark_boundary(trainer)

    def mark_boundary(self, trainer):
        """Remember the trainer's state now, at a phase boundary."""
        self.phase, self.global_step = trainer.phase, trainer.global_step
        self.rng = trainer.get_rng_state()

    def is_mid_update(self, trainer) -> bool:
        """Whether the trainer has moved past the last boundary (an optimiser step, a phase)."""
        return trainer.global_step != self.global_step or trainer.phase != self.phase

    def stop_if_asked(self):
        """At a phase boundary, after saving: stop if a SIGTERM arrived during the phase."""
        if self.stop_signal is not None:
            raise SystemExit(128 + self.stop_signal)

    def is_due(self, phase: int) -> bool:
        """Whether a checkpoint is due after `phase` phases (every `every`, and the last)."""
        return phase % self.every == 0 or phase == self.total_phases

    def save(self, trainer):
        state = trainer.state_dict(self.rng)  # every process: it gathers their random states
        if distributed.is_main():
            save_checkpoint(state, self.out, self.extra)
        self.saved_phase = trainer.phase

    def save_after_crash(self, trainer) -> str:
        """Save the last boundary if the weights still hold it; says what happened."""
        kept = (f"the checkpoint of phase {self.saved_phase} stands"
                if self.saved_phase is not None else "no checkpoint was saved")
        if self.is_mid_update(trainer):
            return f"[red]Stopped mid-update: {kept}."
        if distributed.get_world_size() > 1:  # saving gathers from processes that may be gone
            return f"[yellow]Stopped: {kept} (several processes save only at checkpoints)."
        if trainer.phase == 0 or trainer.phase == self.saved_phase:
            return f"[yellow]Stopped at phase {trainer.phase}: {kept}."
        try:
            self.save(trainer)
        except CheckpointError as error:
            return f"[red]Stopped, and could not save: {error}"
        return f"[yellow]Stopped: saved phase {trainer.phase} to {self.out / 'checkpoint.pt'}."


@contextmanager
def stop_on_sigterm(keeper: CheckpointKeeper, trainer):
    """While the block runs, SIGTERM (job schedulers, `docker stop`) stops the run as Ctrl-C
    does, raising SystemExit(143), so the completed phases are saved. Between updates it stops at
    once; during a learning phase it waits for the phase to end (`keeper.stop_if_asked`), so that
    phase is saved too. A second SIGTERM stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if keeper.stop_signal is None and keeper.is_mid_update(trainer):
            keeper.stop_signal = signum
            return
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
