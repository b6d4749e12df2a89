"""Checkpoints: save a run at a phase boundary, and load it back without trusting the file.

A checkpoint holds the policy and value head, the optimiser and scheduler, every random state,
the phase reached and the metrics so far (`RLHFTrainer.state_dict`), plus whatever the caller
keeps beside them (`extra`). The reference model is not saved: it is the base model as loaded,
so a resumed run reloads it from `args.base_model`. What the files guarantee:

- Loading never runs code. The file holds only tensors and plain Python values (numpy's random
  state becomes a tuple of numbers) and is read with `torch.load(weights_only=True)`, which
  refuses anything else; a pickle written to run code on loading is refused unrun.
- Damage is found. `checkpoint.json` beside the file records its size and SHA-256, checked
  before loading; NaN or infinite weights or optimiser state are refused on saving and loading.
- One bad file never ends a run. The previous checkpoint stays as `checkpoint.prev.pt` and is
  loaded, with a note, when the latest is missing or damaged (a resume then moves the damaged
  one aside, as `checkpoint.damaged-N.pt`). The new file is written to a temporary name and
  renamed, so a crash or a full disk mid-write leaves the latest as it was; and the file a run
  was loaded from is never deleted before a newer one is in place.
- Nothing is written through a symbolic link (`cli.safe_files`).
- Another format is refused with its version and this one; nothing converts it.
"""

import errno
import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minirlhf.cli.safe_files import open_nofollow, refuse_symlinks
from minirlhf.runtime.hashing import sha256_of

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
# 3: random streams as a dict (python, numpy, torch, sample, shuffle, prompt, eval[, cuda]);
# critic-free policies have no value head. Older formats are refused, never converted.
FORMAT = "minirlhf-checkpoint-3"
# TransformerLens keeps -inf in each attention layer's IGNORE buffer: infinite by design.
INFINITE_BY_DESIGN = (".IGNORE",)


class CheckpointError(Exception):
    """A checkpoint that cannot be written or trusted; the message says what to do."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: what `save_checkpoint` was given, and where it came from."""

    trainer: dict
    """The trainer's `state_dict()` (its "rng" as saved: numpy's state a plain tuple)."""
    extra: dict
    """What the caller stored beside it."""
    path: Path
    """The file it was read from (`checkpoint.prev.pt` when the latest was unusable)."""
    note: str | None
    """Why the latest file was passed over, when it was; None otherwise."""


def sidecar(path: Path) -> Path:
    """Where the size and SHA-256 of a checkpoint file are kept (`checkpoint.json`)."""
    return path.with_suffix(".json")


# ---- plain values only, finite numbers only ----

