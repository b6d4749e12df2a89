"""`minirlhf dpo`: train a policy with DPO on a preference file, into a guarded run folder.

The command-line layer over `dpo_training` (cli.py registers the subcommand). The folder holds:

    run.json        the DPO config under "dpo", and, under "args" and "reward", what
                    `minirlhf sample --run FOLDER` reads (base model, prompt, length, judge)
    metrics.jsonl   one line of metrics per step
    dpo.png         preference accuracy and held-out implicit rewards against step
    checkpoint.pt   the trained policy, in the layout `minirlhf sample` loads (see `save_policy`)
    run.lock        held while the command writes the folder

A DPO run cannot be resumed yet: `--force` starts it again.
"""

import argparse
import collections
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformer_lens import HookedTransformer

from minirlhf import loading
from minirlhf.args import RLHFArgs
from minirlhf.checkpoint import save_checkpoint
from minirlhf.device import pick_device
from minirlhf.dpo_training import DPOArgs, plot_dpo_metrics, train_dpo
from minirlhf.models import TransformerWithValueHead
from minirlhf.preferences import Preference
from minirlhf.report import append_metrics
from minirlhf.run_folder import args_and_pairs, claimed, write_json

PLOT_NAME = "dpo.png"


def add_dpo_parser(commands, add_args_flags):
    """The `dpo` subcommand: its own flags, then one per `DPOArgs` field."""
    dpo = commands.add_parser("dpo", help="train a policy with DPO on preference pairs")
    dpo.add_argument("--data", type=Path, required=True, help="preference JSONL file")
    dpo.add_argument("--out", type=Path, required=True, help="the run folder")
    dpo.add_argument("--force", action="store_true",
                     help="delete the files of a run already in --out and start again")
    dpo.add_argument("--judge", choices=["vader", "char_count"], default="vader",
                     help="what `minirlhf sample --run OUT` scores samples with")
    dpo.add_argument("--direction", choices=["pos", "neg"], default="pos",
                     help="VADER: the sentiment the judge prefers")
    dpo.add_argument("--char", default=".", help="char_count: the character counted")
    add_args_flags(dpo, DPOArgs, "DPOArgs")


def cmd_dpo(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    args, train, heldout = args_and_pairs(ns, parser, DPOArgs)
    console = Console()
    with claimed(ns.out, "dpo", ns.force, console):
        run_dpo(ns, args, train, heldout, console)


def make_run_config(ns: argparse.Namespace, args: DPOArgs, policy: HookedTransformer,
                    pairs: list[Preference]) -> dict:
    """run.json: "args" and "reward" as a PPO run has them, so `minirlhf sample` reads them
    (prefix: the commonest prompt; gen_len: the longest response in tokens), and "dpo"."""
    prefix = collections.Counter(p.prompt for p in pairs).most_common(1)[0][0]
    gen_len = max(len(policy.tokenizer(text, add_special_tokens=False)["input_ids"])
                  for p in pairs for text in (p.chosen, p.rejected))
    sample_args = RLHFArgs(base_model=args.base_model, prefix=prefix, gen_len=gen_len,
                           prepend_bos=args.prepend_bos, device=args.device)
    reward = {"kind": ns.judge, "direction": ns.direction, "char": ns.char}
    return {"preset": "dpo", "args": sample_args.to_dict(), "reward": reward,
            "dpo": {"args": args.to_dict(), "data": str(ns.data)}}


def save_policy(policy: HookedTransformer, out: Path, steps: int) -> Path:
    """The policy as a checkpoint `minirlhf sample` loads: a `TransformerWithValueHead` state.

    DPO trains no value head; the one saved is freshly initialised and unused by sampling. There
    is no optimiser state, so the checkpoint cannot resume a run.
    """
    model = TransformerWithValueHead(policy)
    return save_checkpoint({"model": model.state_dict(), "phase": steps, "global_step": steps},
                           out, {"algorithm": "dpo"})


def run_dpo(ns: argparse.Namespace, args: DPOArgs, train: list[Preference],
            heldout: list[Preference], console: Console):
    policy = loading.load_policy(args.base_model, pick_device(args.device))
    write_json(ns.out / "run.json", make_run_config(ns, args, policy, train + heldout))
    (ns.out / "metrics.jsonl").write_text("")
    console.print(f"[bold]minirlhf dpo[/]: {len(train)} train / {len(heldout)} held-out pairs "
                  f"from {ns.data} -> {ns.out}", soft_wrap=True)
    history = train_dpo(policy, train, heldout, args, console,
                        on_step=lambda m: append_metrics(ns.out / "metrics.jsonl", m))
    checkpoint = save_policy(policy, ns.out, len(history))
    plot = plot_dpo_metrics(history, ns.out / PLOT_NAME)
    summary = Table("held-out", "value", title="DPO")
    for key, value in history[-1].items():
        if key.startswith("heldout/"):
            summary.add_row(key, f"{value:+.4f}")
    console.print(summary)
    console.print(f"Plot:       {plot}\nCheckpoint: {checkpoint}\n"
                  f"Samples:    minirlhf sample --run {ns.out} --compare", soft_wrap=True)
