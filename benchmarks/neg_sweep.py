"""Benchmark: which settings of the offline preset carry to new prompts in the negative direction.

Issue 25's goal: the main job (`minirlhf train`, preset `smollm2-vader`) with `--direction neg`
should reach a held-out mean VADER of -0.8 or below on the review prompts within 25 phases, with
a share of repeated 3-grams at most 10 points above the base model's (and the same for "pos",
target +0.9). Each *setting* below is the preset, trained on the training split of the review
prompts, with a few fields changed; after `--phases` phases it is judged like every frontier
point (benchmarks/frontier.py's `measure`: `evaluate_policy`, 4 answers to each held-out prompt,
seed 0), and the base model once beside them.

The settings sweep what exists: the KL coefficient, the learning rate, the entropy bonus, the
sampling temperature, a critic-free estimator, and `rep*`: the reward minus `repeat_penalty`
times the answer's share of repeated 3-grams (`minirlhf.shaping.penalize_repetition`, a reward
spec's "repeat_penalty"; the preset's `--direction neg` adopted `lr2e-3-kl0.01-rep2`). Of the
settings measured on 2026-12-07, the negative rep1, lr2e-3-rep1, lr3e-3-rep1 and
lr2e-3-kl0.01-rep1 ran with this script's earlier version of it, which counted repeats in the
prompt + answer instead of the answer alone (the review openings repeat no 3-gram, so the two
agree except for a 3-gram that spans the seam); lr2e-3-kl0.01-rep2 and the positive rep1 ran
with the library's.

    python benchmarks/neg_sweep.py                          # every setting, neg, 25 phases
    python benchmarks/neg_sweep.py --settings preset,kl0.2 --direction pos
    python benchmarks/neg_sweep.py --report-only
    python benchmarks/neg_sweep.py --smoke                  # tiny model, 1 phase, 4 prompts

One file per setting, `<out>/sweep-<direction>-<setting>-p<phases>.json` (`-s<N>` added with
`--train-seed N`: the training seeded by N, the held-out split still --seed's), skipped when
it exists; the table goes to `<out>/sweep-<direction>.md`.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))  # frontier.py sits beside us
import frontier  # noqa: E402

from minirlhf.args import RLHFArgs  # noqa: E402
from minirlhf.cli.presets import PRESETS  # noqa: E402
from minirlhf.prompts import load_prompt_split  # noqa: E402
from minirlhf.runtime.device import describe_cpu  # noqa: E402
from minirlhf.runtime.loading import load_policy  # noqa: E402
from minirlhf.sentiment import make_vader_reward  # noqa: E402
from minirlhf.shaping import penalize_repetition  # noqa: E402
from minirlhf.trainer import RLHFTrainer  # noqa: E402

SETTINGS: dict[str, dict] = {
    "preset": {},
    "kl0.01": {"kl_coef": 0.01},
    "kl0.2": {"kl_coef": 0.2},
    "lr2e-3": {"base_lr": 2e-3},
    "lr2e-3-kl0.2": {"base_lr": 2e-3, "kl_coef": 0.2},
    "ent0.01": {"ent_coef": 0.01},
    "temp0.7": {"temperature": 0.7},
    "grpo-g4": {"advantage_estimator": "grpo", "group_size": 4},
    "rep1": {"repeat_penalty": 1.0},
    "lr2e-3-rep1": {"base_lr": 2e-3, "repeat_penalty": 1.0},
    "lr3e-3-rep1": {"base_lr": 3e-3, "repeat_penalty": 1.0},
    "lr2e-3-kl0.01-rep1": {"base_lr": 2e-3, "kl_coef": 0.01, "repeat_penalty": 1.0},
    "lr2e-3-rep2": {"base_lr": 2e-3, "repeat_penalty": 2.0},
    "lr2e-3-kl0.01-rep2": {"base_lr": 2e-3, "kl_coef": 0.01, "repeat_penalty": 2.0},
    "kl0.01-rep2": {"kl_coef": 0.01, "repeat_penalty": 2.0},
}
"""Fields changed from the preset (all but `repeat_penalty` are RLHFArgs fields)."""
TARGETS = {"pos": 0.9, "neg": -0.8}
REPEAT_SLACK = 0.10


def judge_setting(vader: float, repeat: float, base_repeat: float, direction: str,
                  slack: float = REPEAT_SLACK) -> tuple[bool, bool]:
    """(target reached, fluent): held-out mean VADER at or past the direction's target, and a
    repeated-3-gram share at most `slack` above the base model's."""
    target = TARGETS[direction]
    reached = vader >= target if direction == "pos" else vader <= target
    return reached, repeat <= base_repeat + slack