def to_plain(value, where: str = "checkpoint"):
    """`value` with numpy arrays and scalars turned into lists and Python numbers.

    Raises:
        TypeError: naming the first value `torch.load(weights_only=True)` could not read back.
    """
    if isinstance(value, np.ndarray | np.generic):  # before float: np.float64 is a float
        return value.tolist()
    if value is None or isinstance(value, torch.Tensor | str | bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return type(value)(to_plain(item, f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(value, dict):
        plain = type(value)((key, to_plain(item, f"{where}[{key!r}]"))
                            for key, item in value.items())
        if hasattr(value, "_metadata"):  # a module's state_dict keeps its version info here
            plain._metadata = value._metadata
        return plain
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a "
                    "checkpoint holds only tensors, numbers, strings, lists, tuples and dicts, "
                    "so that it loads with torch.load(weights_only=True). Convert it.")


def iter_tensors(value, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with its path (`model.W_E`)."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from iter_tensors(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from iter_tensors(item, f"{where}[{i}]")


def find_non_finite(trainer_state: dict) -> str | None:
    """The first floating-point tensor holding NaN or infinity (weights, optimiser state)."""
    for where, tensor in iter_tensors(trainer_state):
        if where.endswith(INFINITE_BY_DESIGN) or not tensor.is_floating_point():
            continue
        # The sum first (one pass, no temporary): it is finite when every element is.
        if not torch.isfinite(tensor.sum()) and not bool(torch.isfinite(tensor).all()):
            return where
    return None


# ---- saving ----

def save_checkpoint(trainer_state: dict, folder: str | Path, extra: dict | None = None) -> Path:
    """Write `folder/checkpoint.pt` and its `checkpoint.json`, keeping the one before as
    `checkpoint.prev.pt`.

    Args:
        trainer_state: `RLHFTrainer.state_dict()`, taken at a phase boundary.
        extra: plain values kept beside it (samples for the summary, ...).

    Raises:
        CheckpointError: the state holds NaN or infinity, or the disk is full or unwritable.
            The latest checkpoint already in the folder is then left as it was.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    latest, previous = folder / CHECKPOINT_NAME, folder / PREVIOUS_NAME
    payload = to_plain({"trainer": trainer_state, "extra": extra or {}})
    bad = find_non_finite(payload["trainer"])
    if bad is not None:
        raise CheckpointError(f"Not saving phase {trainer_state['phase']}: {bad} holds NaN or "
                              f"infinity. {latest} (if any) is left as it was.")
    refuse_symlinks(folder, [p.name for p in (latest, previous, sidecar(latest),
                                              sidecar(previous))])
    if latest.exists() and not is_intact(latest):
        set_aside(latest)  # else it would replace the good previous file below
    check_free_space(folder, payload)
    if latest.exists():  # room for the new file: disk peak = two files
        for path in (previous, sidecar(previous)):
            path.unlink(missing_ok=True)
    tmp, tmp_json = write_temporary(payload, trainer_state, latest)
    if latest.exists():
        os.replace(latest, previous)
        if sidecar(latest).exists():
            os.replace(sidecar(latest), sidecar(previous))
    os.replace(tmp, latest)
    os.replace(tmp_json, sidecar(latest))
    return latest


def write_temporary(payload: dict, trainer_state: dict, latest: Path) -> tuple[Path, Path]:
    """Write the checkpoint and its `checkpoint.json` under temporary names beside `latest`.

    Raises:
        CheckpointError: the disk is full or unwritable; neither temporary file is left behind.
    """
    tmp = latest.with_name(latest.name + ".tmp")
    tmp_json = sidecar(latest).with_name(sidecar(latest).name + ".tmp")
    try:
        write_file(tmp, lambda file: torch.save(payload, file))
        info = {"format": FORMAT, "bytes": tmp.stat().st_size, "sha256": sha256_of(tmp),
                "phase": trainer_state["phase"], "global_step": trainer_state.get("global_step")}
        write_file(tmp_json, lambda file: file.write(json.dumps(info, indent=2).encode()))
    except BaseException as error:  # a full disk, or Ctrl-C mid-write: no partial file stays
        tmp.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointError(describe_write_error(error, latest)) from error
        raise
    return tmp, tmp_json


def write_file(path: Path, write):
    """Call `write(file)` on `path` opened for writing, then flush it to the disk. Through a
    Python file a full disk raises OSError(ENOSPC), not torch's unexplained RuntimeError."""
    with os.fdopen(open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def storage_bytes(payload) -> int:
    """Bytes of tensor data `torch.save` writes (each storage once, however many views)."""
    storages = {}
    for _, tensor in iter_tensors(payload):
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), tensor.device)] = storage.nbytes()
    return sum(storages.values())


def check_free_space(folder: Path, payload: dict):
    """Refuse before touching any file when the new checkpoint cannot fit on the disk (the
    previous checkpoint's file counts as free: it is deleted to make room)."""
    needed = storage_bytes(payload) + (1 << 20)  # + room for the pickled metadata
    previous, deleted = folder / PREVIOUS_NAME, (folder / CHECKPOINT_NAME).exists()
    free = shutil.disk_usage(folder).free + (previous.stat().st_size
                                             if deleted and previous.exists() else 0)
    if free < needed:
        raise CheckpointError(describe_write_error(OSError(errno.ENOSPC, os.strerror(
            errno.ENOSPC)), folder / CHECKPOINT_NAME, needed, free))


def describe_write_error(error: OSError, latest: Path, needed: int | None = None,
                         free: int | None = None) -> str:
    kept = f"{latest} is left as it was" if latest.exists() else "no checkpoint was written"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        sizes = f" (needs {needed / 1e6:.0f} MB, {free / 1e6:.0f} MB free)" if needed else ""
        return (f"The disk of {latest.parent} is full{sizes}: could not save the checkpoint; "
                f"{kept}. Free some space, then continue with --resume.")
    return f"Could not write the checkpoint {latest}: {error}; {kept}."


# ---- loading ----

SAVE_SETTLE_S = 1.0
"""How long a reader waits before looking again when the files disagree: a save in another
process renames four files one after another, and a reader between two renames would see a
checkpoint and a record from different saves."""


def load_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu",
                    set_aside_damaged: bool = False) -> Checkpoint:
    """The latest usable checkpoint in `folder`: `checkpoint.pt`, else `checkpoint.prev.pt`.
    A reader (`sample`, `export`, ...) that finds the files disagreeing looks once more after
    `SAVE_SETTLE_S`, in case a running save was between two renames.

    Args:
        set_aside_damaged: when the latest is passed over, rename it `checkpoint.damaged-N.pt`
            (a resume, which saves next and holds the run's lock: no save can be running).

    Raises:
        CheckpointError: there is none, or neither file can be trusted; the message says what
            is wrong with each.
    """
    folder = Path(folder)
    if not has_checkpoint(folder):
        raise CheckpointError(
            f"No checkpoint in {folder}: the run has saved none yet (the first comes after "
            f"--checkpoint-every phases). Continue it with: minirlhf train --out {folder} --resume")
    if not set_aside_damaged:
        try:
            checkpoint = find_usable(folder, map_location, False)
            if checkpoint.note is None:
                return checkpoint
        except CheckpointError:
            pass
        time.sleep(SAVE_SETTLE_S)
    return find_usable(folder, map_location, set_aside_damaged)


