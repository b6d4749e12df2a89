"""The command line: `minirlhf train`, `sample`, `export`, `preferences`, `reward-model`, `dpo`.

The top layer (also `python -m minirlhf`): it turns a preset plus flags into `RLHFArgs` and a
reward function, runs the trainer with checkpoints, and writes the run's folder:

    run.json         the config (RLHFArgs and the reward), and what each --resume changed
    metrics.jsonl    one line of metrics per phase
    reward_kl.png    mean reward and KL against phase
    checkpoint.pt    the latest checkpoint (`--resume` continues from it), checkpoint.json its
                     size and SHA-256; checkpoint.prev.pt/.json the one before
    run.lock         held while a command writes the folder

The step before PPO: `preferences` writes RLAIF preference pairs (JSONL), `reward-model` trains a
reward model on such a file, and `train --reward-model FOLDER` runs PPO against it. `dpo`
trains the policy on the preference file directly (minirlhf.dpo_run). `export` writes a run's
trained policy as a Hugging Face model folder (minirlhf.export).
"""

import argparse
import ast
import dataclasses
import inspect
import json
import secrets
import sys
import time
import typing
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from minirlhf import distributed, loading
from minirlhf.args import RLHFArgs
from minirlhf.checkpoint import CheckpointError
from minirlhf.device import pick_device
from minirlhf.dpo_run import add_dpo_parser, cmd_dpo
from minirlhf.export import ExportError, compare_logprobs, export_hf
from minirlhf.presets import DEFAULT_PRESET, PRESETS, make_prompts, make_reward_fn
from minirlhf.report import append_metrics, plot_metrics, plot_reward_model_metrics, print_summary
from minirlhf.reward_training import RewardModelArgs
from minirlhf.rewards import get_rewards
from minirlhf.run_folder import (
    CheckpointKeeper,
    RunFolderError,
    args_and_pairs,
    claimed,
    load_run_policy,
    locked,
    new_folder,
    resume_trainer,
    resumed_config,
    start_run_folder,
    stop_on_sigterm,
)
from minirlhf.sampling import SamplingConfig, get_samples
from minirlhf.trainer import RLHFTrainer, Rollout

PLOT_NAME = "reward_kl.png"


# ---- flags for every RLHFArgs field ----

def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each dataclass field, read from the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            if isinstance(following.value, ast.Constant):
                docs[node.target.id] = str(following.value.value).strip()
    return docs


