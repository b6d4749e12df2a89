"""`minirlhf train`: a preset plus flags -> `RLHFArgs` and a reward; the trainer run with
checkpoints in its run folder (metrics.jsonl, reward_kl.png, checkpoint.pt, run.json),
`--resume`, torchrun."""

import argparse
import dataclasses
import secrets
import time
from pathlib import Path

from rich.console import Console
from transformer_lens import HookedTransformer

from minirlhf.args import RLHFArgs
from minirlhf.cli.checkpoint import CheckpointError
from minirlhf.cli.flags import add_args_flags
from minirlhf.cli.keeper import CheckpointKeeper, stop_on_sigterm
from minirlhf.cli.preflight import ConfigError, check_new_run
from minirlhf.cli.presets import (
    DEFAULT_PRESET,
    PRESETS,
    TASK_PRESET,
    make_prompt_split,
    make_prompts,
    make_reward_fn,
)
from minirlhf.cli.provenance import add_accept_flag, check_inputs, get_inputs
from minirlhf.cli.report import append_metrics, plot_metrics, print_summary
from minirlhf.cli.resume import resume_trainer, resumed_config
from minirlhf.cli.run_folder import locked, read_run_json, start_run_folder
from minirlhf.cli.sft import describe_rendering_change
from minirlhf.runtime import distributed
from minirlhf.runtime.device import pick_device
from minirlhf.tasks import TASKS
from minirlhf.trainer import RLHFTrainer, Rollout

PLOT_NAME = "reward_kl.png"


def add_train_parser(commands):
    train = commands.add_parser("train", help="train a policy with PPO against a reward")
    train.add_argument("--preset", choices=sorted(PRESETS),
                       help=f"starting configuration (default {DEFAULT_PRESET}, offline)")
    train.add_argument("--out", type=Path, help="run folder (default runs/<preset>-<time>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint")
    train.add_argument("--force", action="store_true",
                       help="delete the files of a run already in --out and start again")
    train.add_argument("--checkpoint-every", type=int,
                       help="phases between saves (default 5)")
    train.add_argument("--table-every", type=int,
                       help="print a sample table every N phases (default 5; 0: never)")
    train.add_argument("--reward",
                       choices=["vader", "classifier", "control", "char_count", "reward_model"],
                       help="override the preset's reward")
    train.add_argument("--reward-model", type=Path,
                       help="folder of a `minirlhf reward-model` run (implies --reward "
                       "reward_model)")
    train.add_argument("--task", choices=list(TASKS),
                       help="train on a task with checkable answers (docs/tasks.md): its prompts, "
                       "held-out split and checker (default preset smollm2-task)")
    train.add_argument("--direction", choices=["pos", "neg"], help="sentiment to steer towards")
    train.add_argument("--classifier", help="HF sequence classifier (hub name or folder)")
    train.add_argument("--wandb", action="store_true", dest="use_wandb",
                       default=argparse.SUPPRESS, help="log to Weights & Biases")
    train.add_argument("--backend", choices=distributed.BACKENDS,
                       help="under torchrun with several processes: how they communicate "
                       "(default NCCL on CUDA, gloo on the CPU)")
    train.add_argument("--collective-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S,
                       metavar="SECONDS", help="under torchrun: how long a process waits for "
                       "the others before naming the one that stalled (default 600)")
    train.add_argument("--wandb-mode", choices=["online", "offline"],
                       help="offline (default) writes to the run folder; `wandb sync` later")
    add_accept_flag(train)
    add_args_flags(train)



