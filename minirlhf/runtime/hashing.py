"""SHA-256 digests of files: what checkpoints, reward models and run folders record to know a file
is the one they wrote or were built from."""

import hashlib
from pathlib import Path


def update_with_file(digest: "hashlib._Hash", path: Path) -> None:
    """Feed a file's bytes to `digest`, a megabyte at a time."""
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    update_with_file(digest, path)
    return digest.hexdigest()
