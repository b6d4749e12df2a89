"""Checkpoint files: plain data only, verified on loading, a fallback, and safe writes.

Oracles: `torch.load(weights_only=True)` itself (the file must pass torch's own safe loader),
`hashlib` for the sidecar, random numbers drawn before saving and after loading, the bytes of the
files on disk, and the OS's /dev/full for a real full disk. Each check is paired with the known-
wrong behaviour it replaces: the same crafted file *does* run its payload under
`weights_only=False`, and a byte-flipped file *does* load under plain `torch.load`.
"""

import errno
import hashlib
import json
import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from minirlhf.args import RLHFArgs
from minirlhf.cli import checkpoint as checkpoint_module
from minirlhf.cli.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    to_plain,
    write_file,
)
from minirlhf.rewards import reward_fn_char_count
from minirlhf.trainer import RLHFTrainer

ARGS = dict(total_phases=3, batch_size=4, num_minibatches=2, gen_len=4, warmup_steps=0,
            prefix="A", prepend_bos=False, device="cpu")


@pytest.fixture(scope="module")
def trainer(make_printable_model) -> RLHFTrainer:
    """A trainer one phase in: weights moved, optimiser state present."""
    trainer = RLHFTrainer(RLHFArgs(**ARGS), reward_fn_char_count, make_printable_model(seed=3),
                          console=Console(quiet=True), table_every=0)
    trainer.train_one_phase()
    return trainer


STREAMS = ("sample", "shuffle", "prompt", "eval")
"""The trainer's own generators (`trainer.streams`), named here rather than read from the
library, so a stream it stopped saving would show."""


def draw_from_every_stream(trainer: RLHFTrainer) -> list:
    return [random.random(), float(np.random.rand()), torch.rand(2).tolist(),
            *[torch.rand(2, generator=getattr(trainer.streams, name)).tolist()
              for name in STREAMS]]


def saved_pair(trainer: RLHFTrainer, folder: Path) -> tuple[Path, Path]:
    """Two saves: phase 1 ends up in checkpoint.prev.pt, "phase 2" in checkpoint.pt."""
    save_checkpoint(trainer.state_dict(), folder, {"note": "first"})
    save_checkpoint({**trainer.state_dict(), "phase": 2}, folder, {"note": "second"})
    return folder / "checkpoint.pt", folder / "checkpoint.prev.pt"


