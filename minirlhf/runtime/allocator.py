"""How freed CPU memory goes back to the system: glibc's malloc, told to map large blocks apart.

Below the pipeline (`RLHFArgs.return_freed_memory`). torch allocates CPU tensors with the C
library's malloc. On Linux that is glibc's, which serves a block from its heap unless it is
larger than the *mmap threshold*; the threshold starts at 128 KiB and rises to the size of the
largest mapped block freed so far (up to 32 MiB). A learning step's activations and weight
gradients are 1-4 MiB pieces (SmolLM2), so after the first large tensor is freed they all come
from the heap, and the holes they leave when freed stay resident: a full-weight learning phase
peaks about 500 MiB above what its live tensors need (docs/performance.md). Fixing the threshold
at 1 MiB gives each of those pieces a mapping of its own, returned to the system when freed. The
price is time: every fresh mapping's pages are zeroed by the kernel on first touch (a fifth to
a quarter more learning time, measured in docs/performance.md).

The setting is the process's, not one model's, and stays until the process ends. It is what the
environment variable `MALLOC_MMAP_THRESHOLD_=1048576` does, set from inside (`mallopt`).
"""

import ctypes
import platform
import warnings

M_MMAP_THRESHOLD = -3
"""glibc's `mallopt` parameter number for the mmap threshold (malloc.h)."""
THRESHOLD_BYTES = 1 << 20
"""Blocks of this size or more get their own mapping: SmolLM2's activations and weight gradients
(1-4 MiB) do; the many small tensors (norm weights, per-token numbers) stay in the heap."""


def return_freed_memory(threshold_bytes: int = THRESHOLD_BYTES) -> bool:
    """Make glibc's malloc map every block of `threshold_bytes` or more on its own, so that
    freeing it returns its memory to the system. True when set; False, with a warning, where
    the C library is not glibc (macOS, musl), which keeps its own behaviour."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        warnings.warn("return_freed_memory: the C library here is not glibc, so its allocator "
                      "is left as it is (the setting only changes glibc's mmap threshold).",
                      stacklevel=2)
        return False
    if not 0 < threshold_bytes <= 32 << 20:  # glibc refuses thresholds above 32 MiB (64-bit)
        raise ValueError(f"threshold_bytes must be in (0, 32 MiB], got {threshold_bytes}.")
    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes) != 1:
        raise OSError(f"glibc's mallopt refused an mmap threshold of {threshold_bytes} bytes.")
    return True
