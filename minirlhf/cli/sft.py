"""`minirlhf sft`: supervised fine-tuning on demonstrations, into a guarded run folder.

The command-line layer over `minirlhf.sft`. The demonstrations come from a JSONL file
(`--data`) or from a task with checkable answers (`--task NAME`: its training demonstrations,
held out on its held-out split, with `SFT_TASK_ARGS`' defaults, rendered as `train --task`
renders them). The folder holds:

    run.json        the SFT config under "sft" (with the data file, or the task, and a hash of
                    its demonstrations), and, under "args", what `minirlhf sample --run
                    FOLDER` and `export` read (base model, a demonstration's prompt, length,
                    what trained)
    metrics.jsonl   one line of metrics per step
    sft.png         loss and token accuracy against step
    checkpoint.pt   what trained, AdamW's state and the metrics, every --checkpoint-every steps
                    and after the last (`SFTTrainer.state_dict`); `--resume` continues from it
    policy.pt       once the last step is done: the SFT policy, LoRA merged, which makes the
                    folder a base model (`--base-model FOLDER`: `runtime.policy_folder`)
    run.lock        held while the command writes the folder
"""

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformer_lens import HookedTransformer

from minirlhf.args import RLHFArgs
from minirlhf.cli.checkpoint import save_checkpoint
from minirlhf.cli.dpo import load_dpo_checkpoint, reporting_stops
from minirlhf.cli.flags import add_args_flags
from minirlhf.cli.keeper import stop_between_steps
from minirlhf.cli.presets import SFT_TASK_ARGS, SFT_TASK_DEMONSTRATIONS
from minirlhf.cli.provenance import add_accept_flag, check_inputs, get_inputs
from minirlhf.cli.report import append_metrics, plot_sft_metrics, write_metrics
from minirlhf.cli.run_folder import (
    RunFolderError,
    claimed,
    load_run_policy,
    locked,
    read_run_json,
    write_json,
)
from minirlhf.cli.safe_files import replacing
from minirlhf.demonstrations import (
    Demonstration,
    load_sft_records,
    split_demonstrations,
    to_demonstrations,
)
from minirlhf.prompts import render_prompt
from minirlhf.runtime import loading, policy_folder
from minirlhf.runtime.device import pick_device
from minirlhf.runtime.hashing import sha256_of
from minirlhf.sft import SFTArgs, SFTTrainer
from minirlhf.tasks import TASKS, get_task

PLOT_NAME = "sft.png"


def add_sft_parser(commands):
    """The `sft` subcommand: its own flags, then one per `SFTArgs` field."""
    sft = commands.add_parser("sft", help="supervised fine-tuning on prompt/response pairs")
    sft.add_argument("--data", type=Path, help='JSONL of {"prompt", "response"} or chat '
                     '{"messages"} records (a resumed run reads the one it started with)')
    sft.add_argument("--task", choices=list(TASKS),
                     help="learn a task's demonstrations (docs/tasks.md), held out on its "
                     "held-out split, rendered as `train --task` renders its prompts")
    sft.add_argument("--num-demonstrations", type=int,
                     help=f"with --task: learn the first N of its training demonstrations "
                     f"(default {SFT_TASK_DEMONSTRATIONS}, or all when it has fewer)")
    sft.add_argument("--out", type=Path, required=True, help="the run folder")
    sft.add_argument("--force", action="store_true",
                     help="delete the files of a run already in --out and start again")
    sft.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint")
    sft.add_argument("--checkpoint-every", type=int, default=20,
                     help="steps between saves (the last step is always saved)")
    add_accept_flag(sft)
    add_args_flags(sft, SFTArgs, "SFTArgs")


