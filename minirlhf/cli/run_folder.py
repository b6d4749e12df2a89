"""Run folders: one process writes a folder, and a new run never lands on an old one.

Below the command line, above the checkpoints. `locked` holds `run.lock` (the kernel's flock,
so it vanishes with its process however that ends); `claim_folder` refuses a folder that holds
another run's files unless told to delete them; `load_run_policy` reads a finished run's trained
policy back (for `sample` and `export`). What `--resume` may change is `cli.resume`; saving at
phase boundaries and after a crash or SIGTERM is `cli.keeper`.
"""

import argparse
import copy
import dataclasses
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from transformer_lens import HookedTransformer

from minirlhf.args import RLHFArgs
from minirlhf.cli.checkpoint import load_checkpoint
from minirlhf.cli.provenance import check_inputs
from minirlhf.cli.safe_files import open_nofollow, refuse_symlinks, write_text
from minirlhf.models import prepare_policy
from minirlhf.pairs.preferences import read_preferences, split_preferences
from minirlhf.runtime import loading
from minirlhf.runtime.lora import merge_lora
from minirlhf.runtime.tied import untie_if_saved_apart
from minirlhf.runtime.trained_state import load_trained_state

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are then guarded by their files only
    fcntl = None

LOCK_NAME = "run.lock"
PPO_FILES = ("run.json", "checkpoint.pt", "checkpoint.prev.pt")
REWARD_MODEL_FILES = ("reward_model.pt", "reward_model.json")
# Everything a run writes, deleted by --force (sidecars and plots included).
RUN_FILES = (*PPO_FILES, "checkpoint.json", "checkpoint.prev.json", "metrics.jsonl",
             "reward_kl.png", *REWARD_MODEL_FILES, "accuracy.png", "dpo.png", "sft.png",
             "policy.pt", "policy.json")


class RunFolderError(Exception):
    """A run folder that this command may not write; the message says what to do instead."""


def write_json(path: Path, value):
    """Write JSON to a temporary name, then rename: a reader never sees half a file, and a
    symbolic link at `path` is refused, not written through."""
    write_text(path, json.dumps(value, indent=2))


# ---- one process per folder ----

@contextmanager
def locked(folder: Path, command: str) -> Iterator[str | None]:
    """Hold `folder/run.lock` while the block runs; yields a note when a dead process had left
    its run.lock behind (stale: taken over).

    Raises:
        RunFolderError: another live process holds the folder (its PID is named).
        UnsafeFileError: run.lock or a file the run writes is a symbolic link (named).
    """
    folder.mkdir(parents=True, exist_ok=True)
    refuse_symlinks(folder, [LOCK_NAME, *RUN_FILES])
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
        file = os.fdopen(open_nofollow(path, os.O_RDWR | os.O_CREAT), "r+")
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