def get_args(ns, setting: dict) -> RLHFArgs:
    """The preset on the review prompts, --smoke's scale, --set's, then the setting."""
    fields = {k: v for k, v in setting.items() if k != "repeat_penalty"}
    return RLHFArgs(**{**PRESETS["smollm2-vader"]["args"], "prompts": "reviews",
                       **(frontier.SMOKE_ARGS if ns.smoke else {}), **ns.overrides, **fields,
                       "total_phases": ns.phases, "eval_every": ns.phases,
                       "seed": ns.seed if ns.train_seed is None else ns.train_seed})


def run_setting(ns, name: str, console: Console) -> dict:
    """Train the preset with one setting and judge it on the held-out prompts."""
    setting = SETTINGS[name]
    args = get_args(ns, setting)
    reward_fn = make_vader_reward(ns.direction)
    if setting.get("repeat_penalty"):
        reward_fn = penalize_repetition(reward_fn, setting["repeat_penalty"])
    split = load_prompt_split(args.prompts, args.held_out_fraction, ns.seed)  # --seed's split
    trainer = RLHFTrainer(args, reward_fn, base_model=load_policy(args.base_model),
                          console=console, table_every=0, prompt_split=split)
    start = time.perf_counter()
    history = trainer.train()
    train_seconds = time.perf_counter() - start
    policy = trainer.model.base_model
    reference = policy if args.lora_rank else load_policy(args.base_model)
    measured = frontier.measure(policy, reference, frontier.get_held_out(ns, args),
                                ns.direction, frontier.get_eval_settings(ns, args))
    return {"setting": name, "changes": setting, "direction": ns.direction, "phases": ns.phases,
            "seed": ns.seed, "train_seed": args.seed,
            "train_seconds": train_seconds, **measured, "args": args.to_dict(),
            "reward_per_phase": [m["charts/reward_mean"] for m in history],
            "machine": ns.machine}


def run_base(ns) -> dict:
    args = get_args(ns, {})
    model = load_policy(args.base_model)
    return {"setting": "base", "direction": ns.direction, "train_seconds": 0.0,
            **frontier.measure(model, model, frontier.get_held_out(ns, args), ns.direction,
                               frontier.get_eval_settings(ns, args))}


