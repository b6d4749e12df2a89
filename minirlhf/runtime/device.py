"""Where and in what precision the model runs: the device, bfloat16 or float32, and autocast.

Below the pipeline: the trainer, the command line and the benchmarks ask this module, so the
choice (CUDA, else Apple's MPS, else the CPU; bf16 only where the hardware is fast at it) is made
in one place.
"""

import os
import platform
import subprocess

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA if torch sees a GPU, else Apple's MPS, else the CPU; `requested` ("cuda:1") wins."""
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Device {requested!r} was asked for, but torch sees no CUDA GPU.")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"Device {requested!r} was asked for, but MPS is not available.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def has_fast_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bfloat16 matrices faster than float32 ones: a CUDA GPU with
    bf16 support, or a CPU with AVX512-BF16 or AMX instructions (measured on the 2-core AMD EPYC
    this project is developed on: 2.4x the fp32 matmul rate; without those instructions bf16
    matmuls are emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def describe_cpu() -> dict:
    """What a benchmark prints beside its figures: the CPU (lscpu's model name), the cores this
    process may use, and whether bf16 is fast on it (`has_fast_bf16`)."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except FileNotFoundError:  # no lscpu (macOS)
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines
                  if line.startswith("Model name")), platform.processor() or "?")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "fast_bf16": has_fast_bf16(torch.device("cpu"))}


def pick_precision(requested: str, device: torch.device) -> str:
    """Resolve `RLHFArgs.precision`: "auto" becomes "bf16" where `has_fast_bf16`, else "fp32"."""
    if requested == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    return requested


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bfloat16 autocast for forward passes when `precision` is "bf16" (else a no-op context).
    Callers cast logits and values back to float32 before any log-softmax or loss."""
    enabled = precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
