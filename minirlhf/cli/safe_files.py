"""Writing a run's files without ever writing through a symbolic link.

The lowest layer of the command line: checkpoints, run folders, metrics and plots all write
through here. A symlink planted in a run folder (`metrics.jsonl -> ~/.bashrc`) would otherwise
have the next command overwrite or append to the file it points to, so every file is opened with
`O_NOFOLLOW` (the kernel refuses a link instead of following it), whole files are written under a
temporary name and renamed into place, and a symlinked entry is refused by name.
"""

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # Windows has none (and no user symlinks by default)


class UnsafeFileError(Exception):
    """A file minirlhf would have to write through a symbolic link; the message names it."""


def describe_link(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return (f"{path} is a symbolic link (to {target}): minirlhf never writes through one. "
            "Remove the link (the file it points to is left alone), then run the command again.")


def refuse_symlinks(folder: Path, names) -> None:
    """Raise UnsafeFileError naming the first of `folder/name` that is a symbolic link."""
    for name in names:
        if (Path(folder) / name).is_symlink():
            raise UnsafeFileError(describe_link(Path(folder) / name))


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """`os.open` that refuses a symbolic link at `path` (UnsafeFileError, naming it)."""
    try:
        return os.open(path, flags | NOFOLLOW, mode)
    except OSError as error:
        if error.errno == errno.ELOOP or Path(path).is_symlink():
            raise UnsafeFileError(describe_link(Path(path))) from None
        raise


@contextmanager
def replacing(path: Path) -> Iterator:
    """A binary file to write `path`'s new contents into: written under a temporary name, flushed
    to the disk and renamed over `path` when the block ends without an error (else deleted).

    Raises:
        UnsafeFileError: `path` (or its temporary name) is a symbolic link.
    """
    path = Path(path)
    refuse_symlinks(path.parent, [path.name])
    tmp = path.with_name(path.name + ".tmp")
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists() and not tmp.is_symlink():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text`, atomically (`replacing`)."""
    with replacing(path) as file:
        file.write(text.encode())


def append_text(path: Path, text: str) -> None:
    """Append `text` to `path` (created if missing), refusing a symbolic link."""
    fd = open_nofollow(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "ab") as file:
        file.write(text.encode())
