"""`runtime.allocator`: freed tensors go back to the system, or stay for reuse.

`return_freed_memory`: freed 1-4 MiB tensors go back to the system; the oracle is the kernel's
count of the process's resident memory (/proc/self/status). `keep_freed_memory`: a freed 64 MiB
block's memory serves the next one without a page fault (glibc's malloc called directly, as
torch does for every CPU tensor); the oracle is the kernel's count of the process's minor page
faults (`getrusage`). Each in a fresh process (the settings are process-wide). Every check
runs both ways: without the setting the same frees hand nothing back, or the same allocations
fault every page again, which is what a setting that did nothing would show.
"""

import os
import platform
import subprocess
import sys
import textwrap

import pytest
from rich.console import Console

from minirlhf.args import RLHFArgs
from minirlhf.rewards import reward_fn_char_count
from minirlhf.runtime import allocator
from minirlhf.trainer import RLHFTrainer

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

CHILD = textwrap.dedent("""
    import re, sys
    from pathlib import Path
    import torch
    from minirlhf.runtime.allocator import keep_freed_memory, return_freed_memory

    def rss_mib():
        return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text())[1]) / 1024

    big = torch.ones(4 << 20)  # 16 MiB, mapped; freeing it raises glibc's threshold to 16 MiB
    del big
    if sys.argv[1] == "kept-then-set":
        assert keep_freed_memory()
    if sys.argv[1] in ("set", "kept-then-set"):
        assert return_freed_memory()
    pieces = [torch.ones(1 << 19) for _ in range(128)]  # 2 MiB each, as activations are
    before = rss_mib()
    del pieces[::2]  # free every other one: each hole sits between two live pieces
    print(before - rss_mib())
""")


def run_child(script: str, mode: str, env: dict | None = None) -> str:
    """The last line `script` prints, run in a fresh python process with argument `mode` (and
    `env` added to the environment)."""
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {})})
    return out.stdout.strip().splitlines()[-1]


def freed_mib(mode: str) -> float:
    """MiB the process's resident memory fell by when it freed 128 MiB of 2 MiB tensors, each
    between two tensors still alive (as a step's activations lie between its gradients)."""
    return float(run_child(CHILD, mode))


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_freed_blocks_go_back_to_the_system():
    assert freed_mib("set") > 120  # each 2 MiB piece was its own mapping, unmapped when freed
    assert freed_mib("unset") < 20  # glibc's default keeps the holes resident in its heap
    assert freed_mib("kept-then-set") > 120  # returning undoes an earlier keep_freed_memory


REUSE_CHILD = textwrap.dedent("""
    import ctypes, resource, sys
    from minirlhf.runtime.allocator import keep_freed_memory

    libc = ctypes.CDLL("libc.so.6")  # the malloc torch's CPU tensors come from
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    if sys.argv[1] == "set":
        assert keep_freed_memory()
    if sys.argv[1] == "unset_by_env":
        assert not keep_freed_memory()
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(64 << 20)  # above any mmap threshold glibc would pick
        libc.memset(block, 1, 64 << 20)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(block)
    print(sum(faults[1:]))
""")
BLOCK_PAGES = (64 << 20) // 4096


def refault_pages(mode: str, env: dict | None = None) -> int:
    """Minor page faults of the 2nd-8th 64 MiB blocks, each allocated and written after the one
    before was freed (as each learning step follows the last): 7 x BLOCK_PAGES if every one is
    a fresh mapping or lands on pages trimmed from the heap."""
    return int(run_child(REUSE_CHILD, mode, env))


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_kept_blocks_are_reused_without_page_faults():
    # Measured: 0 kept; 7 x 16,385 by default. Without the trim threshold (no block mapped,
    # but the heap's free top trimmed at each free) 7 x 16,352: both settings are needed.
    assert refault_pages("set") < BLOCK_PAGES // 10
    assert refault_pages("unset") > 6 * BLOCK_PAGES


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_a_malloc_setting_in_the_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    with pytest.warns(UserWarning, match="environment sets MALLOC_MMAP_THRESHOLD_"):
        assert allocator.keep_freed_memory() is False  # changes nothing in this process
    assert refault_pages("unset_by_env", {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}) > 6 * BLOCK_PAGES


def test_other_c_libraries_are_left_alone_with_a_warning(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    with pytest.warns(UserWarning, match="not glibc"):
        assert allocator.return_freed_memory() is False
    with pytest.warns(UserWarning, match="not glibc"):
        assert allocator.keep_freed_memory() is False


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_a_threshold_glibc_would_refuse_is_refused_first():
    with pytest.raises(ValueError, match="32 MiB"):
        allocator.return_freed_memory(64 << 20)


def test_the_trainer_sets_what_is_asked(monkeypatch, make_printable_model):
    calls = []
    monkeypatch.setattr(allocator, "return_freed_memory", lambda: calls.append("return") or True)
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("keep") or True)
    for returned, kept in ((False, False), (True, False), (False, True)):
        args = RLHFArgs(batch_size=4, num_minibatches=1, gen_len=2, prefix="A",
                        prepend_bos=False, return_freed_memory=returned,
                        keep_freed_memory=kept, device="cpu")
        RLHFTrainer(args, reward_fn_char_count, base_model=make_printable_model(),
                    console=Console(quiet=True), table_every=0)
    assert calls == ["return", "keep"]


def test_asking_for_both_is_refused():
    with pytest.raises(ValueError, match="opposite things: set one"):
        RLHFArgs(return_freed_memory=True, keep_freed_memory=True)
