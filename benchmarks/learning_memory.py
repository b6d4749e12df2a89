"""Benchmark: peak memory of a full-weight GRPO learning phase, chunked against the code before it.

SmolLM2-135M, every weight trained, the TRL comparison's GRPO job (`benchmarks/trl_peer.py`:
batch 32 in 4 minibatches, 2 passes, fp32, exact KL) with 64-token answers. Each variant runs
in a fresh process: one rollout phase, then the learning phase; the process reads its own
peak resident memory (/proc/self/status VmHWM) after the rollout, resets the counter, and reads
it again after the learning phase. The variants:

- "before": minirlhf as of commit 5e2b560 (`--baseline`), exported with `git archive` into a
  temporary folder and imported from there: every learning step holds the minibatch's logits,
  log-softmaxes and probabilities (8 x 64 x 49,152 floats each) for its backward pass, and the
  rollout evaluation a chunk of rows' whole logits;
- "chunked": this checkout (`minirlhf.token_stats`: a few positions at a time, one
  log-softmax per chunk, the backward pass recomputing each chunk's unembedding);
- "chunked+ref_residual": the same with `recompute_ref_logits=True` (the reference keeps its
  final residual stream for the phase instead of its 32 x 64 x 49,152 logits);
- "chunked+checkpointed": with `activation_checkpointing=True` (each block's input kept, the
  block rerun in the backward pass);
- "lean": both;
- "before+mmap", "lean+mmap": the same two under glibc's `MALLOC_MMAP_THRESHOLD_=131072` (every
  block over 128 KiB its own mapping, returned when freed), to show the allocator's share;
- "lean+trim": lean, with glibc's `malloc_trim(0)` after every optimiser step;
- "before+mmap1m", "lean+mmap1m": `MALLOC_MMAP_THRESHOLD_=1048576` (1 MiB);
- "lean+freed": lean with `return_freed_memory=True` (`runtime.allocator`: the same 1 MiB
  threshold, set by minirlhf itself through glibc's `mallopt`).

All sample the same answers (same seed, same sampler). Target (issue 28): peak at least 40%
lower. Measured 2026-12-07 (OMP_NUM_THREADS=1, AMD EPYC with AVX512-BF16, unused: float32),
after SmolLM2's embeddings were tied (`runtime.tied`), in one run; MiB, learning seconds:

| variant | rollout peak | learning start | process peak | learning | against before |
|---|---|---|---|---|---|
| before (5e2b560) | 3,271 | 2,791 | 6,533 | 62 s | |
| lean | 2,525 | 2,503 | 4,196 | 71 s | -35.8% |
| lean+trim | 2,399 | 2,016 | 4,073 | 75 s | -37.7% |
| before+mmap1m | 2,913 | 2,212 | 6,159 | 74 s | |
| lean+mmap1m | 2,235 | 1,837 | 3,652 | 91 s | -44.1% (-40.7% against before+mmap1m) |

Another run (`--variants before,lean,lean+freed,lean+mmap1m`, beside four training benchmarks,
so its times are not comparable): before 6,535, lean 4,162 (-36.3%), lean+freed and lean+mmap1m
3,697 each (-43.4%): minirlhf's own setting does what the environment variable does.

Met only with the allocator setting: the floor of full-weight fp32 AdamW training here is about
3,240 MiB (imports, the policy and the reference's copy, the gradients, AdamW's two moments);
docs/performance.md says what lies between it and each row (and the rows of the untied model),
and what each setting costs in time.

    OMP_NUM_THREADS=1 python benchmarks/learning_memory.py
"""

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("rollout_peak_mib", "learning_start_mib", "learning_peak_mib", "process_peak_mib",
          "learning_time_s")


def read_status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since start or the last reset) of this process, MiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def make_trainer(threads: int, batch: int, gen_len: int, passes: int, **settings):
    """The benchmark's job: SmolLM2, every weight trained, GRPO against a character count on the
    shipped review prompts, float32, `passes` learning passes of 4 minibatches, and `settings`
    (RLHFArgs fields; pass only those the imported minirlhf has: the baseline's lacks the newer
    ones)."""
    import torch
    from rich.console import Console

    from minirlhf.args import RLHFArgs
    from minirlhf.cli.presets import MOVIE_ARGS
    from minirlhf.rewards import reward_fn_char_count
    from minirlhf.runtime.loading import load_policy
    from minirlhf.trainer import RLHFTrainer

    torch.set_num_threads(threads)
    args = RLHFArgs(**{**MOVIE_ARGS, "prompts": "reviews", "held_out_fraction": 0.0,
                       "group_size": 4, "batch_size": batch, "num_minibatches": 4,
                       "batches_per_learning_phase": passes, "gen_len": gen_len,
                       "advantage_estimator": "grpo", "precision": "fp32", "total_phases": 3,
                       **settings})
    return RLHFTrainer(args, reward_fn_char_count, base_model=load_policy("smollm2"),
                       console=Console(quiet=True), table_every=0)