def find_usable(folder: Path, map_location: str | torch.device,
                set_aside_damaged: bool) -> Checkpoint:
    """`load_checkpoint`'s one look at the folder's two files."""
    problems = []
    for path in [folder / CHECKPOINT_NAME, folder / PREVIOUS_NAME]:
        if not path.exists():
            problems.append(f"There is no {path.name}.")
            continue
        try:
            payload = read_checkpoint(path, map_location)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        note = None
        if problems:
            note = f"{problems[0]} Loaded {path.name} (phase {payload['trainer']['phase']})."
            latest = folder / CHECKPOINT_NAME
            if set_aside_damaged and latest.exists():
                note += f" {latest.name} moved aside to {set_aside(latest).name}."
        return Checkpoint(payload["trainer"], payload["extra"], path, note)
    raise CheckpointError(f"No usable checkpoint in {folder}. " + " ".join(problems))


def set_aside(latest: Path) -> Path:
    """Rename a damaged `checkpoint.pt` (and its record) to `checkpoint.damaged-N.pt`."""
    n = 1
    while (aside := latest.with_name(f"checkpoint.damaged-{n}.pt")).exists():
        n += 1
    os.replace(latest, aside)
    if sidecar(latest).exists() and not sidecar(latest).is_symlink():
        os.replace(sidecar(latest), sidecar(aside))
    return aside


