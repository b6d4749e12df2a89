"""Benchmark: per task, SmolLM2-135M-Instruct's held-out pass@1 for base, SFT and SFT + GRPO.

The table nobody publishes for RL from verifiable rewards at this size: for each task of
`minirlhf.tasks`, the greedy held-out pass@1 of the base model, of the model after `minirlhf sft
--task` and after `minirlhf train --task --base-model <sft run>` (GRPO, the `smollm2-task`
preset), the training minutes of each stage on a plain CPU (float32), the samples each used, and
the share of GRPO groups whose answers all got the same reward (they teach nothing). The three
pass@1 are measured the same way (`measure_pass_at_1`: the first `--eval-prompts` held-out
prompts, rendered as the preset renders them, greedy until <|im_end|> or 24 tokens).

    OMP_NUM_THREADS=2 python benchmarks/tasks.py                  # every task, about 20 min each
    OMP_NUM_THREADS=2 python benchmarks/tasks.py --tasks add,reverse --grpo-minutes 10
    python benchmarks/tasks.py --smoke                            # tiny model: checks it runs

Stages run in order per task and each is skipped once its result is in
benchmarks/results/tasks-<task>.json, so a stopped benchmark continues where it was (a stage
stopped mid-run is resumed from its run folder's checkpoint, under --runs-dir). The markdown
table of every task measured so far goes to benchmarks/results/tasks.md (docs/tasks.md).

SFT defaults (`SFT_TASK_ARGS`): LoRA rank 16 on the top 8 blocks, LR 5e-4, steps of 8
demonstrations, one pass, as many steps as `SFT_STEPS` gives the task (add: 32, 256
demonstrations). Chosen to land the SFT model inside the band where GRPO learns
(pass@1 0.1-0.9); measured on `add` only so far (0.14 -> 0.62, docs/tasks.md): the base model
fails the string and format tasks because it explains instead of answering
(benchmarks/task_band.py); a few hundred
demonstrations teach that *form* (the number or word alone, then the end of the turn) long before
they teach reversing or sorting letters, which a 135M model does only sometimes. The format tasks
have 148 training problems and are learnt fast: measured with `--sft-steps 16` (three-words:
0.64) and `--sft-steps 4` (question: 0.00; with 16 steps it is 1.00, where GRPO's groups all pass
and teach nothing). `--sft-steps` and `--sft-lr` change it.

GRPO gets at most `--grpo-minutes` (15) of training: a probe of 3 phases measures a phase's
training time (rollout and learning, not the held-out evaluation), and the run is resumed up to
the number of phases that fits the budget (the LR schedule is stretched to it; the probe's 3
phases ran on the 3-phase schedule's warmup). Training minutes are the sum of the phases'
rollout and learning times; the SFT's are the command's wall-clock (model load included).
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from minirlhf import cli
from minirlhf.cli.presets import PRESETS, SFT_TASK_ARGS, TASK_PRESET
from minirlhf.cli.run_folder import load_run_policy
from minirlhf.prompts import render_prompts
from minirlhf.runtime.device import describe_cpu
from minirlhf.runtime.loading import load_policy
from minirlhf.sampling import SamplingConfig, get_samples
from minirlhf.tasks import TASKS, get_task

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("base", "sft", "grpo")
PROBE_PHASES = 3
"""GRPO phases run to time one (the preset's 2 warmup phases need at least 3)."""
SFT_STEPS = {"add": 32, "three-words": 16, "question": 4}
"""SFT steps of 8 demonstrations per task without --sft-steps (32 for the others): measured
(docs/tasks.md) to leave GRPO something to teach; `question` passes every held-out prompt after
16 steps."""

SMOKE = {"model": "tiny", "chat_template": False, "prepend_bos": True, "gen_len": 4,
         "sft": ["--trainable-layers", "none", "--lora-rank", "0", "--batch-size", "4"],
         "train": ["--preset", "tiny-smoke", "--advantage-estimator", "grpo", "--group-size",
                   "4", "--batch-size", "8", "--stop-at-eos"]}
"""--smoke: the tiny random model, its text rendered as tiny-smoke renders it (no chat
template), 2 SFT steps, 1 GRPO phase, 8 held-out prompts."""
REAL = {"model": SFT_TASK_ARGS["base_model"], "chat_template": SFT_TASK_ARGS["chat_template"],
        "prepend_bos": SFT_TASK_ARGS["prepend_bos"],
        "gen_len": PRESETS[TASK_PRESET]["args"]["gen_len"], "sft": [], "train": []}


def measure_pass_at_1(model, task_name: str, count: int, setting: dict) -> dict:
    """Greedy answers to the first `count` held-out prompts of the task, rendered and ended as
    the runs render and end them: pass@1, the mean score (partial credit included), 3 answers."""
    task, scores, answers = get_task(task_name), [], []
    records = task.get_records("held_out", min(count, len(task.get_problems("held_out"))))
    for start in range(0, len(records), 16):
        chunk = records[start : start + 16]
        texts = render_prompts(chunk, None, setting["chat_template"], model.tokenizer)
        samples = get_samples(model, texts, gen_len=setting["gen_len"],
                              sampling=SamplingConfig(top_k=1), seed=0,
                              prepend_bos=setting["prepend_bos"], stop_at_eos=True)
        scores += [task.check(r, **record) for r, record in zip(samples.responses, chunk)]
        answers += samples.responses
    return {"pass_at_1": sum(s >= 1.0 for s in scores) / len(scores),
            "mean_score": sum(scores) / len(scores), "prompts": len(records),
            "examples": answers[:3]}


def get_sft_steps(ns: argparse.Namespace, task: str) -> int:
    return ns.sft_steps or SFT_STEPS.get(task, 32)


def run_sft(task: str, folder: Path, ns: argparse.Namespace, setting: dict) -> dict:
    """`minirlhf sft --task` (resumed if its folder holds an unfinished run), timed."""
    start = time.perf_counter()
    if (folder / "run.json").is_file() and not (folder / "policy.pt").is_file():
        cli.main(["sft", "--out", str(folder), "--resume"])
    elif not (folder / "policy.pt").is_file():
        batch = 4 if ns.smoke else SFT_TASK_ARGS["batch_size"]
        count = get_sft_steps(ns, task) * batch
        cli.main(["sft", "--task", task, "--out", str(folder), "--force",
                  "--base-model", setting["model"], "--base-lr", str(ns.sft_lr),
                  "--precision", "fp32", "--num-demonstrations", str(count),
                  "--chat-template" if setting["chat_template"] else "--no-chat-template",
                  "--prepend-bos" if setting["prepend_bos"] else "--no-prepend-bos",
                  *setting["sft"]])
    run = json.loads((folder / "run.json").read_text())
    held_out = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"minutes": (time.perf_counter() - start) / 60,
            "samples": run["sft"]["num_demonstrations"] * run["sft"]["args"]["epochs"],
            "steps": len(held_out), "held_out_exact_match": held_out[-1]["held_out/exact_match"]}


