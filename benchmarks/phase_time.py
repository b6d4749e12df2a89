"""Benchmark: where the time of one PPO phase goes, how it grows, and what memory it peaks at.

Four parts, on SmolLM2-135M with the offline preset (`smollm2-vader`: batch 32, gen_len 20,
2 learning passes x 4 minibatches), in one process unless said otherwise:

1. split   one phase split into sampling, policy + reference forward passes, reward and the
           learning phase (and one minibatch split into forward, backward and optimiser step),
           side by side for minirlhf's fast path in float32, the same under bfloat16 autocast
           (`precision="bf16"`, what the preset's "auto" picks on a CPU with AVX512-BF16 or AMX),
           and TransformerLens's forward (`fast_path=False`) in float32. Target (issue 5): a
           phase of the preset in at most 15 s on the 2-core CPU.
2. scale   phase time against batch size (16, 32, 64, 128) and gen_len (10, 20, 40).
3. memory  peak resident memory of a phase at batch 128, gen_len 30, storing the reference logits
           for the whole phase or recomputing them per minibatch (`recompute_ref_logits`); each
           in a fresh process, after one warm-up phase (which allocates AdamW's state), with the
           kernel's peak-RSS counter reset at the start of the measured phase. Then the time of
           both settings paired in one process (the setting alternates phase by phase on one
           trainer, so both see the same load). Target: peak memory of a phase down by at least
           40% for at most 15% more time.
4. floor   the sampler, the evaluation and the learning steps, in float32, each as "x of the
           compute floor": its time over its matmul FLOPs (counted from the model's shapes,
           `benchmarks/compute_floor.py`) at this CPU's measured matmul rate at those shapes;
           for the preset (LoRA) and with every weight trained.

    python benchmarks/phase_time.py                    # all four
    python benchmarks/phase_time.py --parts split --phases 3
    python benchmarks/phase_time.py --parts memory --precision fp32
    python benchmarks/phase_time.py --parts floor --phases 1

Figures go to `benchmarks/results/phase_time.json`.
"""

import argparse
import copy
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from compute_floor import ModelShape, matmul_shapes, measure_matmul_rate, phase_flops
from rich.console import Console
from rich.table import Table

from minirlhf.args import RLHFArgs
from minirlhf.cli.presets import PRESETS
from minirlhf.runtime.device import pick_precision
from minirlhf.runtime.loading import load_policy
from minirlhf.sentiment import make_vader_reward
from minirlhf.trainer import RLHFTrainer

PARTS = ["charts/sample_time", "charts/forward_time", "charts/reward_time",
         "charts/learning_time", "charts/phase_time"]
FLOPS = 165e9
"""fp32 matmul rate of this 2-core CPU (measured for issue 5), for the compute floor."""


def make_trainer(model, **overrides) -> RLHFTrainer:
    args = RLHFArgs(**{**PRESETS["smollm2-vader"]["args"], "total_phases": 50, **overrides})
    return RLHFTrainer(args, make_vader_reward("pos"), base_model=model,
                       console=Console(quiet=True), table_every=0)


def time_phases(trainer: RLHFTrainer, phases: int) -> dict[str, float]:
    """Median of each part over `phases` phases, after one warm-up phase."""
    trainer.train_one_phase()
    history = [trainer.train_one_phase().metrics for _ in range(phases)]
    return {key: statistics.median(m[key] for m in history) for key in PARTS}


def time_minibatch(trainer: RLHFTrainer) -> dict[str, float]:
    """Forward (objective), backward and optimiser step of one learning minibatch."""
    memory = trainer.rollout_phase().memory
    mb = memory.get_minibatches(trainer.args.num_minibatches, 1)[0]
    times: dict[str, list[float]] = {}
    for _ in range(3):
        start = time.perf_counter()
        objective, _ = trainer.compute_rlhf_objective(mb)
        forward = time.perf_counter()
        objective.backward()
        backward = time.perf_counter()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        for key, value in [("mb_forward", forward - start), ("mb_backward", backward - forward),
                           ("mb_optimizer_step", time.perf_counter() - backward)]:
            times.setdefault(key, []).append(value)
    return {key: statistics.median(values) for key, values in times.items()}


def compute_floor(n_params: int, batch: int, seq: int, gen_len: int, passes: int) -> float:
    """Seconds of matmul at FLOPS: 2 N per token per forward pass, 6 N per trained token.

    Forward passes: sampling (one per generated token) and the reference model over the samples;
    the policy's log-probs and values come from the sampler's own residual stream.
    """
    forward_tokens = batch * gen_len + batch * seq
    return (2 * n_params * forward_tokens + 6 * n_params * passes * batch * seq) / FLOPS