def is_intact(path: Path) -> bool:
    """Whether `path` matches its record (format, size, SHA-256). A save checks the latest this
    way before it deletes the previous file (one hash per save, about a second per GB): a damaged
    latest must never push out the file a run was loaded from."""
    try:
        info = json.loads(sidecar(path).read_text())
        return (info.get("format") == FORMAT and path.stat().st_size == info.get("bytes")
                and sha256_of(path) == info.get("sha256"))
    except (OSError, ValueError, AttributeError):
        return False


def has_checkpoint(folder: str | Path) -> bool:
    """Whether `folder` holds a checkpoint file (usable or not)."""
    return any((Path(folder) / name).exists() for name in (CHECKPOINT_NAME, PREVIOUS_NAME))


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """One checkpoint file, checked against its `checkpoint.json`, then loaded as plain data.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    info = read_sidecar(path)
    size = path.stat().st_size
    if size != info.get("bytes"):
        raise CheckpointError(f"{path} is {size} bytes, but {sidecar(path).name} says "
                              f"{info.get('bytes')}: it was cut short or changed after saving.")
    if sha256_of(path) != info.get("sha256"):
        raise CheckpointError(f"{path} is damaged: its SHA-256 differs from the one in "
                              f"{sidecar(path).name} (a disk or copy error, or an edit).")
    payload = load_plain(path, map_location)
    if not isinstance(payload, dict) or not {"trainer", "extra"} <= set(payload):
        raise CheckpointError(f"{path} is not a minirlhf checkpoint (no trainer state in it).")
    non_finite = find_non_finite(payload["trainer"])
    bad = f"NaN or infinity in {non_finite}" if non_finite else find_bad_plain_data(payload)
    if bad is not None:
        raise CheckpointError(f"{path} holds {bad}: not loaded.")
    return payload


def find_bad_plain_data(payload: dict) -> str | None:
    """What is wrong with the plain values a checkpoint holds (each read back as data, so they
    are checked like the tensors): phase and step counts, and metric rows of name -> number."""
    trainer = payload["trainer"]
    if not isinstance(trainer, dict) or not isinstance(payload["extra"], dict):
        return "a trainer state or extra that is not a dict"
    for key in ("phase", "global_step"):
        if not isinstance(trainer.get(key), int) or isinstance(trainer.get(key), bool):
            return f"a {key} that is not a whole number ({trainer.get(key)!r:.60})"
    history = trainer.get("history", [])
    if not isinstance(history, list):
        return "a history that is not a list"
    for i, row in enumerate(history):
        if not isinstance(row, dict) or not all(
                isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                for k, v in row.items()):
            return f"history[{i}], which is not a row of metric name -> number"
    return None


def read_sidecar(path: Path) -> dict:
    """The size and SHA-256 saved beside a checkpoint; a clear error when there are none, or
    when the file is of another format (refused with both versions: nothing converts it)."""
    try:
        info = json.loads(sidecar(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} has no {sidecar(path).name} beside it, so it cannot be checked (copied "
            "without it, or written before checkpoints were verified): not loaded. Copy both "
            "files, or start the run again with --force.") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{sidecar(path)} is unreadable ({error}).") from None
    found = info.get("format") if isinstance(info, dict) else None
    if found != FORMAT:
        raise CheckpointError(
            f"{path} is in the format {found or 'of no minirlhf version'!s:.60}; this minirlhf "
            f"reads {FORMAT} only: start the run again with --force (or use the minirlhf that "
            "wrote it).")
    return info


def load_plain(path: Path, map_location) -> object:
    """`torch.load(weights_only=True)`, its failures turned into one-line CheckpointErrors."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(error))
        if found:
            raise CheckpointError(f"{path} asks to load the Python object {found.group(1)}, "
                                  "which could run code: refused. Checkpoints hold only "
                                  "tensors and plain values.") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        raise CheckpointError(f"{path} is not a readable checkpoint (UnpicklingError: "
                              f"{detail.group(1) if detail else 'not a safe pickle'}).") from None
    except Exception as error:  # torch's zip reader and pickle raise many kinds
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: "
                              f"{first_line}).") from None