def read_run_json(path: Path) -> dict:
    """A run's run.json; one that is not JSON (cut short by a full disk, a bad edit) is a
    RunFolderError naming it, not json's bare message."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, "
                             f"column {error.colno}): it was cut short or mis-edited. Repair "
                             "it, or start a new run with another --out.") from None


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
        train, held_out = split_preferences(read_preferences(ns.data), args.held_out_fraction,
                                           seed=args.seed)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    copies = count_copies(train, held_out)
    if copies:
        Console().print(f"[yellow]Warning: {copies} of the {len(held_out)} held-out pairs of "
                        f"{ns.data} are copies of training pairs, so held-out accuracy overstates "
                        "what the model learned: remove the duplicates from the file.",
                        soft_wrap=True)
    return args, train, held_out


def count_copies(train: list, held_out: list) -> int:
    """How many held-out pairs equal a training pair (prompt, chosen and rejected)."""
    seen = {(p.prompt, p.chosen, p.rejected) for p in train}
    return sum((p.prompt, p.chosen, p.rejected) in seen for p in held_out)


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
    base: HookedTransformer | None = None
    """The run's base model untrained (its reference), when `load_run_policy` was asked to keep
    it: a copy, cheaper than loading the model again."""


def load_run_policy(run_dir: Path, device="cpu", accept_changed: bool = False,
                    keep_base: bool = False) -> RunPolicy:
    """The policy a `minirlhf train`, `dpo` or `sft` run trained, as a plain HookedTransformer:
    a LoRA run's adapters merged into the weights, the value head left out; with `keep_base`,
    the untrained base model too (`RunPolicy.base`).

    Raises:
        RunFolderError: `run_dir` holds no run.json.
        CheckpointError: it holds no usable checkpoint.
        ChangedInputError: the base model's folder changed since the run (unless
            `accept_changed`).
    """
    if not (run_dir / "run.json").is_file():
        raise RunFolderError(f"{run_dir} is not a run folder (no run.json): pass the --out of "
                             "`minirlhf train` or `minirlhf dpo`.")
    run = read_run_json(run_dir / "run.json")
    check_inputs(run, accept_changed)
    args = RLHFArgs.from_dict(run["args"])
    checkpoint = load_checkpoint(run_dir, map_location=device)
    policy = loading.load_policy(args.base_model, device)
    base = copy.deepcopy(policy).eval() if keep_base else None
    # The checkpoint holds a TransformerWithValueHead: the policy's weights under "base_model.".
    prefix = "base_model."
    state = {name.removeprefix(prefix): value
             for name, value in checkpoint.trainer["model"].items() if name.startswith(prefix)}
    untie_if_saved_apart(policy, state)
    # A LoRA run's checkpoint holds its adapters: the policy needs them before loading it.
    prepare_policy(policy, args.trainable_layers, args.lora_rank, args.lora_alpha,
                   args.lora_targets)
    # Frozen weights (a frozen trunk, LoRA's base) are not saved: the base model holds them.
    load_trained_state(policy, state)
    return RunPolicy(merge_lora(policy).eval(), run, checkpoint.trainer["phase"],
                     checkpoint.note, base)


@contextmanager
def new_folder(out: Path, force: bool) -> Iterator[Path]:
    """A scratch folder beside `out` to write into; when the block ends without an error it
    becomes `out` (replacing, with `force`, the model folder there), otherwise it is deleted.

    Raises:
        RunFolderError: `out` is ".", "..", a symbolic link or a file, or a non-empty folder
            without `force`, or (with `force`) not a model folder: --force replaces only a
            folder holding config.json and files.
    """
    if out.name in ("", ".", ".."):
        raise RunFolderError(f"--out {out} names the current folder or one above it: give the "
                             "model folder a name of its own, e.g. --out exported-model.")
    if out.is_symlink():
        raise RunFolderError(f"{out} is a symbolic link: minirlhf never writes through one. "
                             "Pick another --out.")
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
    found = [name for name in RUN_FILES if os.path.lexists(folder / name)]
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
    write_text(out / "metrics.jsonl", "")


def describe_existing_run(folder: Path, found: list[str], command: str) -> str:
    files = ", ".join(found)
    force = "add --force to delete those files and start again"
    if any(name in found for name in PPO_FILES):
        if command in ("dpo", "sft"):
            return (f"{folder} already holds a run ({files}). Continue a {command.upper()} run "
                    f"with `minirlhf {command} --out {folder} --resume`, pick another --out, or "
                    f"{force}.")
        if command != "train":
            return f"{folder} holds a PPO run ({files}): pick another --out, or {force}."
        restart = ("" if any(name.startswith("checkpoint") for name in found)
                   else " (it has no checkpoint yet: --resume runs it again from phase 0)")
        return (f"{folder} already holds a run ({files}){restart}. Continue it with "
                f"`minirlhf train --out {folder} --resume`, pick another --out, or {force}.")
    if any(name in found for name in REWARD_MODEL_FILES):
        return f"{folder} holds a reward model ({files}): pick another --out, or {force}."
    return f"{folder} holds another run's {files}: pick another --out, or {force}."