def part_split(model, ns, console) -> list[dict]:
    rows = []
    variants = [("minirlhf fast path, fp32", True, "fp32"),
                ("minirlhf fast path, bf16 autocast", True, "bf16"),
                ("TransformerLens forward, fp32", False, "fp32")]
    for label, fast, precision in variants:
        # A fresh copy per variant: a trainer trains the model it is given in place.
        trainer = make_trainer(copy.deepcopy(model), fast_path=fast, precision=precision)
        row = {"variant": label, **time_phases(trainer, ns.phases), **time_minibatch(trainer)}
        console.print(f"split {label}: phase {row['charts/phase_time']:.1f} s")
        rows.append(row)
        del trainer
    args = RLHFArgs(**PRESETS["smollm2-vader"]["args"])
    preset_picks = pick_precision(args.precision, torch.device("cpu"))
    seq = 4 + args.gen_len  # "This movie was" is 3 tokens, plus BOS
    floor = compute_floor(sum(p.numel() for p in model.parameters()), args.batch_size, seq,
                          args.gen_len, args.batches_per_learning_phase)
    table = Table("variant", "sample", "policy+ref fwd", "reward", "learning", "phase",
                  "mb fwd", "mb bwd", "mb optim", title=f"One phase, seconds (compute floor "
                  f"{floor:.1f} s at {FLOPS / 1e9:.0f} GFLOP/s)")
    for row in rows:
        table.add_row(row["variant"], *(f"{row[k]:.2f}" for k in PARTS),
                      *(f"{row[k]:.3f}" for k in ["mb_forward", "mb_backward",
                                                  "mb_optimizer_step"]))
    console.print(table)
    console.print(f'The preset\'s precision "{args.precision}" is {preset_picks} on this machine.')
    return [{**row, "compute_floor_s": floor, "preset_precision": preset_picks} for row in rows]


def part_scale(model, ns, console) -> list[dict]:
    rows = []
    grid = [(b, 20) for b in (16, 32, 64, 128)] + [(32, 10), (32, 40)]
    for batch, gen_len in grid:
        trainer = make_trainer(model, batch_size=batch, gen_len=gen_len)
        row = {"batch_size": batch, "gen_len": gen_len, **time_phases(trainer, ns.phases)}
        console.print(f"scale batch {batch} gen_len {gen_len}: {row['charts/phase_time']:.1f} s")
        rows.append(row)
        del trainer
    table = Table("batch", "gen_len", "sample", "fwd", "reward", "learning", "phase",
                  "phase / token (ms)", title="Phase time (s) against batch size and gen_len "
                  f"(the preset's precision: {pick_precision('auto', torch.device('cpu'))})")
    for row in rows:
        per_token = 1000 * row["charts/phase_time"] / (row["batch_size"] * row["gen_len"])
        table.add_row(str(row["batch_size"]), str(row["gen_len"]),
                      *(f"{row[k]:.2f}" for k in PARTS), f"{per_token:.1f}")
    console.print(table)
    return rows


FLOOR_PARTS = {"sampler": "charts/sample_time", "evaluation": "charts/forward_time",
               "learning": "charts/learning_time"}


def floor_ratios(trainer: RLHFTrainer, times: dict[str, float]) -> dict[str, dict]:
    """Each part's time over its compute floor: its matmul FLOPs (`compute_floor.phase_flops`)
    at this CPU's float32 matmul rate at the part's shapes (decoding: one token per row)."""
    args, model = trainer.args, trainer.model
    shape = ModelShape.of(model.base_model.cfg)
    prefix_len = len(model.base_model.to_tokens(args.prefix, prepend_bos=args.prepend_bos)[0])
    flops = phase_flops(shape, args.batch_size, prefix_len, args.gen_len,
                        args.batches_per_learning_phase, model.frozen_layers,
                        args.lora_rank > 0, model.value_head is not None)
    minibatch_tokens = args.minibatch_size * (prefix_len + args.gen_len)
    tokens = {"sampler": args.batch_size, "evaluation": minibatch_tokens,
              "learning": minibatch_tokens}
    ratios = {}
    for part, key in FLOOR_PARTS.items():
        rate = measure_matmul_rate(matmul_shapes(shape, tokens[part]))
        floor = flops[part] / rate
        ratios[part] = {"gflop": flops[part] / 1e9, "gflop_per_s": rate / 1e9,
                        "floor_s": floor, "time_s": times[key], "x_floor": times[key] / floor}
    return ratios


def part_floor(model, ns, console) -> dict:
    """The sampler, the evaluation and the learning steps against the compute floor, fp32: the
    preset (LoRA on the top 8 blocks) and every weight trained."""
    results = {}
    for label, overrides in [("preset (LoRA r16, top 8 blocks)", {}),
                             ("every weight trained", dict(trainable_layers=None, lora_rank=0,
                                                           base_lr=1e-4))]:
        trainer = make_trainer(copy.deepcopy(model), precision="fp32", **overrides)
        results[label] = floor_ratios(trainer, time_phases(trainer, ns.phases))
        for part, row in results[label].items():
            console.print(f"{label}, {part}: {row['time_s']:.2f} s, {row['gflop']:.0f} GFLOP at "
                          f"{row['gflop_per_s']:.0f} GFLOP/s: {row['x_floor']:.1f}x of the "
                          "compute floor")
        del trainer
    return results


