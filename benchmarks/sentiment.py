"""Benchmark: steer SmolLM2-135M's sentiment with PPO + VADER on this CPU, side by side.

Runs the offline preset (`smollm2-vader`: prompt "This movie was", batch 32, gen_len 20) for each
requested variant in one process and reports, per variant: the baseline (phase 0) mean VADER
compound score, the first phase reaching the target, the best and final means, KL to the
reference, wall time, and samples before and after. Writes the figures to a JSON file and one
plot with every curve, so the one-step estimator and GAE can be compared at a glance.

    python benchmarks/sentiment.py                       # gae-pos, one_step-pos, gae-neg
    python benchmarks/sentiment.py --runs gae-pos --phases 10
    python benchmarks/sentiment.py --report-only         # table + plot of the saved results

Each variant's figures go to `<out>/sentiment-<variant>.json`, so variants can also run as
separate processes (e.g. two single-thread processes side by side on a 2-core machine); the
table and the plot always cover every result file in the folder.

Targets (issue 3): positive mean >= 0.9 and negative mean <= -0.8 within 25 phases, each run
in at most 15 minutes on the 2-core CPU.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from minirlhf.args import RLHFArgs
from minirlhf.cli.presets import PRESETS
from minirlhf.cli.report import two_panel_figure
from minirlhf.runtime.loading import load_policy
from minirlhf.sentiment import make_vader_reward
from minirlhf.trainer import RLHFTrainer, Rollout

TARGETS = {"pos": 0.9, "neg": -0.8}


def run_variant(name: str, phases: int, seed: int, overrides: dict, console: Console) -> dict:
    """Train one variant ("gae-pos", "one_step-neg", ...) and collect its figures."""
    estimator, direction = name.rsplit("-", 1)
    args = RLHFArgs(**{**PRESETS["smollm2-vader"]["args"], "total_phases": phases,
                       "advantage_estimator": estimator, "seed": seed, **overrides})
    if overrides:
        name += " " + " ".join(f"{k}={v}" for k, v in overrides.items())
    reward_fn = make_vader_reward(direction)  # reward = VADER compound (negated for "neg")
    trainer = RLHFTrainer(args, reward_fn, base_model=load_policy("smollm2"),
                          console=console, table_every=0)
    start = time.perf_counter()
    first_samples: list = []
    last_samples: list = []

    def on_phase_end(trainer: RLHFTrainer, rollout: Rollout):
        metrics = rollout.metrics
        last_samples[:] = zip(rollout.texts, rollout.rewards.tolist())
        if not first_samples:
            first_samples.extend(last_samples)
        console.print(f"{name} phase {metrics['charts/phase']:2d}: reward "
                      f"{metrics['charts/reward_mean']:+.3f} kl {metrics['charts/kl']:.3f} "
                      f"{metrics['charts/phase_time']:.1f} s", soft_wrap=True)

    history = trainer.train(on_phase_end=on_phase_end)
    wall = time.perf_counter() - start
    sign = 1.0 if direction == "pos" else -1.0  # report VADER itself, not the negated reward
    vader = [sign * m["charts/reward_mean"] for m in history]
    target = TARGETS[direction]
    reached = [i for i, v in enumerate(vader) if (v >= target if sign > 0 else v <= target)]
    return {
        "name": name, "estimator": estimator, "direction": direction, "phases": phases,
        "overrides": overrides,
        "seed": seed, "wall_time_s": wall, "vader_mean_per_phase": vader,
        "kl_per_phase": [m["charts/kl"] for m in history],
        # With a prompt file (--set prompts=reviews): one sample of every held-out prompt, every
        # eval_every phases (None in the others).
        "held_out_per_phase": [None if "eval/held_out_reward" not in m
                               else sign * m["eval/held_out_reward"] for m in history],
        "phase_time_s": [m["charts/phase_time"] for m in history],
        "sample_time_s": [m["charts/sample_time"] for m in history],
        "learning_time_s": [m["charts/learning_time"] for m in history],
        "baseline": vader[0], "best": max(vader) if sign > 0 else min(vader),
        "final": vader[-1], "target": target,
        "first_phase_reaching_target": reached[0] if reached else None,
        "samples_before": [[s, sign * r] for s, r in first_samples[:6]],
        "samples_after": [[s, sign * r] for s, r in last_samples[:6]],
    }


def plot(results: list[dict], path: Path):
    with two_panel_figure(path, figsize=(11, 4)) as (ax_vader, ax_kl):
        for r in results:
            ax_vader.plot(r["vader_mean_per_phase"], marker="o", ms=3, label=r["name"])
            ax_kl.plot(r["kl_per_phase"], marker="o", ms=3, label=r["name"])
        for target in TARGETS.values():
            ax_vader.axhline(target, color="grey", ls="--", lw=0.8)
        ax_vader.set(xlabel="phase", ylabel="mean VADER compound", ylim=(-1.05, 1.05),
                     title='SmolLM2-135M, "This movie was", batch 32')
        ax_kl.set(xlabel="phase", ylabel="KL(policy || reference), nats/token", title="KL")
        ax_vader.legend()
        ax_kl.legend()


def report(results: list[dict], console: Console):
    table = Table("run", "baseline", "best", "final", "target", "reached at", "KL end",
                  "s/phase", "wall", title="PPO on SmolLM2-135M with VADER")
    for r in results:
        reached = r["first_phase_reaching_target"]
        table.add_row(
            r["name"], f"{r['baseline']:+.3f}", f"{r['best']:+.3f}", f"{r['final']:+.3f}",
            f"{r['target']:+.1f}", "-" if reached is None else f"phase {reached}",
            f"{r['kl_per_phase'][-1]:.2f}",
            f"{sum(r['phase_time_s']) / len(r['phase_time_s']):.1f}",
            f"{r['wall_time_s'] / 60:.1f} min",
        )
    console.print(table)
    for r in results:
        samples = Table("before", "after", title=f"{r['name']}: samples", show_lines=True)
        for (before, rb), (after, ra) in zip(r["samples_before"][:4], r["samples_after"][:4]):
            samples.add_row(Text(f"[{rb:+.2f}] {before}"), Text(f"[{ra:+.2f}] {after}"))
        console.print(samples)


def parse_override(text: str, parser: argparse.ArgumentParser) -> tuple[str, object]:
    """"base_lr=2e-4" -> ("base_lr", 0.0002); values are JSON, else plain strings ("bf16")."""
    if "=" not in text:
        parser.error(f"--set takes FIELD=VALUE pairs (e.g. base_lr=2e-4), got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, {"True": True, "False": False, "None": None}.get(value, value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="gae-pos,one_step-pos,gae-neg",
                        help="comma-separated <estimator>-<direction> variants")
    parser.add_argument("--phases", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--report-only", action="store_true", help="train nothing")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="RLHFArgs overrides on top of the preset, e.g. base_lr=2e-4")
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    console = Console()
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", soft_wrap=True)
    overrides = dict(parse_override(text, parser) for text in ns.set)
    for name in [] if ns.report_only else ns.runs.split(","):
        console.rule(name)
        result = run_variant(name, ns.phases, ns.seed, overrides, console)
        result["torch_threads"] = torch.get_num_threads()
        # One file per variant, written as soon as it is measured.
        slug = result["name"].replace(" ", "_").replace("=", "")
        (ns.out / f"sentiment-{slug}.json").write_text(json.dumps(result, indent=1))
    results = [json.loads(p.read_text()) for p in sorted(ns.out.glob("sentiment-*.json"))]
    plot(results, ns.out / "sentiment.png")
    report(results, console)
    console.print(f"Figures: {ns.out}/sentiment-*.json  Plot: {ns.out / 'sentiment.png'}",
                  soft_wrap=True)


if __name__ == "__main__":
    main()
