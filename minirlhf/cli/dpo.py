"""`minirlhf dpo`: train a policy with DPO on a preference file, into a guarded run folder.

The command-line layer over `pairs.dpo_training`. The folder holds:

    run.json        the DPO config under "dpo", and, under "args" and "reward", what
                    `minirlhf sample --run FOLDER` reads (base model, prompt, length, judge)
    metrics.jsonl   one line of metrics per step
    dpo.png         preference accuracy and held-out implicit rewards against step
    checkpoint.pt   the policy, AdamW's state and the metrics, every --checkpoint-every steps and
                    after the last (`dpo_training.get_dpo_state`); `--resume` continues from it
    run.lock        held while the command writes the folder
"""

import argparse
import collections
import dataclasses
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformer_lens import HookedTransformer

from minirlhf.args import RLHFArgs
from minirlhf.cli.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from minirlhf.cli.flags import add_args_flags
from minirlhf.cli.keeper import stop_between_steps
from minirlhf.cli.provenance import add_accept_flag, check_inputs, get_inputs
from minirlhf.cli.report import append_metrics, plot_dpo_metrics, write_metrics
from minirlhf.cli.run_folder import (
    RunFolderError,
    args_and_pairs,
    claimed,
    locked,
    read_run_json,
    write_json,
)
from minirlhf.pairs.dpo_training import DPOArgs, train_dpo
from minirlhf.pairs.preferences import Preference, read_preferences, split_preferences
from minirlhf.runtime import loading
from minirlhf.runtime.device import pick_device
from minirlhf.runtime.hashing import sha256_of

PLOT_NAME = "dpo.png"


def add_dpo_parser(commands):
    """The `dpo` subcommand: its own flags, then one per `DPOArgs` field."""
    dpo = commands.add_parser("dpo", help="train a policy with DPO on preference pairs")
    dpo.add_argument("--data", type=Path,
                     help="preference JSONL file (a resumed run reads the one it started with)")
    dpo.add_argument("--out", type=Path, required=True, help="the run folder")
    dpo.add_argument("--force", action="store_true",
                     help="delete the files of a run already in --out and start again")
    dpo.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint")
    dpo.add_argument("--checkpoint-every", type=int, default=20,
                     help="steps between saves (the last step is always saved)")
    dpo.add_argument("--judge", choices=["vader", "char_count"], default="vader",
                     help="what `minirlhf sample --run OUT` scores samples with")
    dpo.add_argument("--direction", choices=["pos", "neg"], default="pos",
                     help="VADER: the sentiment the judge prefers")
    dpo.add_argument("--char", default=".", help="char_count: the character counted")
    add_accept_flag(dpo)
    add_args_flags(dpo, DPOArgs, "DPOArgs")