def read_status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM the peak)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def memory_child(ns):
    """One variant in this fresh process: warm-up phase, then the measured phase."""
    if ns.threads:
        torch.set_num_threads(ns.threads)
    trainer = make_trainer(load_policy("smollm2"), batch_size=ns.memory_batch,
                           gen_len=ns.memory_gen_len, num_minibatches=4,
                           recompute_ref_logits=ns.memory_child == "recompute",
                           precision=ns.precision)
    trainer.train_one_phase()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
    start_rss = read_status_kib("VmRSS")
    metrics = trainer.train_one_phase().metrics
    print(json.dumps({"variant": ns.memory_child, "rss_at_start_mib": start_rss / 1024,
                      "peak_rss_mib": read_status_kib("VmHWM") / 1024,
                      "phase_peak_over_start_mib": (read_status_kib("VmHWM") - start_rss) / 1024,
                      **{k: metrics[k] for k in PARTS}}))


def time_recompute_paired(model, ns) -> dict:
    """Phase time storing vs recomputing the reference logits, on one trainer whose setting
    alternates phase by phase (the setting only changes where the reference logits come from)."""
    trainer = make_trainer(model, precision=ns.precision)
    trainer.train_one_phase()
    times: dict[str, list[float]] = {"store": [], "recompute": []}
    for i in range(2 * max(ns.phases, 3)):
        trainer.reference.keep_residual = i % 2 == 1
        times["recompute" if i % 2 else "store"].append(
            trainer.train_one_phase().metrics["charts/phase_time"])
    return {f"{key}_phase_s": statistics.median(values) for key, values in times.items()}


def part_memory(model, ns, console) -> dict:
    rows = []
    for variant in ["store", "recompute"]:
        command = [sys.executable, __file__, "--memory-child", variant,
                   "--memory-batch", str(ns.memory_batch), "--memory-gen-len",
                   str(ns.memory_gen_len), "--precision", ns.precision]
        command += ["--threads", str(ns.threads)] if ns.threads else []
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        console.print(f"memory {variant}: peak {rows[-1]['peak_rss_mib']:.0f} MiB")
    store, lean = rows
    table = Table("reference logits", "RSS at start (MiB)", "peak (MiB)",
                  "phase's own peak (MiB)", "phase (s)",
                  title=f"Memory of one phase, batch {ns.memory_batch}, gen_len "
                        f"{ns.memory_gen_len}, precision {ns.precision}")
    for row in rows:
        table.add_row(row["variant"], f"{row['rss_at_start_mib']:.0f}",
                      f"{row['peak_rss_mib']:.0f}", f"{row['phase_peak_over_start_mib']:.0f}",
                      f"{row['charts/phase_time']:.1f}")
    console.print(table)
    console.print(
        f"recompute vs store: peak {lean['peak_rss_mib'] / store['peak_rss_mib'] - 1:+.0%}, "
        f"phase's own peak {lean['phase_peak_over_start_mib'] / store['phase_peak_over_start_mib'] - 1:+.0%} "  # noqa: E501
        "(phase times above: separate processes, not comparable under load)")
    paired = time_recompute_paired(model, ns)
    console.print(
        f"Paired in one process, preset (batch 32, gen_len 20), precision {ns.precision}: store "
        f"{paired['store_phase_s']:.2f} s, recompute {paired['recompute_phase_s']:.2f} s per "
        f"phase: time {paired['recompute_phase_s'] / paired['store_phase_s'] - 1:+.1%}")
    return {"fresh_processes": rows, "paired_time": paired}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["split", "scale", "memory", "floor"])
    parser.add_argument("--phases", type=int, default=2, help="timed phases per setting")
    parser.add_argument("--memory-batch", type=int, default=128)
    parser.add_argument("--memory-gen-len", type=int, default=30)
    parser.add_argument("--memory-child", choices=["store", "recompute"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"],
                        help="precision of the memory part (default: the preset's)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ns = parser.parse_args()
    if ns.memory_child:
        return memory_child(ns)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    console = Console(width=140)
    results: dict = {"setup": {k: str(v) for k, v in vars(ns).items()},
                     "torch_threads": torch.get_num_threads()}
    path = ns.out / "phase_time.json"
    if path.exists():  # keep the parts not rerun
        results = {**json.loads(path.read_text()), **results}
    model = load_policy("smollm2")
    if "split" in ns.parts:
        results["split"] = part_split(model, ns, console)
    if "scale" in ns.parts:
        results["scale"] = part_scale(model, ns, console)
    if "memory" in ns.parts:
        results["memory"] = part_memory(model, ns, console)
    if "floor" in ns.parts:
        results["floor"] = part_floor(model, ns, console)
    ns.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    console.print(f"figures written to {path}")


if __name__ == "__main__":
    main()