def child(ns: argparse.Namespace):
    """One variant, in this fresh process (whose minirlhf is the variant's)."""
    newer = {name: True for name in ("activation_checkpointing", "return_freed_memory")
             if getattr(ns, name)}  # fields the baseline's RLHFArgs lacks: passed only when set
    trainer = make_trainer(ns.threads, ns.batch, ns.gen_len, 2,
                           recompute_ref_logits=ns.recompute_ref_logits, **newer)
    if ns.trim:
        trim_after_each_step(trainer.optimizer)
    rollout = trainer.rollout_phase()
    rollout_peak = read_status_mib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
    start, started = read_status_mib("VmRSS"), time.perf_counter()
    stats = trainer.learning_phase(rollout.memory)
    learning_peak = read_status_mib("VmHWM")
    print(json.dumps({"rollout_peak_mib": rollout_peak, "learning_start_mib": start,
                      "learning_peak_mib": learning_peak,
                      "process_peak_mib": max(rollout_peak, learning_peak),
                      "learning_time_s": time.perf_counter() - started,
                      "objective": stats["losses/objective"]}))


def trim_after_each_step(optimizer):
    """After every optimiser step, hand the heap's free pages back to the system (glibc's
    `malloc_trim`), so that the holes torch's freed tensors leave are not resident."""
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    step = optimizer.step

    def step_and_trim(*args, **kwargs):
        result = step(*args, **kwargs)
        trim(0)
        return result

    optimizer.step = step_and_trim


def head_child(variant: str, ns: argparse.Namespace):
    """The head alone, in this fresh process: SmolLM2's shapes (d_model 576, d_vocab 49,152),
    one minibatch (batch / 4 rows x gen_len), reference logits kept; stats, then backward.
    Prints the peak above the start (MiB) of `variant`: "unchunked" (`losses` on the whole
    logits), "checkpointed" or "kept_log_softmax" (`token_stats.RECOMPUTE_ABOVE_TOKENS`)."""
    import torch

    from minirlhf import token_stats
    from minirlhf.losses import calc_entropy, calc_kl, get_gen_logprobs

    torch.manual_seed(0)
    rows, d_model, d_vocab = ns.batch // 4, 576, 49152
    residual = torch.randn(rows, ns.gen_len, d_model, requires_grad=True)
    w_u = (0.05 * torch.randn(d_vocab, d_model)).requires_grad_(True)
    ref_logits = torch.randn(rows, ns.gen_len, d_vocab)
    tokens = torch.randint(0, d_vocab, (rows, ns.gen_len))
    Path("/proc/self/clear_refs").write_text("5")
    start = read_status_mib("VmRSS")
    if variant == "unchunked":
        logits = residual @ w_u.T
        logprobs = get_gen_logprobs(logits, tokens)
        outputs = (logprobs, calc_kl("exact", logprobs, logits, ref_logits, tokens),
                   calc_entropy(logits))
    else:
        token_stats.RECOMPUTE_ABOVE_TOKENS = 0 if variant == "checkpointed" else 10**9
        token_stats.CHUNK_TOKENS = ns.chunk_tokens or token_stats.CHUNK_TOKENS
        stats = token_stats.get_token_stats(lambda p: residual[:, p] @ w_u.T, tokens,
                                            lambda p: ref_logits[:, p])
        outputs = stats.logprobs, stats.exact_kl, stats.entropy
    sum(o.sum() for o in outputs).backward()
    print(json.dumps({"variant": variant, "peak_over_start_mib": read_status_mib("VmHWM") - start}))


