"""Tests for minirlhf.runtime.device: which device and precision a run gets, and autocast."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from minirlhf.runtime.device import autocast, describe_cpu, pick_device, pick_precision


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert pick_device() == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32"),
])
def test_auto_precision_follows_the_cpu(monkeypatch, avx512_bf16, amx, expected) -> None:
    """"auto" is bf16 only where the CPU has bfloat16 matrix instructions; set values stay."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu) == expected
    assert pick_precision("fp32", cpu) == "fp32" and pick_precision("bf16", cpu) == "bf16"
    assert pick_precision("auto", torch.device("mps")) == "fp32"


def test_autocast_runs_matmuls_in_bf16_only_when_asked() -> None:
    a = torch.randn(4, 4)
    cpu = torch.device("cpu")
    with autocast(cpu, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert (a @ a).dtype == torch.float32


def cpuinfo_oracle() -> dict:
    """The CPU's model name and whether it has AVX512-BF16 or AMX, read from /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text()
    model = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name"))
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
    return {"cpu": model, "fast_bf16": "avx512_bf16" in flags or "amx_bf16" in flags}


def first_lscpu_line() -> dict:
    """Known wrong: the value of lscpu's first line (the architecture, not the model)."""
    line = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[0]
    return {"cpu": line.split(":", 1)[1].strip(), "fast_bf16": False}


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or shutil.which("lscpu") is None,
                    reason="needs Linux's /proc/cpuinfo and lscpu")
def test_describe_cpu_names_the_model_and_its_bf16():
    """What every benchmark prints, against /proc/cpuinfo; reading lscpu's first line fails."""
    oracle = cpuinfo_oracle()
    for describe, right in [(describe_cpu, True), (first_lscpu_line, False)]:
        described = describe()
        assert ({k: described[k] for k in oracle} == oracle) == right, described
    assert describe_cpu()["cores"] >= 1