def parse_optional(kind: type):
    """An argparse type for `kind | None`: "none" gives None."""

    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_args_flags(parser: argparse.ArgumentParser, cls: type = RLHFArgs,
                   title: str = "RLHFArgs (override the preset)"):
    """One flag per field of the dataclass `cls` (`--base-lr`, ...), defaulting to "not given"."""
    docs = field_docs(cls)
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        flag, hint = "--" + field.name.replace("_", "-"), hints[field.name]
        options = {"default": argparse.SUPPRESS, "dest": field.name,
                   "help": docs.get(field.name, "")}
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif typing.get_origin(hint) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(hint), **options)
        elif args and len(args) < len(typing.get_args(hint)):  # X | None
            group.add_argument(flag, type=parse_optional(args[0]), metavar=args[0].__name__.upper(),
                               **options)
        else:
            group.add_argument(flag, type=hint, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minirlhf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

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
    train.add_argument("--direction", choices=["pos", "neg"], help="sentiment to steer towards")
    train.add_argument("--classifier", help="HF sequence classifier (hub name or folder)")
    train.add_argument("--wandb", action="store_true", dest="use_wandb",
                       default=argparse.SUPPRESS, help="log to Weights & Biases")
    train.add_argument("--backend", choices=distributed.BACKENDS,
                       help="under torchrun with several processes: how they communicate "
                       "(default NCCL on CUDA, gloo on the CPU)")
    train.add_argument("--wandb-mode", choices=["online", "offline"],
                       help="offline (default) writes to the run folder; `wandb sync` later")
    add_args_flags(train)

    sample = commands.add_parser("sample", help="print continuations from a trained run")
    sample.add_argument("--run", type=Path, required=True, help="the run folder of a training")
    sample.add_argument("--prompt", help="prompt (default: the run's prefix)")
    sample.add_argument("-n", "--num-samples", type=int, default=8)
    sample.add_argument("--gen-len", type=int, help="tokens to generate (default: the run's)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    sample.add_argument("--compare", action="store_true",
                        help="also sample the model as it was before training")
    add_preference_parsers(commands)
    add_dpo_parser(commands, add_args_flags)
    add_export_parser(commands)
    return parser


def add_export_parser(commands):
    export = commands.add_parser("export", help="write a run's trained policy as a Hugging Face "
                                 "model folder (AutoModelForCausalLM.from_pretrained loads it)")
    export.add_argument("--run", type=Path, required=True,
                        help="the folder of a `minirlhf train` or `minirlhf dpo` run")
    export.add_argument("--out", type=Path, required=True, help="the model folder to write")
    export.add_argument("--force", action="store_true",
                        help="replace a model folder already in --out")
    export.add_argument("--drop-unembed-bias", action="store_true",
                        help="export even when the policy's unembedding bias differs between "
                        "tokens (GPT-2 and Llama have none): log-probs change by up to its spread")
    export.add_argument("--device", help="cuda, mps or cpu (default: the best available)")


def add_preference_parsers(commands):
    prefs = commands.add_parser("preferences", help="write RLAIF preference pairs (JSONL): "
                                "two samples of the policy, the judge prefers one")
    prefs.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    prefs.add_argument("--base-model", default="smollm2", help="the policy to sample")
    prefs.add_argument("--prompt", action="append",
                       help="a prompt (repeat for several; default 'This movie was')")
    prefs.add_argument("--num-pairs", type=int, default=1200, help="pairs to keep (not ties)")
    prefs.add_argument("--gen-len", type=int, default=20, help="tokens per continuation")
    prefs.add_argument("--batch-size", type=int, default=64, help="samples per batch (even)")
    prefs.add_argument("--judge", choices=["vader", "char_count"], default="vader",
                       help="the AI judge that scores each prompt + continuation")
    prefs.add_argument("--direction", choices=["pos", "neg"], default="pos",
                       help="VADER: prefer positive or negative")
    prefs.add_argument("--char", default=".", help="char_count: the character counted")
    prefs.add_argument("--min-gap", type=float, default=0.3,
                       help="pairs whose scores differ by this much or less are ties (dropped)")
    prefs.add_argument("--margin", action="store_true",
                       help="store the judge's score gap as each pair's margin")
    prefs.add_argument("--no-prepend-bos", action="store_false", dest="prepend_bos")
    prefs.add_argument("--seed", type=int, default=0)
    prefs.add_argument("--device", help="cuda, mps or cpu (default: the best available)")

    rm = commands.add_parser("reward-model", help="train a reward model on preference pairs")
    rm.add_argument("--data", type=Path, required=True, help="preference JSONL file")
    rm.add_argument("--out", type=Path, required=True, help="folder for the reward model")
    rm.add_argument("--force", action="store_true",
                    help="delete the files of a run already in --out and start again")
    add_args_flags(rm, RewardModelArgs, "RewardModelArgs")


# ---- train ----

def make_run(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """A new run's config (preset, args, reward) from the preset and the flags."""
    preset_name = ns.preset or DEFAULT_PRESET
    preset = PRESETS[preset_name]
    field_names = {f.name for f in dataclasses.fields(RLHFArgs) if f.init}
    overrides = {k: v for k, v in vars(ns).items() if k in field_names}
    try:
        args = RLHFArgs(**{**preset["args"], **overrides})
    except ValueError as error:
        parser.error(str(error))
    reward = dict(preset["reward"])
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
    # wandb_id: a resumed run logs into the same wandb run (resume="allow").
    return {"preset": preset_name, "args": args.to_dict(), "reward": reward,
            "wandb_id": secrets.token_hex(6)}


def given_flags(ns: argparse.Namespace) -> dict:
    """The RLHFArgs, preset and reward flags typed on the command line, as run.json holds them."""
    field_names = {f.name for f in dataclasses.fields(RLHFArgs) if f.init}
    given = {k: v for k, v in vars(ns).items() if k in field_names}
    for key in ["preset", "reward", "direction", "classifier"]:
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
    out = ns.out or Path("runs") / f"{run['preset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    if distributed.launched_world_size() > 1:
        run, changes = join_processes(ns, parser, out, run)
        if not distributed.is_main():  # process 0 alone locks, prints and writes the folder
            train_run(ns, out, run, changes, Console(quiet=True))
            return
    console = Console()
    with locked(out, "train") as stale:
        if stale:
            console.print(f"[yellow]{stale}", soft_wrap=True)
        changes = {}
        if ns.resume:
            run, changes = resumed_config(json.loads((out / "run.json").read_text()),
                                          given_flags(ns))
        else:
            start_run_folder(out, run, ns.force, console)
        train_run(ns, out, run, changes, console)


def join_processes(ns: argparse.Namespace, parser: argparse.ArgumentParser, out: Path,
                   run: dict | None) -> tuple[dict, dict]:
    """Under torchrun with several processes: join the others, on the run's device. Returns the
    run's config and what --resume changes (read before process 0 may rewrite run.json)."""
    if ns.out is None:
        parser.error("With several processes give --out: they must all use the same folder.")
    changes = {}
    if ns.resume:
        run, changes = resumed_config(json.loads((out / "run.json").read_text()),
                                      given_flags(ns))
    distributed.setup(pick_device(run["args"]["device"]), ns.backend)
    return run, changes


def train_run(ns: argparse.Namespace, out: Path, run: dict, changes: dict, console: Console):
    """Build the trainer, resume it if asked, and train with checkpoints in `out`."""
    args = RLHFArgs.from_dict(run["args"])
    console.print(f"[bold]minirlhf train[/]: {run['preset']} -> {out}", soft_wrap=True)
    device = pick_device(args.device)
    reward_fn = make_reward_fn(run["reward"], device)
    table_every = 5 if ns.table_every is None else ns.table_every
    trainer = RLHFTrainer(args, reward_fn, prompts=make_prompts(run["reward"], args),
                          console=console, table_every=table_every)
    console.print(f"Device {trainer.device}, precision {trainer.precision} "
                  f"(--precision {args.precision})")
    if distributed.get_world_size() > 1:
        console.print(f"{distributed.get_world_size()} processes, {trainer.local_batch_size} "
                      f"of the {args.batch_size} samples of a phase each")
    extra, saved_phase = {}, None
    if ns.resume:
        extra, saved_phase = resume_trainer(trainer, out, run, changes, console)
    keeper = CheckpointKeeper(trainer, out, ns.checkpoint_every or 5, args.total_phases, extra,
                              saved_phase)

    def on_phase_end(trainer: RLHFTrainer, rollout: Rollout):
        keeper.mark_boundary(trainer)
        main = distributed.is_main()  # process 0 alone writes; every process saves (it gathers)
        if main:
            append_metrics(out / "metrics.jsonl", rollout.metrics)
        samples = (rollout.samples, rollout.rewards.tolist())
        extra.setdefault("before", samples)
        extra["after"] = samples
        if keeper.is_due(trainer.phase):
            keeper.save(trainer)
            if main:
                plot_metrics(trainer.history, out / PLOT_NAME, title=run["preset"])
        keeper.stop_if_asked()

    try:
        with stop_on_sigterm(keeper, trainer):
            wandb_kwargs = {"mode": ns.wandb_mode or "offline", "dir": str(out)}
            if "wandb_id" in run:  # runs started before wandb_id existed get a new wandb run
                wandb_kwargs |= {"id": run["wandb_id"], "resume": "allow"}
            trainer.train(on_phase_end, wandb_kwargs=wandb_kwargs)
    except BaseException as error:
        if not isinstance(error, CheckpointError):  # a failed save: main says why, once
            console.print(f"{keeper.save_after_crash(trainer)} Continue with: minirlhf train "
                          f"--out {out} --resume", soft_wrap=True)
        raise
    if distributed.is_main():
        finish_run(trainer, out, extra, console)


def finish_run(trainer: RLHFTrainer, out: Path, extra: dict, console: Console):
    if not trainer.history:
        console.print("Nothing to do: the run already reached total_phases.")
        return
    plot = plot_metrics(trainer.history, out / PLOT_NAME)
    print_summary(console, trainer.history, extra["before"], extra["after"])
    console.print(f"Plot:       {plot}\nCheckpoint: {out / 'checkpoint.pt'}\n"
                  f"Metrics:    {out / 'metrics.jsonl'}\n"
                  f"Samples:    minirlhf sample --run {out} --compare", soft_wrap=True)


# ---- sample ----

def cmd_sample(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    device = pick_device(ns.device)
    trained = load_run_policy(ns.run, device)
    if trained.note:
        Console(stderr=True).print(f"[yellow]{trained.note}", soft_wrap=True)
    run, args = trained.run, RLHFArgs.from_dict(trained.run["args"])
    prompt = ns.prompt or args.prefix
    settings = dict(batch_size=ns.num_samples, gen_len=ns.gen_len or args.gen_len,
                    sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
                    prepend_bos=args.prepend_bos, seed=ns.seed)
    columns = {}
    if ns.compare:
        base_model = loading.load_policy(args.base_model, device)
        columns["before training"] = get_samples(base_model, prompt, **settings).samples
    columns[f"after {trained.phase} phases"] = get_samples(
        trained.policy, prompt, **settings).samples
    # Control-token rewards need the control token, which a free prompt may not have.
    scored = run["reward"]["kind"] != "control"
    reward_fn = make_reward_fn(run["reward"], device) if scored else None
    table = Table(*columns, title=f"{ns.run}: {prompt!r}", show_lines=True)
    for row in zip(*columns.values()):
        if reward_fn is not None:
            rewards = get_rewards(reward_fn, list(row))
            row = [f"[{r:+.2f}] {text}" for r, text in zip(rewards.tolist(), row)]
        table.add_row(*map(Text, row))  # Text: model output is not rich markup
    Console().print(table)


# ---- export ----

def cmd_export(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    """Load the run's policy, write it to a scratch folder beside --out, check transformers
    reads the same log-probs from it, then move it into place."""
    console = Console()
    trained = load_run_policy(ns.run, pick_device(ns.device))
    if trained.note:
        console.print(f"[yellow]{trained.note}", soft_wrap=True)
    prepend_bos = RLHFArgs.from_dict(trained.run["args"]).prepend_bos
    with new_folder(ns.out, ns.force) as scratch:
        try:
            exported = export_hf(trained.policy, scratch, ns.drop_unembed_bias, prepend_bos)
        except ExportError as error:
            parser.exit(1, f"minirlhf export: error: {error}\n")
        difference = compare_logprobs(trained.policy, scratch)
    unit = "steps" if "dpo" in trained.run else "phases"
    console.print(f"[bold]minirlhf export[/]: {ns.run} (after {trained.phase} {unit}) -> "
                  f"{ns.out}, a {exported.architecture} model. Largest log-prob difference "
                  f"in transformers: {difference:.2g}.", soft_wrap=True)
    for note in exported.notes:
        console.print(f"[yellow]{note}", soft_wrap=True)
    console.print(f"Load it: AutoModelForCausalLM.from_pretrained({str(ns.out)!r})",
                  soft_wrap=True)


# ---- preferences and the reward model ----

def cmd_preferences(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    from minirlhf.preferences import make_preferences, write_preferences

    if ns.batch_size < 2 or ns.batch_size % 2:
        parser.error(f"--batch-size must be even (two samples a pair), got {ns.batch_size}.")
    device = pick_device(ns.device)
    judge_spec = {"kind": ns.judge, "direction": ns.direction, "char": ns.char}
    console = Console()
    with console.status(f"sampling pairs from {ns.base_model}, judged by {ns.judge}"):
        preferences = make_preferences(
            loading.load_policy(ns.base_model, device), make_reward_fn(judge_spec, device),
            ns.prompt or ["This movie was"], ns.num_pairs, gen_len=ns.gen_len,
            batch_size=ns.batch_size, min_gap=ns.min_gap, margin=ns.margin, seed=ns.seed,
            prepend_bos=ns.prepend_bos)
    write_preferences(preferences, ns.out)
    table = Table("chosen", "rejected", title=f"{len(preferences)} pairs -> {ns.out}",
                  show_lines=True)
    for p in preferences[:4]:
        table.add_row(Text(f"[{p.chosen_score:+.2f}] {p.chosen_text}"),
                      Text(f"[{p.rejected_score:+.2f}] {p.rejected_text}"))
    console.print(table)
    console.print(f"Train a reward model on it: minirlhf reward-model --data {ns.out} "
                  f"--base-model {ns.base_model} --out runs/reward-model", soft_wrap=True)


def cmd_reward_model(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    args, train, heldout = args_and_pairs(ns, parser, RewardModelArgs)
    console = Console()
    with claimed(ns.out, "reward-model", ns.force, console):
        train_and_save_reward_model(ns, args, train, heldout, console)


def train_and_save_reward_model(ns: argparse.Namespace, args: RewardModelArgs, train: list,
                                heldout: list, console: Console):
    from minirlhf.reward_model import save_reward_model
    from minirlhf.reward_training import fit_reward_model

    (ns.out / "metrics.jsonl").write_text("")
    console.print(f"[bold]minirlhf reward-model[/]: {len(train)} train / {len(heldout)} "
                  f"held-out pairs from {ns.data} -> {ns.out}", soft_wrap=True)
    trained = fit_reward_model(train, heldout, args, pick_device(args.device),
                               console=console,
                               on_step=lambda m: append_metrics(ns.out / "metrics.jsonl", m))
    info = {"base_model": args.base_model, "args": args.to_dict(), "data": str(ns.data),
            "heldout": trained.final_heldout, "normalization": trained.normalization}
    save_reward_model(trained.reward_model, ns.out, info)
    info |= {"prepend_bos": args.prepend_bos, "append_end_token": args.append_end_token}
    (ns.out / "reward_model.json").write_text(json.dumps(info, indent=2))
    plot = plot_reward_model_metrics(trained.history, ns.out / "accuracy.png")
    summary = Table("held-out", "value", title="Reward model")
    for key, value in {**trained.final_heldout, **trained.normalization}.items():
        summary.add_row(key, f"{value:+.4f}")
    console.print(summary)
    console.print(f"Plot:  {plot}\nModel: {ns.out / 'reward_model.pt'}\n"
                  f"PPO against it: minirlhf train --reward-model {ns.out}", soft_wrap=True)


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "preferences": cmd_preferences,
            "reward-model": cmd_reward_model, "dpo": cmd_dpo, "export": cmd_export}


def main(argv: list[str] | None = None):
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        COMMANDS[ns.command](ns, parser)
    except (CheckpointError, RunFolderError, distributed.WorldSizeError) as error:
        parser.exit(1, f"minirlhf {ns.command}: error: {error}\n")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
