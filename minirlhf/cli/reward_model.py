"""`minirlhf reward-model`: a reward model trained on preference pairs, saved with its held-out
accuracy and its normalisation on the initial policy."""

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from minirlhf.cli.flags import add_args_flags
from minirlhf.cli.report import append_metrics, plot_reward_model_metrics, write_metrics
from minirlhf.cli.run_folder import args_and_pairs, claimed
from minirlhf.pairs.reward_training import RewardModelArgs
from minirlhf.runtime.device import pick_device


def add_reward_model_parser(commands):
    rm = commands.add_parser("reward-model", help="train a reward model on preference pairs")
    rm.add_argument("--data", type=Path, required=True, help="preference JSONL file")
    rm.add_argument("--out", type=Path, required=True, help="folder for the reward model")
    rm.add_argument("--force", action="store_true",
                    help="delete the files of a run already in --out and start again")
    add_args_flags(rm, RewardModelArgs, "RewardModelArgs")


def cmd_reward_model(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    args, train, held_out = args_and_pairs(ns, parser, RewardModelArgs)
    console = Console()
    with claimed(ns.out, "reward-model", ns.force, console):
        train_and_save_reward_model(ns, args, train, held_out, console)


def train_and_save_reward_model(ns: argparse.Namespace, args: RewardModelArgs, train: list,
                                held_out: list, console: Console):
    from minirlhf.pairs.reward_model import save_reward_model
    from minirlhf.pairs.reward_training import fit_reward_model
    from minirlhf.runtime.hashing import sha256_of

    write_metrics(ns.out / "metrics.jsonl", [])
    console.print(f"[bold]minirlhf reward-model[/]: {len(train)} train / {len(held_out)} "
                  f"held-out pairs from {ns.data} -> {ns.out}", soft_wrap=True)
    trained = fit_reward_model(train, held_out, args, pick_device(args.device),
                               console=console,
                               on_step=lambda m: append_metrics(ns.out / "metrics.jsonl", m))
    info = {"base_model": args.base_model, "args": args.to_dict(), "data": str(ns.data),
            "data_sha256": sha256_of(ns.data),
            "held_out": trained.final_held_out, "normalization": trained.normalization}
    save_reward_model(trained.reward_model, ns.out, info)  # and reward_model.json, its record
    plot = plot_reward_model_metrics(trained.history, ns.out / "accuracy.png")
    summary = Table("held-out", "value", title="Reward model")
    for key, value in {**trained.final_held_out, **trained.normalization}.items():
        summary.add_row(key, f"{value:+.4f}")
    console.print(summary)
    console.print(f"Plot:  {plot}\nModel: {ns.out / 'reward_model.pt'}\n"
                  f"PPO against it: minirlhf train --reward-model {ns.out}", soft_wrap=True)