def cmd_dpo(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    if ns.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be at least 1, got {ns.checkpoint_every}.")
    if ns.resume:
        resume_dpo(ns, parser)
        return
    if ns.data is None:
        parser.error("--data is needed to start a DPO run (a resumed one reads its own).")
    args, train, held_out = args_and_pairs(ns, parser, DPOArgs)
    console = Console()
    with claimed(ns.out, "dpo", ns.force, console):
        policy = loading.load_policy(args.base_model, pick_device(args.device))
        write_json(ns.out / "run.json", make_run_config(ns, args, policy, train + held_out))
        write_metrics(ns.out / "metrics.jsonl", [])
        console.print(f"[bold]minirlhf dpo[/]: {len(train)} train / {len(held_out)} held-out "
                      f"pairs from {ns.data} -> {ns.out}", soft_wrap=True)
        run = read_run_json(ns.out / "run.json")
        run_dpo(ns, policy, run, (train, held_out), None, console)


def resume_dpo(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    """Continue the DPO run in --out with its saved configuration, from its last checkpoint
    (none yet: from step 0)."""
    if ns.force:
        parser.error("--force starts a new run and --resume continues one: give one of them.")
    run_file = ns.out / "run.json"
    run = read_run_json(run_file) if run_file.is_file() else {}
    if "dpo" not in run:
        parser.error("--resume needs --out pointing at the folder of an earlier `minirlhf dpo`.")
    given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(DPOArgs)
             if f.name in vars(ns)] + (["--data"] if ns.data is not None else [])
    if given:
        parser.error(f"--resume continues a DPO run with its saved configuration: drop "
                     f"{', '.join(given)}, or start a new run with another --out.")
    args, data = DPOArgs(**run["dpo"]["args"]), Path(run["dpo"]["data"])
    if run["dpo"]["data_sha256"] != sha256_of(data):
        raise RunFolderError(f"{data} has changed since the run started: its pairs, and the "
                             "held-out split, would not be the ones it trained on.")
    pairs = split_preferences(read_preferences(data), args.held_out_fraction, seed=args.seed)
    console, device = Console(), pick_device(args.device)
    check_inputs(run, ns.accept_changed_inputs, console)
    with locked(ns.out, "dpo") as stale:
        if stale:
            console.print(f"[yellow]{stale}", soft_wrap=True)
        saved = load_dpo_checkpoint(ns.out, device, console, run)
        history = saved["history"] if saved else []
        # Steps after the checkpoint are run again, so their old metric lines go.
        write_metrics(ns.out / "metrics.jsonl", history)
        console.print(f"[bold]minirlhf dpo --resume[/]: {ns.out} at step {len(history)}",
                      soft_wrap=True)
        run_dpo(ns, loading.load_policy(args.base_model, device), run, pairs, saved, console)


def load_dpo_checkpoint(out: Path, device, console: Console, run: dict) -> dict | None:
    """The DPO state saved in `out` (None: no checkpoint yet), once run.json is known to hold
    the configuration the checkpoint was trained with."""
    if not has_checkpoint(out):
        console.print("[yellow]No checkpoint yet: the run starts again from step 0.")
        return None
    checkpoint = load_checkpoint(out, map_location=device, set_aside_damaged=True)
    if checkpoint.note:
        console.print(f"[yellow]{checkpoint.note}", soft_wrap=True)
    check_dpo_run_json(run, checkpoint.extra)
    return checkpoint.trainer


def check_dpo_run_json(run: dict, extra: dict):
    """Refuse a run.json edited by hand since the checkpoint: its "dpo" (or "sft"), "args" and
    "reward" must be those the checkpoint saved (checkpoints before this check saved none)."""
    edited = [f"{key}: {extra[key]} in the checkpoint, {run.get(key)} in run.json"
              for key in ("dpo", "sft", "args", "reward")
              if key in extra and extra[key] != run.get(key)]
    if edited:
        raise RunFolderError(f"run.json was edited since the last checkpoint ({'; '.join(edited)})"
                             ". Put it back, or start a new run with another --out.")


def make_run_config(ns: argparse.Namespace, args: DPOArgs, policy: HookedTransformer,
                    pairs: list[Preference]) -> dict:
    """run.json: "args" and "reward" as a PPO run has them, so `minirlhf sample` and `export`
    read them (prefix: the commonest prompt; gen_len: the longest response in tokens; what
    trained, to rebuild the adapters), and "dpo"."""
    prefix = collections.Counter(p.prompt for p in pairs).most_common(1)[0][0]
    gen_len = max(len(policy.tokenizer(text, add_special_tokens=False)["input_ids"])
                  for p in pairs for text in (p.chosen, p.rejected))
    sample_args = RLHFArgs(base_model=args.base_model, prefix=prefix, gen_len=gen_len,
                           prepend_bos=args.prepend_bos, device=args.device,
                           trainable_layers=args.trainable_layers, lora_rank=args.lora_rank,
                           lora_alpha=args.lora_alpha, lora_targets=args.lora_targets)
    reward = {"kind": ns.judge, "direction": ns.direction, "char": ns.char}
    run = {"preset": "dpo", "args": sample_args.to_dict(), "reward": reward,
           "dpo": {"args": args.to_dict(), "data": str(ns.data.resolve()),
                   "data_sha256": sha256_of(ns.data)}}
    return run | {"inputs": get_inputs(run)}


def run_dpo(ns: argparse.Namespace, policy: HookedTransformer, run: dict,
            pairs: tuple[list[Preference], list[Preference]], saved: dict | None,
            console: Console):
    """Train (from `saved` when resuming), saving checkpoints into --out, then plot and sum up.
    SIGTERM or Ctrl-C saves the step in progress and stops (`keeper.stop_between_steps`).
    Each checkpoint keeps run.json's configuration, which a resume compares."""
    saved_steps = [len(saved["history"])] if saved else []
    args = DPOArgs(**run["dpo"]["args"])
    config = {key: run[key] for key in ("dpo", "args", "reward")}

    def save(state: dict):
        save_checkpoint(state, ns.out, {"algorithm": "dpo", **config})
        saved_steps.append(state["phase"])

    with reporting_stops(ns.out, saved_steps, console), stop_between_steps() as stop:
        history = train_dpo(policy, *pairs, args, console,
                            on_step=lambda m: append_metrics(ns.out / "metrics.jsonl", m),
                            saved=saved, save_every=ns.checkpoint_every, save=save, stop=stop)
    if saved is not None and len(history) == len(saved["history"]):
        console.print(f"Nothing to do: the run already did its {len(history)} steps.")
    plot = plot_dpo_metrics(history, ns.out / PLOT_NAME)
    summary = Table("held-out", "value", title="DPO")
    for key, value in history[-1].items():
        if key.startswith("held_out/"):
            summary.add_row(key, f"{value:+.4f}")
    console.print(summary)
    console.print(f"Plot:       {plot}\nCheckpoint: {ns.out / 'checkpoint.pt'}\n"
                  f"Samples:    minirlhf sample --run {ns.out} --compare", soft_wrap=True)


@contextmanager
def reporting_stops(out: Path, saved_steps: list[int], console: Console,
                    command: str = "dpo"):
    """Say in one line what a stop kept and how to continue (`minirlhf {command} --resume`);
    Ctrl-C mid-step (a second signal) exits with code 130 instead of a traceback."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as error:
        step = saved_steps[-1] if saved_steps else None
        resume = f"Continue with: minirlhf {command} --out {out} --resume"
        if isinstance(error, SystemExit):  # train_dpo saved the step, then stopped
            console.print(f"[yellow]Stopped: saved step {step} to {out / 'checkpoint.pt'}. "
                          f"{resume}", soft_wrap=True)
            raise
        kept = f"the checkpoint of step {step} stands" if step else "no checkpoint was saved"
        console.print(f"[red]Stopped mid-step: {kept}. {resume}", soft_wrap=True)
        raise SystemExit(130) from None
