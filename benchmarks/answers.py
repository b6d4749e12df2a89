"""Benchmark: answers that end, on SmolLM2-135M-Instruct with its chat template (issue 23).

The `smollm2-chat` preset: the shipped film-review openings, each wrapped in a user message
('Finish this film review in one sentence: "..."') and rendered by the tokenizer's own chat
template; every answer ends at <|im_end|> or is truncated at gen_len; VADER scores the answer
alone. For PPO (GAE) and GRPO, positive and negative, it records per phase the training and
held-out reward, the KL (per token and per answer), the answers' mean length and the share
truncated, and the gap between the sampler's log-probs and the rollout's, with held-out samples
before and after training. Float32, as a plain CPU runs it.

    python benchmarks/answers.py                           # gae-pos, grpo-pos, gae-neg, grpo-neg
    python benchmarks/answers.py --runs grpo-neg --phases 10
    python benchmarks/answers.py --runs grpo-pos --truncation mask   # -> answers-grpo-pos-mask.json
    python benchmarks/answers.py --report-only             # the table of the saved results

Each run's figures go to `<out>/answers-<run>.json`, so runs may go in separate processes.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from minirlhf.args import RLHFArgs
from minirlhf.cli.presets import PRESETS, make_reward_fn
from minirlhf.runtime.device import describe_cpu
from minirlhf.runtime.loading import load_policy
from minirlhf.trainer import RLHFTrainer, Rollout

KEYS = ["charts/reward_mean", "eval/held_out_reward", "charts/kl", "charts/kl_per_answer",
        "charts/response_length", "charts/frac_truncated", "charts/logprob_gap_max",
        "charts/phase_time"]
ESTIMATOR_ARGS = {"gae": {"advantage_estimator": "gae"},
                  "grpo": {"advantage_estimator": "grpo", "group_size": 4}}


def held_out_samples(trainer: RLHFTrainer, count: int = 6) -> list[dict]:
    """Answers of the policy as it is now to the first held-out prompts, with their rewards."""
    prompts = trainer.held_out_prompts[:count]
    samples = trainer.sample(prompts, torch.Generator().manual_seed(0))
    rewards = trainer.reward_fn(samples.responses)  # the preset's reward reads the answer alone
    return [{"prompt": p["prompt"], "answer": a, "reward": float(r), "ended": bool(e)}
            for p, a, r, e in zip(prompts, samples.responses, rewards, samples.ended)]


def run(name: str, phases: int, seed: int, truncation: str, console: Console,
        path: Path) -> dict:
    """Train one run ("gae-pos", "grpo-neg", ...) and collect its figures, written to `path`
    after every phase (marked "complete": false until the run ends)."""
    estimator, direction = name.split("-")
    preset = PRESETS["smollm2-chat"]
    args = RLHFArgs(**{**preset["args"], **ESTIMATOR_ARGS[estimator], "total_phases": phases,
                       "precision": "fp32", "seed": seed, "held_out_max": 32,
                       "truncation": truncation})
    spec = {**preset["reward"], "direction": direction}
    trainer = RLHFTrainer(args, make_reward_fn(spec), base_model=load_policy("smollm2"),
                          console=console, table_every=0)
    label = name if truncation == "keep" else f"{name}-{truncation}"
    result = {"run": label, "args": args.to_dict(), "machine": describe_cpu(),
              "before": held_out_samples(trainer), "phases": []}
    start = time.perf_counter()

    def on_phase_end(trainer: RLHFTrainer, rollout: Rollout):
        row = {key: rollout.metrics.get(key) for key in KEYS}
        result["phases"].append(row)
        console.print(f"{label} phase {len(result['phases']) - 1:2d}: " + ", ".join(
            f"{key.split('/')[1]} {value:.3g}" for key, value in row.items()
            if value is not None), soft_wrap=True)
        result["minutes"] = (time.perf_counter() - start) / 60
        path.write_text(json.dumps({**result, "complete": False}, indent=1))

    trainer.train(on_phase_end)
    result["minutes"] = (time.perf_counter() - start) / 60
    result["after"] = held_out_samples(trainer)
    result["complete"] = True
    path.write_text(json.dumps(result, indent=1))
    return result


def report(out: Path, console: Console):
    table = Table("run", "held-out reward first -> last", "KL per answer", "length",
                  "truncated", "log-prob gap", "minutes", title="Answers that end (SmolLM2 chat)")
    for path in sorted(out.glob("answers-*.json")):
        result = json.loads(path.read_text())
        rows = result["phases"]
        name = result["run"] if result.get("complete", True) else f"{result['run']} (partial)"
        held = [r["eval/held_out_reward"] for r in rows if r["eval/held_out_reward"] is not None]
        table.add_row(name, f"{held[0]:+.3f} -> {held[-1]:+.3f}",
                      f"{rows[-1]['charts/kl_per_answer']:.2f}",
                      f"{rows[0]['charts/response_length']:.1f} -> "
                      f"{rows[-1]['charts/response_length']:.1f}",
                      f"{rows[0]['charts/frac_truncated']:.2f} -> "
                      f"{rows[-1]['charts/frac_truncated']:.2f}",
                      f"{max(r['charts/logprob_gap_max'] for r in rows):.1e}",
                      f"{result['minutes']:.1f}")
    console.print(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="gae-pos,grpo-pos,gae-neg,grpo-neg")
    parser.add_argument("--phases", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--truncation", default="keep", choices=["keep", "mask", "penalty"],
                        help="RLHFArgs.truncation (the preset keeps truncated answers)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--report-only", action="store_true")
    ns = parser.parse_args()
    console = Console()
    console.print(describe_cpu())
    torch.set_num_threads(ns.threads)
    ns.out.mkdir(parents=True, exist_ok=True)
    for name in [] if ns.report_only else ns.runs.split(","):
        suffix = "" if ns.truncation == "keep" else f"-{ns.truncation}"
        run(name, ns.phases, ns.seed, ns.truncation, console,
            ns.out / f"answers-{name}{suffix}.json")
    report(ns.out, console)


if __name__ == "__main__":
    main()
