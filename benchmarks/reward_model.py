"""Benchmark: the whole RLHF pipeline offline on this CPU: preferences -> reward model -> PPO.

1. RLAIF preferences: pairs of SmolLM2-135M continuations of "This movie was", judged by VADER
   (pairs whose VADER scores differ by `--min-gap` or less are dropped as ties).
2. A reward model initialised from the same SmolLM2, trained on the pairwise loss; held-out
   accuracy is measured on pairs it never saw; then normalised on initial-policy samples.
3. PPO (the `smollm2-vader` preset's hyperparameters) against the learned reward model. VADER,
   the judge it never saw directly, scores the policy's samples at every phase.

Reports per phase: pair counts and time; held-out accuracy; VADER mean of the policy's samples
per PPO phase, and of 64 fresh samples before and after PPO (same seed). Writes
`<out>/reward_model.json` and `<out>/reward_model.png`; the preference file and the reward model
go to `--work` (reused with `--reuse`, to re-run a later phase alone).

    python benchmarks/reward_model.py --threads 1          # the whole pipeline, ~35 min
    python benchmarks/reward_model.py --report-only        # table + plot of the saved result

Targets (issue 6): held-out accuracy >= 0.85; VADER mean of the policy's samples from about
0.13 to >= 0.6.
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
from minirlhf.pairs.preferences import (
    make_preferences,
    read_preferences,
    split_preferences,
    write_preferences,
)
from minirlhf.pairs.reward_model import (
    load_reward_model,
    make_reward_model_reward_fn,
    save_reward_model,
)
from minirlhf.pairs.reward_training import RewardModelArgs, fit_reward_model
from minirlhf.runtime.loading import load_policy
from minirlhf.sampling import get_samples
from minirlhf.sentiment import make_vader_reward, vader_compound
from minirlhf.trainer import RLHFTrainer, Rollout

TARGETS = {"heldout_accuracy": 0.85, "vader_after": 0.6}


def phase_preferences(ns, policy, console: Console) -> dict:
    path, figures = ns.work / "preferences.jsonl", ns.work / "preferences.json"
    if ns.reuse and path.is_file():  # the figures of the run that made the file
        return json.loads(figures.read_text())
    start = time.perf_counter()
    preferences = make_preferences(policy, make_vader_reward("pos"), [ns.prompt],
                                   num_pairs=ns.pairs, gen_len=ns.gen_len, batch_size=64,
                                   min_gap=ns.min_gap, seed=ns.seed)
    write_preferences(preferences, path)
    gaps = [p.chosen_score - p.rejected_score for p in preferences]
    result = {"pairs": len(preferences), "min_gap": ns.min_gap, "path": str(path),
              "mean_vader_gap": sum(gaps) / len(gaps), "time_s": time.perf_counter() - start}
    figures.write_text(json.dumps(result, indent=1))
    console.print(f"preferences: {len(preferences)} pairs -> {path} "
                  f"({result['time_s']:.0f} s)", soft_wrap=True)
    return result


def phase_reward_model(ns, policy, console: Console) -> tuple:
    args = RewardModelArgs(
        seed=ns.seed, base_model="smollm2", trainable_layers=ns.rm_layers, epochs=ns.rm_epochs,
        batch_size=16, lr=ns.rm_lr, head_lr=ns.rm_head_lr, eval_every=ns.rm_eval_every,
        normalize_samples=64, normalize_prompt=ns.prompt, normalize_gen_len=ns.gen_len,
    )
    start = time.perf_counter()
    folder = ns.work / "reward_model"
    if ns.reuse and (folder / "reward_model.pt").is_file():
        reward_model, info = load_reward_model(folder)
        return reward_model, info["benchmark"]
    train, heldout = split_preferences(read_preferences(ns.work / "preferences.jsonl"),
                                       args.heldout_fraction, seed=args.seed)

    def on_step(metrics: dict):
        if "heldout/accuracy" in metrics:
            console.print(f"reward model step {metrics['charts/step']:3d}: train loss "
                          f"{metrics['train/loss']:.3f}  held-out accuracy "
                          f"{metrics['heldout/accuracy']:.3f}  loss {metrics['heldout/loss']:.3f}"
                          f"  ({time.perf_counter() - start:.0f} s)", soft_wrap=True)

    trained = fit_reward_model(train, heldout, args, policy=policy, console=console,
                               on_step=on_step)
    evals = [m for m in trained.history if "heldout/accuracy" in m]
    result = {
        "args": args.to_dict(), "train_pairs": len(train), "heldout_pairs": len(heldout),
        "steps": [m["charts/step"] for m in evals],
        "heldout_accuracy": [m["heldout/accuracy"] for m in evals],
        "heldout_loss": [m["heldout/loss"] for m in evals],
        "final_heldout_accuracy": trained.final_heldout["heldout/accuracy"],
        "final_heldout_margin": trained.final_heldout["heldout/margin"],
        "normalization": trained.normalization, "time_s": time.perf_counter() - start,
    }
    reward_model = trained.reward_model
    save_reward_model(reward_model, folder, {"base_model": "smollm2", "benchmark": result})
    console.print(f"reward model: held-out accuracy {result['final_heldout_accuracy']:.3f} on "
                  f"{len(heldout)} pairs ({result['time_s']:.0f} s)", soft_wrap=True)
    return reward_model, result


def sample_and_score(model, reward_fn, ns) -> dict:
    """64 fresh samples (seed 1234): VADER and reward-model scores."""
    samples = get_samples(model, ns.prompt, batch_size=64, gen_len=ns.gen_len, seed=1234).texts
    vader = vader_compound(samples)
    return {"vader_mean": vader.mean().item(), "rm_mean": reward_fn(samples).mean().item(),
            "samples": [[s, v] for s, v in zip(samples[:6], vader.tolist())]}


def phase_ppo(ns, policy, reward_model, console: Console) -> dict:
    args = RLHFArgs(**{**PRESETS["smollm2-vader"]["args"], "total_phases": ns.phases,
                       "prefix": ns.prompt, "gen_len": ns.gen_len, "seed": ns.seed})
    reward_fn = make_reward_model_reward_fn(reward_model)
    before = sample_and_score(policy, reward_fn, ns)
    trainer = RLHFTrainer(args, reward_fn, base_model=policy, console=console, table_every=0)
    vader_per_phase: list[float] = []
    start = time.perf_counter()

    def on_phase_end(trainer: RLHFTrainer, rollout: Rollout):
        metrics = rollout.metrics
        vader_per_phase.append(vader_compound(rollout.texts).mean().item())
        console.print(f"PPO phase {metrics['charts/phase']:2d}: reward-model reward "
                      f"{metrics['charts/reward_mean']:+.3f}  VADER {vader_per_phase[-1]:+.3f}  "
                      f"kl {metrics['charts/kl']:.3f}  {metrics['charts/phase_time']:.0f} s",
                      soft_wrap=True)

    history = trainer.train(on_phase_end=on_phase_end)
    wall = time.perf_counter() - start
    after = sample_and_score(trainer.model.base_model, reward_fn, ns)
    return {
        "args": args.to_dict(), "time_s": wall, "vader_per_phase": vader_per_phase,
        "rm_reward_per_phase": [m["charts/reward_mean"] for m in history],
        "kl_per_phase": [m["charts/kl"] for m in history],
        "phase_time_s": [m["charts/phase_time"] for m in history],
        "before": before, "after": after,
    }


def plot(result: dict, path: Path):
    rm, ppo = result["reward_model"], result["ppo"]
    with two_panel_figure(path, figsize=(11, 4)) as (ax_rm, ax_ppo):
        ax_rm.plot(rm["steps"], rm["heldout_accuracy"], marker="o")
        ax_rm.axhline(TARGETS["heldout_accuracy"], color="grey", ls="--", lw=0.8)
        ax_rm.set(xlabel="step", ylabel="held-out accuracy", ylim=(0.4, 1.0),
                  title=f"Reward model ({rm['train_pairs']} train / {rm['heldout_pairs']} "
                  "held-out)")
        ax_ppo.plot(ppo["vader_per_phase"], marker="o",
                    label="VADER (the judge, never seen by PPO)")
        ax_ppo.axhline(TARGETS["vader_after"], color="grey", ls="--", lw=0.8)
        ax_ppo.set(xlabel="PPO phase", ylabel="mean VADER compound", ylim=(-0.2, 1.0),
                   title="PPO against the learned reward model")
        ax_learned = ax_ppo.twinx()
        ax_learned.plot(ppo["rm_reward_per_phase"], marker="o", color="tab:orange",
                        label="learned reward (normalised)")
        ax_learned.set(ylabel="learned reward")
        ax_ppo.legend(handles=ax_ppo.get_lines()[:1] + ax_learned.get_lines(),
                      loc="lower right")


def report(result: dict, console: Console):
    prefs, rm, ppo = result["preferences"], result["reward_model"], result["ppo"]
    table = Table("phase", "figure", "value", "time", title="Preferences -> reward model -> PPO")
    table.add_row("1 preferences", f"pairs (VADER gap > {prefs['min_gap']})",
                  str(prefs["pairs"]), f"{prefs['time_s'] / 60:.1f} min")
    table.add_row("2 reward model", f"held-out accuracy ({rm['heldout_pairs']} pairs)",
                  f"{rm['final_heldout_accuracy']:.3f}", f"{rm['time_s'] / 60:.1f} min")
    table.add_row("3 PPO", "VADER, first -> last phase",
                  f"{ppo['vader_per_phase'][0]:+.3f} -> {ppo['vader_per_phase'][-1]:+.3f}",
                  f"{ppo['time_s'] / 60:.1f} min")
    table.add_row("", "VADER of 64 fresh samples, before -> after",
                  f"{ppo['before']['vader_mean']:+.3f} -> {ppo['after']['vader_mean']:+.3f}", "")
    table.add_row("", "learned reward, before -> after",
                  f"{ppo['before']['rm_mean']:+.3f} -> {ppo['after']['rm_mean']:+.3f}", "")
    table.add_row("", "KL to the reference at the end", f"{ppo['kl_per_phase'][-1]:.3f}", "")
    phases = prefs["time_s"] + rm["time_s"] + ppo["time_s"]
    table.add_row("all", "the three phases (without model loading)", "", f"{phases / 60:.1f} min")
    console.print(table)
    samples = Table("before PPO (VADER)", "after PPO (VADER)", show_lines=True)
    for (b, vb), (a, va) in zip(ppo["before"]["samples"][:4], ppo["after"]["samples"][:4]):
        samples.add_row(Text(f"[{vb:+.2f}] {b}"), Text(f"[{va:+.2f}] {a}"))
    console.print(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="This movie was")
    parser.add_argument("--gen-len", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=1200, help="preference pairs to collect")
    parser.add_argument("--min-gap", type=float, default=0.3, help="VADER gap below = a tie")
    parser.add_argument("--rm-layers", type=int, default=10,
                        help="train only the top N blocks of the reward model")
    parser.add_argument("--rm-epochs", type=int, default=4)
    parser.add_argument("--rm-lr", type=float, default=1e-4)
    parser.add_argument("--rm-head-lr", type=float, default=1e-2)
    parser.add_argument("--rm-eval-every", type=int, default=30, help="steps between evals")
    parser.add_argument("--phases", type=int, default=20, help="PPO phases")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=Path("runs/benchmark-reward-model"))
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the preferences and reward model already in --work")
    parser.add_argument("--stop-after", choices=["preferences", "reward_model"],
                        help="stop after this phase (to tune one phase at a time)")
    parser.add_argument("--report-only", action="store_true", help="train nothing")
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    ns.work.mkdir(parents=True, exist_ok=True)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    console = Console()
    result_path = ns.out / "reward_model.json"
    if not ns.report_only:
        console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        start = time.perf_counter()
        policy = load_policy("smollm2")
        result = {"preferences": phase_preferences(ns, policy, console)}
        if ns.stop_after != "preferences":
            reward_model, result["reward_model"] = phase_reward_model(ns, policy, console)
            if ns.stop_after != "reward_model":
                result["ppo"] = phase_ppo(ns, policy, reward_model, console)
        result |= {"wall_time_s": time.perf_counter() - start,
                   "torch_threads": torch.get_num_threads(), "command": vars(ns) | {
                       "out": str(ns.out), "work": str(ns.work)}}
        if "ppo" not in result:
            return
        result_path.write_text(json.dumps(result, indent=1))
    result = json.loads(result_path.read_text())
    plot(result, ns.out / "reward_model.png")
    report(result, console)
    console.print(f"Figures: {result_path}  Plot: {ns.out / 'reward_model.png'}", soft_wrap=True)


if __name__ == "__main__":
    main()