def export_baseline(commit: str, folder: Path) -> Path:
    """The `minirlhf` package as of `commit`, written under `folder` (git archive)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "minirlhf"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


LEAN = ["--recompute-ref-logits", "--activation-checkpointing"]
MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""glibc's malloc: every block over 128 KiB its own mapping, returned to the system when freed
(by default the threshold rises to the largest block freed, up to 32 MiB, and blocks below it
come from a heap whose freed holes stay resident)."""
MMAP_1M = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
"""The same at 1 MiB: a block's activations and weight gradients (1-4 MiB for SmolLM2) are
mappings of their own, smaller pieces come from the heap."""
VARIANTS = {  # name: (the baseline's package?, flags, environment)
    "before": (True, [], {}),
    "chunked": (False, [], {}),
    "chunked+ref_residual": (False, ["--recompute-ref-logits"], {}),
    "chunked+checkpointed": (False, ["--activation-checkpointing"], {}),
    "lean": (False, LEAN, {}),
    "before+mmap": (True, [], MMAP),
    "lean+mmap": (False, LEAN, MMAP),
    "lean+trim": (False, [*LEAN, "--trim"], {}),
    "before+mmap1m": (True, [], MMAP_1M),
    "lean+mmap1m": (False, LEAN, MMAP_1M),
    "lean+freed": (False, [*LEAN, "--return-freed-memory"], {}),
}


def run_variant(package_root: Path, ns: argparse.Namespace, *extra: str, env: dict) -> dict:
    """One fresh process importing minirlhf from `package_root`; its JSON line."""
    env = {**os.environ, **env, "PYTHONPATH": str(package_root),
           "OMP_NUM_THREADS": str(ns.threads)}
    command = [sys.executable, __file__, "--child", "--threads", str(ns.threads),
               "--batch", str(ns.batch), "--gen-len", str(ns.gen_len), *extra]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=package_root)
    if out.returncode:
        raise RuntimeError(f"the variant at {package_root} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_heads(ns: argparse.Namespace):
    """The head alone (`head_child`), each way in a fresh process: which keeps least."""
    for variant in ["unchunked", "checkpointed", "kept_log_softmax"]:
        command = [sys.executable, __file__, "--head-child", variant, "--batch", str(ns.batch),
                   "--gen-len", str(ns.gen_len), "--chunk-tokens", str(ns.chunk_tokens or 0)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(ns.threads)}
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        print(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="5e2b560", help="the commit to compare with")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recompute-ref-logits", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--activation-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--return-freed-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--head-child", help=argparse.SUPPRESS)
    parser.add_argument("--trim", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-tokens", type=int, help="head: token_stats.CHUNK_TOKENS")
    parser.add_argument("--part", choices=["phase", "head"], default="phase",
                        help="head: the log-prob / entropy / KL head alone, three ways")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    ns = parser.parse_args()
    if ns.child:
        return child(ns)
    if ns.head_child:
        return head_child(ns.head_child, ns)
    if ns.part == "head":
        return compare_heads(ns)
    sys.path.insert(0, str(ROOT))
    from minirlhf.runtime.device import describe_cpu

    machine = describe_cpu()
    print(f"CPU: {machine['cpu']}, {machine['cores']} cores, fast bf16: {machine['fast_bf16']}, "
          f"{ns.threads} torch thread(s); batch {ns.batch}, gen_len {ns.gen_len}, fp32")
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        baseline = export_baseline(ns.baseline, Path(folder))
        for name in ns.variants.split(","):
            old, extra, env = VARIANTS[name]
            rows[name] = run_variant(baseline if old else ROOT, ns, *extra, env=env)
            print(f"{name:22s}", "  ".join(f"{k} {rows[name][k]:.1f}" for k in FIELDS),
                  flush=True)
    for name in [name for name in rows if name != "before" and "before" in rows]:
        change = rows[name]["process_peak_mib"] / rows["before"]["process_peak_mib"] - 1
        print(f"process peak, before -> {name}: {rows['before']['process_peak_mib']:.0f} -> "
              f"{rows[name]['process_peak_mib']:.0f} MiB ({change:+.1%})")
    own = {name: row["learning_peak_mib"] - row["learning_start_mib"] for name, row in rows.items()}
    print("learning phase's own peak (above its start), MiB: " + ", ".join(
        f"{name} {value:.0f}" for name, value in own.items()))
    ns.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "setup": {k: str(v) for k, v in vars(ns).items()}, **rows}
    (ns.out / "learning_memory.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