def cmd_sft(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    if ns.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be at least 1, got {ns.checkpoint_every}.")
    if ns.task is not None and ns.data is not None:
        parser.error("--task brings its own demonstrations: give --task or --data, not both.")
    if ns.num_demonstrations is not None and (ns.task is None or ns.num_demonstrations < 1):
        parser.error("--num-demonstrations N (N >= 1) goes with --task: it takes the first N of "
                     "the task's training demonstrations.")
    if ns.resume:
        resume_sft(ns, parser)
        return
    if ns.data is None and ns.task is None:
        parser.error("--data or --task is needed to start an SFT run (a resumed one reads its "
                     "own).")
    args, splits = args_and_demonstrations(ns, parser)
    console = Console()
    with claimed(ns.out, "sft", ns.force, console):
        try:
            policy = loading.load_policy(args.base_model, pick_device(args.device))
        except (ValueError, OSError) as error:
            parser.error(f"--base-model {args.base_model}: {error}")
        write_json(ns.out / "run.json", make_run_config(ns, args, policy, splits))
        write_metrics(ns.out / "metrics.jsonl", [])
        source = ns.data if ns.task is None else f"task {ns.task}"
        console.print(f"[bold]minirlhf sft[/]: {len(splits[0])} train / {len(splits[1])} "
                      f"held-out demonstrations from {source} -> {ns.out}", soft_wrap=True)
        run_sft(ns, policy, args, splits, None, console)


def args_and_demonstrations(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple:
    """`SFTArgs` from the flags (over `SFT_TASK_ARGS` with --task), and the demonstrations as
    (train, held-out); a bad flag or file ends the command with its message."""
    names = {f.name for f in dataclasses.fields(SFTArgs)}
    defaults = SFT_TASK_ARGS if ns.task is not None else {}
    try:
        args = SFTArgs(**defaults | {k: v for k, v in vars(ns).items() if k in names})
        if ns.task is not None:
            splits = get_task_splits(ns.task, ns.num_demonstrations or min(
                SFT_TASK_DEMONSTRATIONS, len(get_task(ns.task).get_problems("train"))))
        else:
            splits = split_demonstrations(load_sft_records(ns.data), args.held_out_fraction,
                                          args.seed)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    return args, splits


def get_task_splits(name: str, count: int) -> tuple[list[Demonstration], list[Demonstration]]:
    """Task `name`'s first `count` training demonstrations (they come shuffled with the task's
    seed) and its held-out ones: no held-out problem is trained on, by SFT or by RL."""
    task = get_task(name)
    return (to_demonstrations(task.get_demonstrations("train", count), f"task {name}"),
            to_demonstrations(task.get_demonstrations("held_out"), f"task {name}"))


def hash_demonstrations(splits: tuple[list[Demonstration], list[Demonstration]]) -> str:
    """The SHA-256 of the demonstrations of both splits, in order (a task's are made by code:
    a changed generator or word list changes them)."""
    text = json.dumps([[[d.prompt, d.response] for d in split] for split in splits],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def resume_sft(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    """Continue the SFT run in --out with its saved configuration, from its last checkpoint
    (none yet: from step 0)."""
    if ns.force:
        parser.error("--force starts a new run and --resume continues one: give one of them.")
    run_file = ns.out / "run.json"
    run = read_run_json(run_file) if run_file.is_file() else {}
    if "sft" not in run:
        parser.error("--resume needs --out pointing at the folder of an earlier `minirlhf sft`.")
    given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(SFTArgs)
             if f.name in vars(ns)] + [flag for flag, value in [
                 ("--data", ns.data), ("--task", ns.task),
                 ("--num-demonstrations", ns.num_demonstrations)] if value is not None]
    if given:
        parser.error(f"--resume continues an SFT run with its saved configuration: drop "
                     f"{', '.join(given)}, or start a new run with another --out.")
    args = SFTArgs(**run["sft"]["args"])
    splits = load_recorded_splits(run["sft"], args)
    console, device = Console(), pick_device(args.device)
    check_inputs(run, ns.accept_changed_inputs, console)
    with locked(ns.out, "sft") as stale:
        if stale:
            console.print(f"[yellow]{stale}", soft_wrap=True)
        saved = load_dpo_checkpoint(ns.out, device, console, run)
        history = saved["history"] if saved else []
        # Steps after the checkpoint are run again, so their old metric lines go.
        write_metrics(ns.out / "metrics.jsonl", history)
        console.print(f"[bold]minirlhf sft --resume[/]: {ns.out} at step {len(history)}",
                      soft_wrap=True)
        run_sft(ns, loading.load_policy(args.base_model, device), args, splits, saved, console)


def load_recorded_splits(recorded: dict, args: SFTArgs) -> tuple[list[Demonstration], list]:
    """The (train, held-out) demonstrations run.json's "sft" names, as the run started with
    them; a data file or task that has changed since is refused."""
    if "task" in recorded:
        splits = get_task_splits(recorded["task"], recorded["num_demonstrations"])
        if hash_demonstrations(splits) != recorded["demonstrations_sha256"]:
            raise RunFolderError(f"Task {recorded['task']}'s demonstrations have changed since "
                                 "the run started (its generator or word list): they would not "
                                 "be the ones it trained on. Start a new run with another --out.")
        return splits
    data = Path(recorded["data"])
    if recorded["data_sha256"] != sha256_of(data):
        raise RunFolderError(f"{data} has changed since the run started: its demonstrations, "
                             "and the held-out split, would not be the ones it trained on.")
    return split_demonstrations(load_sft_records(data), args.held_out_fraction, args.seed)


def make_run_config(ns: argparse.Namespace, args: SFTArgs, policy: HookedTransformer,
                    splits: tuple[list[Demonstration], list[Demonstration]]) -> dict:
    """run.json: "args" and "reward" as a PPO run has them, so `minirlhf sample` and `export`
    read them (prefix: the first held-out prompt as the model reads it; gen_len: the longest
    response in tokens, and its EOS; what trained, to rebuild the adapters), and "sft"."""
    first = splits[1][0].prompt
    prefix = render_prompt(first, args.prompt_template, args.chat_template, policy.tokenizer)
    gen_len = max(len(policy.tokenizer(d.response, add_special_tokens=False)["input_ids"])
                  for split in splits for d in split) + args.append_eos
    sample_args = RLHFArgs(base_model=args.base_model, prefix=prefix, gen_len=gen_len,
                           prepend_bos=args.prepend_bos, device=args.device,
                           stop_at_eos=args.append_eos, trainable_layers=args.trainable_layers,
                           lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                           lora_targets=args.lora_targets)
    source = ({"data": str(ns.data.resolve()), "data_sha256": sha256_of(ns.data)}
              if ns.task is None else
              {"task": ns.task, "num_demonstrations": len(splits[0]),
               "demonstrations_sha256": hash_demonstrations(splits)})
    run = {"preset": "sft", "args": sample_args.to_dict(), "reward": {"kind": "none"},
           "sft": {"args": args.to_dict()} | source}
    return run | {"inputs": get_inputs(run)}


def run_sft(ns: argparse.Namespace, policy: HookedTransformer, args: SFTArgs,
            splits: tuple[list[Demonstration], list[Demonstration]], saved: dict | None,
            console: Console):
    """Train (from `saved` when resuming), saving checkpoints into --out; once every step is
    done, write the policy (`write_policy`), plot and sum up. SIGTERM or Ctrl-C saves the step
    in progress and stops (`keeper.stop_between_steps`)."""
    saved_steps = [len(saved["history"])] if saved else []
    run = read_run_json(ns.out / "run.json")  # kept in each checkpoint: a resume compares it
    config = {key: run[key] for key in ("sft", "args", "reward") if key in run}

    def save(state: dict):
        save_checkpoint(state, ns.out, {"algorithm": "sft", **config})
        saved_steps.append(state["phase"])

    trainer = SFTTrainer(policy, *splits, args, console)
    with reporting_stops(ns.out, saved_steps, console, "sft"), stop_between_steps() as stop:
        history = trainer.train(lambda m: append_metrics(ns.out / "metrics.jsonl", m),
                                saved=saved, save=save, save_every=ns.checkpoint_every,
                                stop=stop)
    if saved is not None and len(history) == len(saved["history"]):
        console.print(f"Nothing to do: the run already did its {len(history)} steps.")
    write_policy(ns.out, args.base_model)
    plot = plot_sft_metrics(history, ns.out / PLOT_NAME)
    summary = Table("held-out", "value", title="SFT")
    for key, value in history[-1].items():
        if key.startswith("held_out/"):
            summary.add_row(key, f"{value:.4f}")
    console.print(summary)
    console.print(f"Plot:       {plot}\nPolicy:     {ns.out / policy_folder.POLICY_NAME}\n"
                  f"Samples:    minirlhf sample --run {ns.out} --compare\n"
                  f"RL from it: minirlhf train --base-model {ns.out} ...", soft_wrap=True)


def write_policy(out: Path, base_model: str):
    """`policy.pt` and `policy.json`: the run's policy as `sample` and `export` read it (LoRA
    merged: `load_run_policy`), so that `--base-model OUT` loads exactly that model."""
    policy = load_run_policy(out, accept_changed=True).policy  # inputs checked at the start
    path = out / policy_folder.POLICY_NAME
    with replacing(path) as file:
        torch.save(policy_folder.get_policy_state(policy), file)
    write_json(out / policy_folder.RECORD_NAME, policy_folder.make_policy_record(path, base_model))


def describe_rendering_change(args: RLHFArgs) -> str | None:
    """When `args.base_model` is an SFT run folder whose demonstrations were rendered otherwise
    than `args` renders RL's prompts (template, chat template, BOS, the EOS it stops at): what
    differs, in one line. None: the same text, or not an SFT run."""
    run_file = Path(str(args.base_model)).expanduser() / "run.json"
    sft = read_run_json(run_file).get("sft") if run_file.is_file() else None
    if not isinstance(sft, dict) or "args" not in sft:
        return None
    learned = SFTArgs(**sft["args"])
    pairs = [("prompt_template", learned.prompt_template, args.prompt_template),
             ("chat_template", learned.chat_template, args.chat_template),
             ("prepend_bos", learned.prepend_bos, args.prepend_bos),
             ("append_eos / stop_at_eos", learned.append_eos, args.stop_at_eos)]
    changes = [f"{name} {old!r} -> {new!r}" for name, old, new in pairs if old != new]
    if not changes:
        return None
    return (f"The SFT run {args.base_model} learned prompts rendered otherwise than this run "
            f"renders them ({'; '.join(changes)}): RL starts on text the SFT model did not "
            "learn. Give the SFT run's settings to match.")