def get_markdown(results: list[dict], base: dict, direction: str) -> str:
    """The sweep's table: held-out VADER, KL and fluency of each setting, and the verdicts."""
    base_repeat = base["metrics"]["repeated_3gram"]
    lines = [f"Base model: held-out VADER {base['vader_mean']:+.3f}, repeated 3-grams "
             f"{base_repeat:.3f}, distinct-2 {base['metrics']['distinct_2']:.2f}, reference "
             f"log-likelihood per token {base['metrics']['ref_logprob_per_token']:.2f}.", "",
             f"| setting | changes | phases | held-out VADER | KL / answer | repeated 3-grams | "
             f"distinct-2 | ref log-lik / token | reaches {TARGETS[direction]:+.1f} | fluent | "
             "train |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["metrics"]
        repeat = math.nan if m["repeated_3gram"] is None else m["repeated_3gram"]
        reached, fluent = judge_setting(r["vader_mean"], repeat, base_repeat, direction)
        changes = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "-"
        seed = r.get("train_seed", 1)  # files from before --train-seed: seed 1
        name = r["setting"] + (f" (seed {seed})" if seed != r.get("seed", 1) else "")
        lines.append(f"| {name} | {changes} | {r['phases']} | {r['vader_mean']:+.3f} | "
                     f"{m['kl_per_answer']:.2f} | {repeat:.3f} | {m['distinct_2']:.2f} | "
                     f"{m['ref_logprob_per_token']:.2f} | "
                     f"{'yes' if reached else 'no'} | {'yes' if fluent else 'no'} | "
                     f"{r['train_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def report(ns, console: Console):
    base_path = ns.out / f"sweep-base-{ns.direction}.json"
    if not base_path.exists():
        return
    base = json.loads(base_path.read_text())
    results = [json.loads(p.read_text())
               for p in sorted(ns.out.glob(f"sweep-{ns.direction}-*.json"))]
    markdown = get_markdown(results, base, ns.direction)
    (ns.out / f"sweep-{ns.direction}.md").write_text(markdown + "\n")
    console.print(markdown, soft_wrap=True, markup=False, highlight=False)
    for r in results:
        console.print(f"{r['setting']}:", soft_wrap=True)
        for answer in r["answers"][:: max(1, len(r["answers"]) // 3)][:3]:
            console.print(f"  [{answer['vader']:+.2f}] {answer['prompt']}{answer['response']}",
                          soft_wrap=True, markup=False, highlight=False)


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--direction", default="neg", choices=["pos", "neg"])
    parser.add_argument("--phases", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--train-seed", type=int, help="seed the training with this instead "
                        "of --seed, keeping --seed's held-out split (another draw of a setting)")
    parser.add_argument("--samples", type=int, default=4, help="answers per held-out prompt")
    parser.add_argument("--max-prompts", type=int, default=256, help="held-out prompts (35)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="default benchmarks/results/neg_sweep "
                        "(--smoke: runs/neg-sweep-smoke)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="RLHFArgs overrides for every setting (values as JSON)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 phase, 4 prompts")
    parser.add_argument("--report-only", action="store_true")
    ns = parser.parse_args()
    ns.settings = ns.settings.split(",")
    if unknown := [s for s in ns.settings if s not in SETTINGS]:
        parser.error(f"unknown settings {unknown}: choose from {list(SETTINGS)}")
    if ns.smoke:
        ns.phases, ns.max_prompts, ns.samples = 1, 4, 2
    ns.out = ns.out or frontier.REPO / ("runs/neg-sweep-smoke" if ns.smoke
                                        else "benchmarks/results/neg_sweep")
    ns.overrides = frontier.dpo_bench.parse_sets(ns.set)
    return ns


def main():
    ns = parse(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    torch.set_num_threads(ns.threads)
    console = Console()
    ns.machine = {**describe_cpu(), "torch": torch.__version__, "threads": ns.threads}
    console.print(f"CPU {ns.machine['cpu']}, {ns.machine['cores']} cores, fast bf16: "
                  f"{ns.machine['fast_bf16']}; {ns.threads} threads", soft_wrap=True)
    ns.out.mkdir(parents=True, exist_ok=True)
    base_path = ns.out / f"sweep-base-{ns.direction}.json"
    if not ns.report_only and not base_path.exists():
        frontier.save(run_base(ns), base_path)
    for name in [] if ns.report_only else ns.settings:
        seed = "" if ns.train_seed is None else f"-s{ns.train_seed}"
        path = ns.out / f"sweep-{ns.direction}-{name}-p{ns.phases}{seed}.json"
        if path.exists():
            console.print(f"{name}: measured already ({path}), skipped", soft_wrap=True)
            continue
        console.rule(name)
        frontier.save(run_setting(ns, name, console), path)
    report(ns, console)


if __name__ == "__main__":
    main()
