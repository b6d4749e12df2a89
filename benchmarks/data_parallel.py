"""Benchmark: PPO throughput of one process against two data-parallel processes on this CPU.

The same global batch each phase (`--batch-size` samples); with N processes each samples and
trains on batch_size / N of it, over gloo (minirlhf.runtime.distributed). The CPU's cores are shared
out: N processes get cores / N torch threads each, so the comparison is of the same machine used
in different ways; one process also runs with a single thread, which separates "two processes"
from "one thread per core". Each run starts in fresh processes, trains
one warm-up phase, then times `--phases` phases; the settings alternate `--repeats` times (the
machine may be shared) and the median is reported.

    python benchmarks/data_parallel.py                         # tiny random model
    python benchmarks/data_parallel.py --base-model smollm2 --batch-size 16 --gen-len 20

Prints the CPU model (lscpu), whether bfloat16 is fast on it, and samples per second side by
side; figures go to `benchmarks/results/data_parallel_<base model>.json`.
"""

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

from minirlhf.args import RLHFArgs
from minirlhf.cli.presets import PRESETS
from minirlhf.rewards import reward_fn_char_count
from minirlhf.runtime import distributed
from minirlhf.runtime.device import describe_cpu
from minirlhf.trainer import RLHFTrainer

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world_size: int, port: int, options: dict, out: Path):
    """One process: train a warm-up phase, then time `phases` phases (process 0 writes them)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_PORT": str(port),
                       "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1"})
    torch.set_num_threads(options["threads"])
    args = RLHFArgs(**{**PRESETS["tiny-smoke"]["args"], "base_model": options["base_model"],
                       "batch_size": options["batch_size"], "gen_len": options["gen_len"],
                       "total_phases": options["phases"] + 1, "device": "cpu"})
    trainer = RLHFTrainer(args, reward_fn_char_count, console=Console(quiet=True), table_every=0)
    trainer.train_one_phase()
    start = time.perf_counter()
    for _ in range(options["phases"]):
        trainer.train_one_phase()
    seconds = (time.perf_counter() - start) / options["phases"]
    if distributed.is_main():
        out.write_text(json.dumps({"seconds_per_phase": seconds}))
    distributed.shutdown()


def time_run(world_size: int, threads: int, options: dict) -> float:
    """Seconds per phase of `world_size` fresh processes of `threads` torch threads each."""
    options = {**options, "threads": threads}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        mp.start_processes(worker, args=(world_size, free_port(), options, out),
                           nprocs=world_size, start_method="spawn")
        return json.loads(out.read_text())["seconds_per_phase"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--phases", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ns = parser.parse_args()
    options = {k: getattr(ns, k) for k in ["base_model", "batch_size", "gen_len", "phases"]}
    cores = os.cpu_count() or 1
    settings = [(n, max(1, cores // n)) for n in ns.processes]
    settings += [(1, 1)] if cores > 1 and 1 in ns.processes else []
    times = {setting: [] for setting in settings}
    for _ in range(ns.repeats):
        for world_size, threads in settings:
            times[world_size, threads].append(time_run(world_size, threads, options))
    medians = {setting: statistics.median(t) for setting, t in times.items()}
    best_one = min(s for (n, _), s in medians.items() if n == 1)
    machine = describe_cpu()
    table = Table("processes", "threads each", "s / phase", "samples / s",
                  "vs the best 1-process", title=f"{machine['cpu']}, {cores} cores; fast bf16: "
                  f"{machine['fast_bf16']}")
    for (n, threads), seconds in medians.items():
        table.add_row(str(n), str(threads), f"{seconds:.3f}", f"{ns.batch_size / seconds:.1f}",
                      f"{best_one / seconds:.2f}x")
    Console().print(table)
    (RESULTS / f"data_parallel_{ns.base_model}.json").write_text(json.dumps({
        "cpu": machine["cpu"], "cores": cores, "fast_bf16": machine["fast_bf16"],
        "options": options, "repeats": ns.repeats,
        "seconds_per_phase": {f"{n}x{threads}": t for (n, threads), t in times.items()},
        "median_seconds_per_phase": {f"{n}x{threads}": s for (n, threads), s in medians.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
