"""The GPU check: everything in minirlhf that only a CUDA machine can test, in one command.

Run it when a GPU machine is at hand (CI has none). Each step runs as its own process with a time
limit, so one failure does not hide the others; at the end a table says what passed, with the
figures that matter, and `--out` gets the logs and a JSON summary.

    python scripts/gpu_check.py                         # every step (under 8 minutes on one H200)
    python scripts/gpu_check.py --steps env tests rollout
    python scripts/gpu_check.py --steps train --phases 12

Steps:
    env      the GPU, torch, CUDA and bf16 support, the CPU
    tests    the `cuda`-marked tests (tests/test_cuda.py): device placement, bf16 autocast,
             the fast path and the sampler on the GPU, a checkpoint saved on the GPU and resumed
             on the CPU
    train    a short bf16 run of the offline main job (SmolLM2 + VADER) on CUDA: the reward of
             the last 3 phases must beat the first phase's by --min-gain
    rollout  benchmarks/rollout_speed.py on the GPU (minirlhf vs TransformerLens and HF generate)
    nccl     a 2-process data-parallel run over NCCL, when the machine has 2 GPUs or more
    suite    the whole test suite with the GPU visible (the trainer then defaults to CUDA)
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["env", "tests", "train", "rollout", "nccl", "suite"]


def run(name: str, command: list[str], timeout: int, out: Path) -> tuple[bool, float, str]:
    """Run one step's command; its output goes to out/<name>.log. (passed, seconds, log tail)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        passed, log = done.returncode == 0, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        passed = False
        log = f"{error.stdout or ''}{error.stderr or ''}\nTIMED OUT after {timeout} s"
    (out / f"{name}.log").write_text(log)
    print(f"--- {name} ---\n{log[-3000:]}", flush=True)
    return passed, time.perf_counter() - start, log


def step_env(ns, out: Path) -> tuple[bool, str]:
    code = ("import torch, platform, subprocess;"
            "print('torch', torch.__version__, 'cuda', torch.version.cuda);"
            "print('gpus', torch.cuda.device_count(), torch.cuda.get_device_name());"
            "print('bf16', torch.cuda.is_bf16_supported())")
    passed, _, log = run("env", [sys.executable, "-c", code], 120, out)
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True,
                         text=True).stdout.strip()
    lines = [line for line in log.splitlines() if line.startswith(("torch", "gpus", "bf16"))]
    return passed, "; ".join(lines + [cpu])


def step_tests(ns, out: Path) -> tuple[bool, str]:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py",
               "-p", "no:cacheprovider"]
    passed, _, log = run("tests", command, 300, out)
    return passed, log.strip().splitlines()[-1] if log.strip() else "no output"


def step_train(ns, out: Path) -> tuple[bool, str]:
    folder = out / "train-run"
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "minirlhf", "train", "--preset", "smollm2-vader",
               "--device", "cuda", "--precision", "bf16", "--total-phases", str(ns.phases),
               "--out", str(folder), "--table-every", "0", "--checkpoint-every", str(ns.phases)]
    passed, seconds, _ = run("train", command, 420, out)
    metrics_file = folder / "metrics.jsonl"
    if not metrics_file.exists():
        return False, "no metrics were written"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    rewards = [m["charts/reward_mean"] for m in metrics]
    if len(rewards) < 4:
        return False, f"only {len(rewards)} phases ran: {rewards}"
    first, last = rewards[0], statistics.mean(rewards[-3:])
    phase_time = statistics.median(m["charts/phase_time"] for m in metrics)
    summary = (f"VADER {first:.3f} -> {last:.3f} (last 3 phases) in {len(rewards)} phases; "
               f"median phase {phase_time:.2f} s; rewards {[round(r, 2) for r in rewards]}")
    return passed and last > first + ns.min_gain, summary


def step_rollout(ns, out: Path) -> tuple[bool, str]:
    command = [sys.executable, "benchmarks/rollout_speed.py", "--device", "cuda", "--models",
               *ns.models, "--reps", "5", "--out", str(out)]
    passed, _, _ = run("rollout", command, 300, out)
    results_file = out / "rollout_speed_cuda.json"
    if not results_file.exists():
        return False, "no results were written"
    rows = []
    for result in json.loads(results_file.read_text())["results"]:
        speed = result["tokens_per_s"]
        ratios = ", ".join(f"{speed['minirlhf'] / speed[e]:.2f}x {e}" for e in speed
                           if e != "minirlhf")
        rows.append(f"{result['model']}: {speed['minirlhf']:.0f} tok/s ({ratios})")
    return passed, "; ".join(rows)


def step_nccl(ns, out: Path) -> tuple[bool | None, str]:
    import torch

    if torch.cuda.device_count() < 2:
        return None, f"skipped: {torch.cuda.device_count()} GPU (needs 2)"
    folder = out / "nccl-run"
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "-m", "minirlhf", "train", "--preset", "tiny-smoke", "--device", "cuda",
               "--backend", "nccl", "--total-phases", "3", "--out", str(folder),
               "--table-every", "0", "--checkpoint-every", "3"]
    passed, seconds, log = run("nccl", command, 300, out)
    metrics_file = folder / "metrics.jsonl"
    if not metrics_file.exists():
        return False, "no metrics were written"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    rewards = [round(m["charts/reward_mean"], 3) for m in metrics]
    ran = passed and len(metrics) == 3 and "2 processes" in log
    return ran, f"2 processes, NCCL: {len(metrics)} phases in {seconds:.1f} s; rewards {rewards}"


def step_suite(ns, out: Path) -> tuple[bool, str]:
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "-m", "not slow", "--ignore=tests/test_notebooks.py"]
    passed, _, log = run("suite", command, ns.suite_timeout, out)
    return passed, log.strip().splitlines()[-1] if log.strip() else "no output"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS)
    parser.add_argument("--phases", type=int, default=12, help="phases of the train step")
    parser.add_argument("--min-gain", type=float, default=0.2,
                        help="VADER gain the train step must reach (its first phase is ~0.15)")
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "smollm2"])
    parser.add_argument("--suite-timeout", type=int, default=240)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    for name in ns.steps:
        start = time.perf_counter()
        passed, summary = globals()[f"step_{name}"](ns, ns.out)
        results[name] = {"passed": passed, "seconds": round(time.perf_counter() - start, 1),
                         "summary": summary}
    print("\n| step | result | seconds | figures |\n| --- | --- | --- | --- |")
    for name, r in results.items():
        verdict = {True: "PASS", False: "FAIL", None: "skip"}[r["passed"]]
        print(f"| {name} | {verdict} | {r['seconds']} | {r['summary']} |")
    (ns.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    sys.exit(1 if any(r["passed"] is False for r in results.values()) else 0)


if __name__ == "__main__":
    main()