def forge_sidecar(path: Path):
    """A sidecar that matches whatever `path` holds now (what an attacker could write too)."""
    data = path.read_bytes()
    path.with_suffix(".json").write_text(json.dumps({
        "format": checkpoint_module.FORMAT, "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "phase": 1}))


# ---- plain data, and a faithful round trip ----

def test_a_checkpoint_loads_with_torchs_own_safe_loader(trainer, tmp_path):
    path = save_checkpoint(trainer.state_dict(), tmp_path, {"before": (["a"], [1.0])})
    payload = torch.load(path, weights_only=True)  # torch's own allowlist, not ours
    assert payload["trainer"]["phase"] == 1 and payload["extra"]["before"] == (["a"], [1.0])
    info = json.loads((tmp_path / "checkpoint.json").read_text())
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["bytes"] == path.stat().st_size and info["global_step"] == trainer.global_step


def test_the_round_trip_restores_weights_optimiser_and_every_random_stream(trainer, tmp_path):
    state = trainer.state_dict()
    save_checkpoint(state, tmp_path)
    expected = draw_from_every_stream(trainer)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # scramble every stream
    for name in STREAMS:
        getattr(trainer.streams, name).manual_seed(99)
    loaded = load_checkpoint(tmp_path)
    assert loaded.note is None and loaded.path == tmp_path / "checkpoint.pt"
    trainer.streams.load_state_dict(loaded.trainer["rng"])
    assert draw_from_every_stream(trainer) == expected
    for name, tensor in state["model"].items():
        assert torch.equal(loaded.trainer["model"][name], tensor), name
    for key, moments in state["optimizer"]["state"].items():
        for name, tensor in moments.items():
            assert torch.equal(loaded.trainer["optimizer"]["state"][key][name], tensor)
    trainer.streams.load_state_dict(state["rng"])


def test_to_plain_converts_numpy_and_names_anything_else():
    plain = to_plain({"rng": ("MT19937", np.arange(3, dtype=np.uint32), np.int64(2)),
                      "mean": np.float64(0.5)})
    assert plain == {"rng": ("MT19937", [0, 1, 2], 2), "mean": 0.5}
    assert type(plain["mean"]) is float and type(plain["rng"][1][0]) is int
    with pytest.raises(TypeError, match=r"checkpoint\['history'\]\[1\] is a builtins.object"):
        to_plain({"history": [1.0, object()]})


# ---- loading never runs code ----

class WritesAFile:
    """Unpickling this calls open(marker, "w"): the file appearing proves the payload ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class RunsAShell(WritesAFile):
    """Unpickling this calls os.system("touch marker"). torch words the refusal of a blocked
    module (posix) differently from that of a global it does not allow (open)."""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload, name", [(WritesAFile, "open"), (RunsAShell, "system")])
def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(trainer, tmp_path, payload,
                                                                    name):
    run, marker = tmp_path / "run", tmp_path / "payload-ran"
    run.mkdir()
    torch.save({"trainer": to_plain(trainer.state_dict()), "extra": {"x": payload(marker)}},
               run / "checkpoint.pt")
    forge_sidecar(run / "checkpoint.pt")  # the checksum cannot stop someone who writes both
    with pytest.raises(CheckpointError, match=rf"object [\w.]*{name}, which could run code: "
                                              "refused"):
        load_checkpoint(run)
    assert not marker.exists()
    # The known-wrong loader (the old weights_only=False) runs it: the test above can fail.
    torch.load(run / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_an_old_checkpoint_is_refused_and_not_converted(trainer, tmp_path):
    old = {"trainer": {**trainer.state_dict(), "rng": trainer.streams.state_dict()}, "extra": {}}
    assert isinstance(old["trainer"]["rng"]["numpy"][1], np.ndarray)  # what made it unsafe
    torch.save(old, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="no checkpoint.json") as caught:
        load_checkpoint(tmp_path)
    assert "python -m" not in str(caught.value)  # no converter that unpickles is recommended
    forge_sidecar(tmp_path / "checkpoint.pt")  # even with a sidecar it is not unpickled
    with pytest.raises(CheckpointError, match="numpy"):
        read_checkpoint(tmp_path / "checkpoint.pt")


# ---- damage is found; the previous checkpoint stands in ----

def flip_64_bytes(path: Path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped": (flip_64_bytes, "SHA-256 differs"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "cut short"),
    "empty": (lambda p: p.write_bytes(b""), "is 0 bytes"),
    "no sidecar": (lambda p: p.with_suffix(".json").unlink(), "no checkpoint.json"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_is_named_and_the_previous_one_loads(trainer, tmp_path, kind):
    latest, previous = saved_pair(trainer, tmp_path)
    damage, message = DAMAGE[kind]
    damage(latest)
    with pytest.raises(CheckpointError, match=message) as caught:
        read_checkpoint(latest)
    assert str(latest) in str(caught.value) and "\n" not in str(caught.value)
    loaded = load_checkpoint(tmp_path)
    assert loaded.path == previous and loaded.extra == {"note": "first"}
    assert message in loaded.note and "Loaded checkpoint.prev.pt (phase 1)" in loaded.note
    damage(previous)
    with pytest.raises(CheckpointError, match="No usable checkpoint") as caught:
        load_checkpoint(tmp_path)
    assert "\n" not in str(caught.value)


def test_a_flipped_file_would_load_without_the_checksum(trainer, tmp_path):
    """The known-wrong loader: plain torch.load takes the flipped file without a word."""
    latest, _ = saved_pair(trainer, tmp_path)
    flip_64_bytes(latest)
    torch.load(latest, weights_only=True)


def test_garbage_with_a_matching_sidecar_is_not_a_readable_checkpoint(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(bytes(range(256)) * 8)
    forge_sidecar(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        load_checkpoint(tmp_path)


def test_nan_weights_are_refused_on_saving_and_on_loading(trainer, tmp_path):
    good = save_checkpoint(trainer.state_dict(), tmp_path)
    before = good.read_bytes()
    state = trainer.state_dict()
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() == 2)
    state["model"] = {**state["model"], name: state["model"][name].clone().fill_(float("nan"))}
    with pytest.raises(CheckpointError, match=f"model.{name} holds NaN"):
        save_checkpoint(state, tmp_path)
    assert good.read_bytes() == before
    torch.save({"trainer": to_plain(state), "extra": {}}, good)  # bypass the save check
    forge_sidecar(good)
    with pytest.raises(CheckpointError, match=f"NaN or infinity in model.{name}"):
        read_checkpoint(good)


def test_the_attention_ignore_constant_is_not_mistaken_for_damage(trainer):
    ignore = [k for k, v in trainer.state_dict()["model"].items() if k.endswith(".IGNORE")]
    assert ignore and checkpoint_module.find_non_finite(trainer.state_dict()) is None


# ---- writing: a full disk, an interrupt, the rotation ----

def test_a_full_disk_names_itself_and_leaves_no_partial_file(trainer, tmp_path, monkeypatch):
    latest, previous = saved_pair(trainer, tmp_path)
    before = latest.read_bytes()

    def disk_fills_up(payload, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_fills_up)
    with pytest.raises(CheckpointError, match="is full") as caught:
        save_checkpoint({**trainer.state_dict(), "phase": 3}, tmp_path)
    assert "--resume" in str(caught.value) and "left as it was" in str(caught.value)
    assert not list(tmp_path.glob("*.tmp"))
    assert latest.read_bytes() == before and load_checkpoint(tmp_path).trainer["phase"] == 2


def test_no_room_is_refused_before_any_file_is_touched(trainer, tmp_path, monkeypatch):
    latest, previous = saved_pair(trainer, tmp_path)
    files = {p: p.read_bytes() for p in tmp_path.iterdir()}
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(CheckpointError, match=r"is full \(needs \d+ MB"):
        save_checkpoint(trainer.state_dict(), tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_a_real_full_disk_raises_enospc_through_the_python_file():
    """torch.save to a path reports a full disk as an unexplained RuntimeError; through a
    Python file object (write_file) the OS's own ENOSPC comes through."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with pytest.raises(OSError) as caught:
        write_file(Path("/dev/full"), lambda file: torch.save({"x": torch.zeros(1000)}, file))
    assert caught.value.errno == errno.ENOSPC


def test_an_interrupt_mid_write_leaves_no_partial_file(trainer, tmp_path, monkeypatch):
    latest, _ = saved_pair(trainer, tmp_path)

    def interrupted(payload, file):
        file.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(trainer.state_dict(), tmp_path)
    assert not list(tmp_path.glob("*.tmp")) and read_checkpoint(latest)["trainer"]["phase"] == 2


def test_a_crash_between_the_renames_falls_back_to_the_previous_file(trainer, tmp_path):
    """The last rename (the sidecar) never happened: the new file cannot be verified."""
    latest, previous = saved_pair(trainer, tmp_path)
    latest.with_suffix(".json").unlink()
    assert load_checkpoint(tmp_path).trainer["phase"] == 1


def test_no_checkpoint_says_how_to_continue_the_run(tmp_path):
    with pytest.raises(CheckpointError, match=f"minirlhf train --out {tmp_path} --resume"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("settle", [checkpoint_module.SAVE_SETTLE_S, 0.0])
def test_a_reader_between_two_renames_of_a_save_loads_the_new_checkpoint(trainer, tmp_path,
                                                                          monkeypatch, settle):
    """`sample` reading while a save runs in another process: the new checkpoint.pt is in place,
    its checkpoint.json not yet (written 0.3 s later). The reader looks again and loads the new
    one without a note; a reader that does not wait (settle 0, the known-wrong one) falls back
    to the previous file and reports a damage that is not there."""
    latest, _ = saved_pair(trainer, tmp_path)
    record = latest.with_suffix(".json")
    new_record = record.read_text()
    record.write_text(new_record.replace('"phase": 2', '"phase": 1').replace(
        json.loads(new_record)["sha256"], "0" * 64))  # the record of the save before
    monkeypatch.setattr(checkpoint_module, "SAVE_SETTLE_S", settle)
    timer = threading.Timer(0.3, lambda: record.write_text(new_record))
    timer.start()
    try:
        loaded = load_checkpoint(tmp_path)
    finally:
        timer.join()
    if settle:
        assert loaded.path == latest and loaded.note is None
    else:
        assert loaded.path != latest and "SHA-256 differs" in loaded.note
