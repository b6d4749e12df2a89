"""`runtime.allocator.return_freed_memory`: freed 1-4 MiB tensors go back to the system.

The oracle is the kernel's count of the process's resident memory (/proc/self/status), in a
fresh process each time (the setting is process-wide, and would slow the rest of the suite).
The check runs both ways: without the setting the same frees hand nothing back, which is what
a `return_freed_memory` that did nothing would show.
"""

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
    from minirlhf.runtime.allocator import return_freed_memory

    def rss_mib():
        return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text())[1]) / 1024

    big = torch.ones(4 << 20)  # 16 MiB, mapped; freeing it raises glibc's threshold to 16 MiB
    del big
    if sys.argv[1] == "set":
        assert return_freed_memory()
    pieces = [torch.ones(1 << 19) for _ in range(128)]  # 2 MiB each, as activations are
    before = rss_mib()
    del pieces[::2]  # free every other one: each hole sits between two live pieces
    print(before - rss_mib())
""")


def freed_mib(mode: str) -> float:
    """MiB the process's resident memory fell by when it freed 128 MiB of 2 MiB tensors, each
    between two tensors still alive (as a step's activations lie between its gradients)."""
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_freed_blocks_go_back_to_the_system():
    assert freed_mib("set") > 120  # each 2 MiB piece was its own mapping, unmapped when freed
    assert freed_mib("unset") < 20  # glibc's default keeps the holes resident in its heap


def test_other_c_libraries_are_left_alone_with_a_warning(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    with pytest.warns(UserWarning, match="not glibc"):
        assert allocator.return_freed_memory() is False


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_a_threshold_glibc_would_refuse_is_refused_first():
    with pytest.raises(ValueError, match="32 MiB"):
        allocator.return_freed_memory(64 << 20)


def test_the_trainer_sets_it_when_asked(monkeypatch, make_printable_model):
    calls = []
    monkeypatch.setattr(allocator, "return_freed_memory", lambda: calls.append(True))
    for asked in (False, True):
        args = RLHFArgs(batch_size=4, num_minibatches=1, gen_len=2, prefix="A",
                        prepend_bos=False, return_freed_memory=asked, device="cpu")
        RLHFTrainer(args, reward_fn_char_count, base_model=make_printable_model(),
                    console=Console(quiet=True), table_every=0)
        assert calls == [True] * asked