def make_run(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """A new run's config (preset, args, reward) from the preset and the flags."""
    preset_name = ns.preset or (TASK_PRESET if ns.task else DEFAULT_PRESET)
    preset = PRESETS[preset_name]
    # A preset may tune a direction its own way (by_direction: args and reward spec on top).
    direction = ns.direction or preset["reward"].get("direction")
    tuned = preset.get("by_direction", {}).get(direction, {})
    field_names = {f.name for f in dataclasses.fields(RLHFArgs) if f.init}
    overrides = {k: v for k, v in vars(ns).items() if k in field_names}
    try:
        args = RLHFArgs(**{**preset["args"], **tuned.get("args", {}), **overrides})
    except ValueError as error:
        parser.error(str(error))
    reward = {**preset["reward"], **tuned.get("reward", {})}
    for key in ["direction", "classifier"]:
        if getattr(ns, key) is not None:
            reward[key] = getattr(ns, key)
    if ns.reward is not None:
        reward["kind"] = ns.reward
        if ns.reward == "classifier":
            reward.setdefault("classifier", "lvwerra/distilbert-imdb")
    if ns.reward_model is not None or reward["kind"] == "reward_model":
        if ns.reward_model is None or ns.reward not in (None, "reward_model"):
            parser.error("--reward reward_model and --reward-model FOLDER go together.")
        if not (ns.reward_model / "reward_model.pt").is_file():
            parser.error(f"{ns.reward_model} holds no reward_model.pt: train one with "
                         "`minirlhf reward-model`.")
        reward = {"kind": "reward_model", "path": str(ns.reward_model.resolve())}
    if ns.task is not None or reward["kind"] == "task":
        reward = get_task_reward(ns, reward, args, parser)
    change = describe_rendering_change(args)  # `train --base-model <sft run>`
    if change is not None:
        Console(stderr=True).print(f"[yellow]{change}", soft_wrap=True)
    # wandb_id: a resumed run logs into the same wandb run (resume="allow").
    run = {"preset": preset_name, "args": args.to_dict(), "reward": reward,
           "wandb_id": secrets.token_hex(6)}
    return run | {"inputs": get_inputs(run)}  # checked by --resume, sample and export


def get_task_reward(ns: argparse.Namespace, reward: dict, args: RLHFArgs,
                    parser: argparse.ArgumentParser) -> dict:
    """The reward spec of a task run: --task's, or the preset's task; refuses a second source
    of prompts or another reward."""
    if ns.reward is not None or ns.reward_model is not None:
        parser.error("--task brings its own reward (its checker): drop --reward/--reward-model.")
    if args.prompts is not None:
        parser.error("--task brings its own prompts and held-out split: drop --prompts.")
    return {"kind": "task", "task": ns.task or reward["task"]}


def given_flags(ns: argparse.Namespace) -> dict:
    """The RLHFArgs, preset and reward flags typed on the command line, as run.json holds them."""
    field_names = {f.name for f in dataclasses.fields(RLHFArgs) if f.init}
    given = {k: v for k, v in vars(ns).items() if k in field_names}
    for key in ["preset", "reward", "direction", "classifier", "task"]:
        if getattr(ns, key) is not None:
            given[key] = getattr(ns, key)
    if ns.reward_model is not None:
        given["reward_model"] = str(ns.reward_model.resolve())
    return given


def cmd_train(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    for flag, value, least in [("--checkpoint-every", ns.checkpoint_every, 1),
                               ("--table-every", ns.table_every, 0)]:
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}.")
    if ns.resume and ns.force:
        parser.error("--force starts a new run and --resume continues one: give one of them.")
    if ns.resume and (ns.out is None or not (ns.out / "run.json").exists()):
        parser.error("--resume needs --out pointing at the folder of an earlier run.")
    run = None if ns.resume else make_run(ns, parser)
    policy = None if ns.resume else check_before_writing(run, parser)
    out = ns.out or Path("runs") / f"{run['preset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    if distributed.launched_world_size() > 1:
        run, changes = join_processes(ns, parser, out, run)
        if not distributed.is_main():  # process 0 alone locks, prints and writes the folder
            train_run(ns, out, run, changes, Console(quiet=True), policy)
            return
    console = Console()
    with locked(out, "train") as stale:
        if stale:
            console.print(f"[yellow]{stale}", soft_wrap=True)
        changes = {}
        if ns.resume:
            run, changes = resumed_config(read_run_json(out / "run.json"), given_flags(ns))
            check_inputs(run, ns.accept_changed_inputs, console)
        else:
            start_run_folder(out, run, ns.force, console)
        train_run(ns, out, run, changes, console, policy)


def check_before_writing(run: dict, parser: argparse.ArgumentParser) -> HookedTransformer:
    """A new run's policy, once its prompts are known to fit it (`cli.preflight`); a mistake
    exits with one line before the run folder exists."""
    try:
        return check_new_run(run)
    except ConfigError as error:
        parser.exit(2, f"minirlhf train: error: {error}\n")


def join_processes(ns: argparse.Namespace, parser: argparse.ArgumentParser, out: Path,
                   run: dict | None) -> tuple[dict, dict]:
    """Under torchrun with several processes: join the others, on the run's device. Returns the
    run's config and what --resume changes (read before process 0 may rewrite run.json)."""
    if ns.out is None:
        parser.error("With several processes give --out: they must all use the same folder.")
    changes = {}
    if ns.resume:
        run, changes = resumed_config(read_run_json(out / "run.json"), given_flags(ns))
        check_inputs(run, ns.accept_changed_inputs, Console(quiet=True))
    distributed.setup(pick_device(run["args"]["device"]), ns.backend, ns.collective_timeout)
    return run, changes


def train_run(ns: argparse.Namespace, out: Path, run: dict, changes: dict, console: Console,
              policy: HookedTransformer | None = None):
    """Build the trainer (on `policy` if loaded), resume it if asked, train into `out`."""
    args = RLHFArgs.from_dict(run["args"])
    console.print(f"[bold]minirlhf train[/]: {run['preset']} -> {out}", soft_wrap=True)
    trainer = make_trainer(ns, run, args, console, policy)
    extra, saved_phase = (resume_trainer(trainer, out, run, changes, console) if ns.resume
                          else ({}, None))
    extra["reward"] = run["reward"]  # saved beside the args: a resume compares run.json with both
    keeper = CheckpointKeeper(trainer, out, ns.checkpoint_every or 5, args.total_phases, extra,
                              saved_phase)

    def on_phase_end(trainer: RLHFTrainer, rollout: Rollout):
        keeper.mark_boundary(trainer)
        main = distributed.is_main()  # process 0 alone writes; every process saves (it gathers)
        if main:
            append_metrics(out / "metrics.jsonl", rollout.metrics)
        samples = (rollout.texts, rollout.rewards.tolist())
        extra.setdefault("before", samples)
        extra["after"] = samples
        stop = keeper.is_stop_asked()
        if keeper.is_due(trainer.phase) or stop:
            keeper.save(trainer)
            if main:
                plot_metrics(trainer.history, out / PLOT_NAME, title=run["preset"])
        if stop:
            keeper.stop()

    try:
        with stop_on_sigterm(keeper, trainer):
            trainer.train(on_phase_end, wandb_kwargs=get_wandb_kwargs(ns, out, run))
    except BaseException as error:
        if not isinstance(error, CheckpointError):  # a failed save: main says why, once
            console.print(f"{keeper.save_after_crash(trainer)} Continue with: "
                          f"{resume_command(out)}", soft_wrap=True)
        if isinstance(error, KeyboardInterrupt):  # that line says it all: no traceback
            raise SystemExit(130) from None
        raise
    if distributed.is_main():
        finish_run(trainer, out, extra, console)


def get_wandb_kwargs(ns: argparse.Namespace, out: Path, run: dict) -> dict:
    """wandb's settings: offline into the run folder unless asked; a resume logs into the same
    wandb run."""
    return {"mode": ns.wandb_mode or "offline", "dir": str(out), "id": run["wandb_id"],
            "resume": "allow"}


def resume_command(out: Path) -> str:
    """The command that continues the run in `out`, with this run's number of processes (a
    checkpoint of N processes resumes only under N)."""
    world_size = distributed.get_world_size()
    launcher = (f"torchrun --standalone --nproc-per-node {world_size} -m minirlhf"
                if world_size > 1 else "minirlhf")
    return f"{launcher} train --out {out} --resume"


def make_trainer(ns: argparse.Namespace, run: dict, args: RLHFArgs, console: Console,
                 policy: HookedTransformer | None = None) -> RLHFTrainer:
    """The trainer with the run's reward and prompts, saying where and how it computes."""
    device = pick_device(args.device)
    reward_fn = make_reward_fn(run["reward"], device)
    table_every = 5 if ns.table_every is None else ns.table_every
    trainer = RLHFTrainer(args, reward_fn, base_model=policy,
                          prompts=make_prompts(run["reward"], args), console=console,
                          table_every=table_every, prompt_split=make_prompt_split(run["reward"]))
    console.print(f"Device {trainer.device}, precision {trainer.precision} "
                  f"(--precision {args.precision})")
    if distributed.get_world_size() > 1:
        console.print(f"{distributed.get_world_size()} processes, {trainer.local_batch_size} "
                      f"of the {args.batch_size} samples of a phase each")
    return trainer


def finish_run(trainer: RLHFTrainer, out: Path, extra: dict, console: Console):
    if not trainer.history:
        console.print("Nothing to do: the run already reached total_phases.")
        return
    plot = plot_metrics(trainer.history, out / PLOT_NAME)
    print_summary(console, trainer.history, extra["before"], extra["after"])
    console.print(f"Plot:       {plot}\nCheckpoint: {out / 'checkpoint.pt'}\n"
                  f"Metrics:    {out / 'metrics.jsonl'}\n"
                  f"Samples:    minirlhf sample --run {out} --compare", soft_wrap=True)