def read_phases(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def get_train_seconds(phase: dict) -> float:
    """A phase's training time: its rollout and learning phase, not the held-out evaluation."""
    return phase["charts/rollout_time"] + phase["charts/learning_time"]


def size_phases(probe: list[float], budget_s: float, least: int, most: int) -> int:
    """How many phases of the probe's median training time (its first, which warms up, left
    out when there are others) fit in `budget_s`, between `least` and `most`."""
    timed = probe[1:] if len(probe) > 1 else probe
    return max(least, min(most, math.floor(budget_s / statistics.median(timed))))


def train_grpo(task: str, sft_folder: Path, folder: Path, ns: argparse.Namespace,
               setting: dict) -> int:
    """`minirlhf train --task --base-model <sft run>`: a probe of a few phases, then resumed up
    to the phases that fit `--grpo-minutes` (a run stopped on the way is resumed). Returns the
    planned phases."""
    probe = 1 if ns.smoke else PROBE_PHASES
    if not (folder / "run.json").is_file():
        cli.main(["train", "--task", task, "--base-model", str(sft_folder), "--out", str(folder),
                  "--force", "--precision", "fp32", "--total-phases", str(probe),
                  "--table-every", "0", "--eval-every", str(ns.eval_every), "--held-out-max",
                  str(ns.eval_held_out), "--eval-pass-k", str(ns.eval_pass_k), *setting["train"],
                  *ns.train_flags])
    phases = read_phases(folder)
    if len(phases) < probe:
        cli.main(["train", "--out", str(folder), "--resume"])
        phases = read_phases(folder)
    planned = size_phases([get_train_seconds(p) for p in phases[:probe]], ns.grpo_minutes * 60,
                          probe, probe if ns.smoke else ns.max_phases)
    if len(phases) < planned:
        cli.main(["train", "--out", str(folder), "--resume", "--total-phases", str(planned)])
    return planned


def run_grpo(task: str, sft_folder: Path, folder: Path, ns: argparse.Namespace,
             setting: dict) -> dict:
    """GRPO from the SFT run, and what its phases logged: training minutes, samples, the share
    of zero-spread groups (first phase, mean of the last 5), the reward and pass@1 curves."""
    start = time.perf_counter()
    planned = train_grpo(task, sft_folder, folder, ns, setting)
    phases = read_phases(folder)
    batch_size = json.loads((folder / "run.json").read_text())["args"]["batch_size"]
    zero = [p["charts/frac_reward_zero_std"] for p in phases]
    return {"phases": len(phases), "planned_phases": planned,
            "minutes": sum(get_train_seconds(p) for p in phases) / 60,
            "wall_minutes": (time.perf_counter() - start) / 60,
            "samples": len(phases) * batch_size, "zero_spread_first": zero[0],
            "zero_spread_last5": statistics.mean(zero[-5:]),
            "reward_curve": [round(p["charts/reward_mean"], 4) for p in phases],
            "zero_spread_curve": [round(z, 4) for z in zero],
            "pass_at_1_curve": {str(i): p["eval/pass_at_1"] for i, p in enumerate(phases)
                                if "eval/pass_at_1" in p}}


def run_stage(stage: str, task: str, ns: argparse.Namespace, setting: dict) -> dict:
    """One stage of one task, and the held-out pass@1 of the model it ends with."""
    sft_folder = ns.runs_dir / f"{task}-sft"
    grpo_folder = ns.runs_dir / f"{task}-grpo{'-' + ns.tag if ns.tag else ''}"
    if stage == "base":
        row, model = {"minutes": 0.0, "samples": 0}, load_policy(setting["model"])
    elif stage == "sft":
        row = run_sft(task, sft_folder, ns, setting)
        model = load_policy(str(sft_folder))
    else:
        row = run_grpo(task, sft_folder, grpo_folder, ns, setting)
        model = load_run_policy(grpo_folder).policy
    return row | measure_pass_at_1(model, task, ns.eval_prompts, setting)


def write_markdown(results: list[dict], path: Path) -> str:
    """The table of every task measured so far (a stage not yet run: "-")."""
    def cell(result, stage, key, form="{:.2f}"):
        return form.format(result[stage][key]) if stage in result else "-"

    lines = ["| task | base pass@1 | SFT pass@1 | SFT + GRPO pass@1 | SFT minutes | GRPO minutes "
             "| SFT samples | GRPO samples (phases) | zero-spread share: first phase, last 5 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        grpo = r.get("grpo")
        lines.append(
            f"| `{r['task']}` | {cell(r, 'base', 'pass_at_1')} | {cell(r, 'sft', 'pass_at_1')} | "
            f"{cell(r, 'grpo', 'pass_at_1')} | {cell(r, 'sft', 'minutes', '{:.1f}')} | "
            f"{cell(r, 'grpo', 'minutes', '{:.1f}')} | {cell(r, 'sft', 'samples', '{}')} | "
            + (f"{grpo['samples']} ({grpo['phases']}) | {grpo['zero_spread_first']:.2f}, "
               f"{grpo['zero_spread_last5']:.2f} |" if grpo else "- | - |"))
    machine = results[0]["machine"] if results else describe_cpu()
    text = (f"{machine['cpu']}, {results[0]['threads'] if results else '?'} threads, float32; "
            f"fast bf16: {machine['fast_bf16']}. Held-out pass@1: greedy, the first "
            f"{results[0]['eval_prompts'] if results else '?'} held-out prompts (all of them "
            "when a task has fewer).\n\n"
            + "\n".join(lines) + "\n")
    path.write_text(text)
    return text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--sft-steps", type=int, help="SFT steps (one pass); default: SFT_STEPS")
    parser.add_argument("--sft-lr", type=float, default=SFT_TASK_ARGS["base_lr"])
    parser.add_argument("--grpo-minutes", type=float, default=15.0)
    parser.add_argument("--max-phases", type=int, default=200)
    parser.add_argument("--eval-prompts", type=int, default=64,
                        help="held-out prompts of the pass@1 of each stage")
    parser.add_argument("--eval-every", type=int, default=10, help="GRPO's own evaluations")
    parser.add_argument("--eval-held-out", type=int, default=16)
    parser.add_argument("--eval-pass-k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs-dir", type=Path)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny model, 2 SFT steps, 1 GRPO phase, 8 prompts")
    parser.add_argument("--tag", default="", help="a GRPO variant's name: its results go to "
                        "tasks-<task>-<tag>.json, reusing the untagged file's base and SFT")
    parser.add_argument("--train-flags", default="", help="more `minirlhf train` flags for the "
                        "GRPO stage, one string, e.g. '--batch-size 64 --base-lr 3e-4'")
    ns = parser.parse_args()
    ns.train_flags = ns.train_flags.split()
    if ns.smoke:
        ns.sft_steps, ns.eval_prompts, ns.eval_held_out, ns.eval_pass_k = 2, 8, 4, 2
    ns.runs_dir = ns.runs_dir or Path("runs") / ("tasks-smoke" if ns.smoke else "tasks-bench")
    return ns


def main():
    ns = parse_args()
    torch.set_num_threads(ns.threads)
    console, setting = Console(), SMOKE if ns.smoke else REAL
    machine = describe_cpu()
    console.print(f"CPU: {machine['cpu']}, {ns.threads} threads; bf16 "
                  f"{'fast' if machine['fast_bf16'] else 'slow (no AVX512-BF16)'}; float32")
    prefix, results = "tasks-smoke-" if ns.smoke else "tasks-", []
    ns.results_dir.mkdir(parents=True, exist_ok=True)
    for task in ns.tasks.split(","):
        path = ns.results_dir / f"{prefix}{task}{'-' + ns.tag if ns.tag else ''}.json"
        untagged = ns.results_dir / f"{prefix}{task}.json"
        result = (json.loads(path.read_text()) if path.is_file() else
                  {"task": task, "machine": machine, "threads": ns.threads,
                   "eval_prompts": ns.eval_prompts, "sft_steps": get_sft_steps(ns, task),
                   "sft_lr": ns.sft_lr, "grpo_minutes": ns.grpo_minutes,
                   "train_flags": ns.train_flags})
        if ns.tag and untagged.is_file() and "sft" not in result:  # the same base and SFT run
            result |= {k: v for k, v in json.loads(untagged.read_text()).items()
                       if k in ("base", "sft")}
        for stage in STAGES:
            if stage in result:
                console.print(f"{task} {stage}: done ({path}), skipped")
                continue
            result[stage] = run_stage(stage, task, ns, setting)
            path.write_text(json.dumps(result, indent=1) + "\n")
            console.print(f"[bold]{task} {stage}[/]: pass@1 {result[stage]['pass_at_1']:.3f} "
                          f"{result[stage]['examples']}", soft_wrap=True)
        results.append(result)
    table = Table("task", *STAGES, title="held-out pass@1 (greedy)")
    for r in results:
        table.add_row(r["task"], *[f"{r[s]['pass_at_1']:.2f}" for s in STAGES])
    console.print(table)
    console.print(write_markdown(results, ns.results_dir / f"{prefix.rstrip('-')}.md"))


if __name__ == "__main__":
    main()
