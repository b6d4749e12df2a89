"""Tests for minirlhf.device: which device and precision a run gets, and autocast."""

import pytest
import torch

from minirlhf.device import autocast, pick_device, pick_precision


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
