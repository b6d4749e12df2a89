"""Benchmark: one policy, three tasks. Control tokens with SmolLM2-135M and VADER (seed 000).

Every phase a third of the prompts start with `[negative]`, `[neutral]` and `[positive]`; each
sample is rewarded for the sentiment its control token asks for (`smollm2-control` preset). The
script prints and saves the mean VADER compound per task and phase: a policy that learns all three
pulls the three curves apart (positive up, negative down, neutral towards 0).

    python benchmarks/control_tokens.py --phases 20
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console

from minirlhf.args import RLHFArgs
from minirlhf.cli.presets import PRESETS
from minirlhf.sentiment import (
    CONTROL_TOKENS,
    make_control_prompts,
    make_control_token_reward,
    split_control_token,
    vader_compound,
)
from minirlhf.trainer import RLHFTrainer, Rollout


def vader_by_task(samples: list[str]) -> dict[str, float]:
    """Mean VADER compound of the continuation text for each control token."""
    by_task = defaultdict(list)
    for sample in samples:
        task, text = split_control_token(sample)
        by_task[task].append(text)
    return {task: vader_compound(texts).mean().item() for task, texts in by_task.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, default=20)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    args = RLHFArgs(**{**PRESETS["smollm2-control"]["args"], "total_phases": ns.phases})
    console = Console()
    trainer = RLHFTrainer(args, make_control_token_reward(),
                          prompts=make_control_prompts(args.prefix, args.batch_size),
                          console=console, table_every=0)
    per_phase, last = [], {}

    def on_phase_end(trainer: RLHFTrainer, rollout: Rollout):
        metrics = rollout.metrics
        last["rollout"] = rollout
        scores = vader_by_task(rollout.texts)
        per_phase.append({**scores, "kl": metrics["charts/kl"],
                          "phase_time": metrics["charts/phase_time"]})
        shown = "  ".join(f"{task} {scores[task]:+.2f}" for task in CONTROL_TOKENS)
        console.print(f"phase {metrics['charts/phase']:2d}: {shown}  kl {metrics['charts/kl']:.2f}",
                      soft_wrap=True, markup=False)

    trainer.train(on_phase_end=on_phase_end)
    ns.out.mkdir(parents=True, exist_ok=True)
    final = last["rollout"]
    samples = dict(zip(final.texts, final.rewards.tolist()))
    (ns.out / "control_tokens.json").write_text(json.dumps(
        {"args": args.to_dict(), "vader_by_task_per_phase": per_phase, "samples_after": samples},
        indent=1))
    for sample in final.texts[:6]:
        console.print(repr(sample), soft_wrap=True, markup=False)


if __name__ == "__main__":
    main()
