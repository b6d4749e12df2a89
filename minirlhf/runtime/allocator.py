"""What glibc's malloc does with the memory a run frees: keep it for reuse, or return it.

Below the pipeline (`RLHFArgs.return_freed_memory` and `keep_freed_memory`). torch allocates CPU
tensors with the C library's malloc. On Linux that is glibc's, which by default keeps some freed
memory and returns some: a block larger than the *mmap threshold* (128 KiB at first, rising to
the largest mapped block freed so far, at most 32 MiB) gets a mapping of its own, unmapped when
freed, and the heap's free top is trimmed back to the system, while smaller blocks leave holes
in the heap that stay resident. Every returned page is zeroed by the kernel again when next
touched: on SmolLM2 with every weight trained, about 800,000 page faults (3 GB zeroed) in each
learning phase of 8 steps. With neither setting below, glibc keeps that behaviour.

Two settings, each process-wide and kept until the process ends (`mallopt`, as the environment
variables `MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_` and `MALLOC_MMAP_THRESHOLD_` would):

- `keep_freed_memory`: no block gets its own mapping and the heap is never trimmed, so what a
  step frees is reused by the next step without a page fault: learning steps up to 7% faster,
  for a peak about a tenth higher, since freed holes stay resident (docs/performance.md).
- `return_freed_memory`: every block of 1 MiB or more gets its own mapping, returned to the
  system when freed, so the holes a step's activations leave between its gradients (1-4 MiB
  pieces on SmolLM2) do not stay resident: the lowest peak, for a fifth to a quarter more
  learning time.
"""

import ctypes
import os
import platform
import warnings

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
"""glibc's `mallopt` parameter numbers (malloc.h)."""
THRESHOLD_BYTES = 1 << 20
"""Blocks of this size or more get their own mapping: SmolLM2's activations and weight gradients
(1-4 MiB) do; the many small tensors (norm weights, per-token numbers) stay in the heap."""
DEFAULT_MMAP_MAX, DEFAULT_TRIM_BYTES = 65536, 128 << 10
"""glibc's own values of the two settings `keep_freed_memory` changes."""
NEVER_TRIM_BYTES = 2**31 - 1
"""The largest trim threshold `mallopt` takes (a C int): the heap's free top is never returned."""
ENVIRONMENT_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                        "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
"""Environment variables through which a user tunes glibc's malloc: `keep_freed_memory` leaves
such a process alone."""


def is_glibc() -> bool:
    """Whether this process's C library is glibc (whose malloc these settings change)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def set_freed_memory(return_freed: bool, keep_freed: bool) -> bool:
    """`return_freed_memory` or `keep_freed_memory` as `RLHFArgs` asks (at most one), else
    nothing. True when something was set."""
    if return_freed:
        return return_freed_memory()
    return keep_freed and keep_freed_memory()


def keep_freed_memory() -> bool:
    """Serve every block from glibc's heap and never trim it, so freed memory stays resident and
    is reused without the kernel zeroing its pages again. True when set; False, with a warning
    and nothing changed, where the C library is not glibc or where the environment already
    tunes glibc's malloc (`MALLOC_*_` variables, `GLIBC_TUNABLES`), which then rules."""
    if not _is_glibc_else_warn("keep_freed_memory"):
        return False
    tuned = [name for name in ENVIRONMENT_SETTINGS if name in os.environ]
    if tuned:
        warnings.warn(f"keep_freed_memory: the environment sets {', '.join(tuned)}, which rules "
                      "glibc's malloc here; unset it for keep_freed_memory to act.", stacklevel=2)
        return False
    _mallopt(M_MMAP_MAX, 0)
    _mallopt(M_TRIM_THRESHOLD, NEVER_TRIM_BYTES)
    return True


def return_freed_memory(threshold_bytes: int = THRESHOLD_BYTES) -> bool:
    """Make glibc's malloc map every block of `threshold_bytes` or more on its own, so that
    freeing it returns its memory to the system (and trim the heap's free top as glibc does by
    default, undoing `keep_freed_memory`). True when set; False, with a warning, where the C
    library is not glibc (macOS, musl), which keeps its own behaviour."""
    if not _is_glibc_else_warn("return_freed_memory"):
        return False
    if not 0 < threshold_bytes <= 32 << 20:  # glibc refuses thresholds above 32 MiB (64-bit)
        raise ValueError(f"threshold_bytes must be in (0, 32 MiB], got {threshold_bytes}.")
    _mallopt(M_MMAP_THRESHOLD, threshold_bytes)
    _mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    _mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_BYTES)
    return True


def _is_glibc_else_warn(setting: str) -> bool:
    """`is_glibc()`, with a warning that `setting` changes nothing when it is not."""
    if is_glibc():
        return True
    warnings.warn(f"{setting}: the C library here is not glibc, whose malloc the setting "
                  "tunes, so the allocator is left as it is.", stacklevel=3)
    return False


def _mallopt(parameter: int, value: int):
    """glibc's `mallopt(parameter, value)`, raising if glibc refuses it."""
    if ctypes.CDLL("libc.so.6").mallopt(parameter, value) != 1:
        raise OSError(f"glibc's mallopt refused the value {value} for parameter {parameter}.")
