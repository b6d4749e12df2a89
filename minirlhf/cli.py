"""The command line: `minirlhf train` and `minirlhf sample` (also `python -m minirlhf`).

The top layer: it turns a preset plus flags into `RLHFArgs` and a reward function, runs the
trainer with checkpoints, and writes the run's folder:

    run.json         the config (RLHFArgs and the reward) the run was started with
    metrics.jsonl    one line of metrics per phase
    reward_kl.png    mean reward and KL against phase
    checkpoint.pt    the latest checkpoint (`--resume` continues from it)
"""

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import time
import typing
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from minirlhf import loading
from minirlhf.args import RLHFArgs
from minirlhf.checkpoint import load_checkpoint, save_checkpoint
from minirlhf.models import TransformerWithValueHead
from minirlhf.presets import DEFAULT_PRESET, PRESETS
from minirlhf.report import append_metrics, plot_metrics, print_summary
from minirlhf.rewards import RewardFn, get_rewards, reward_fn_char_count
from minirlhf.sampling import get_samples
from minirlhf.trainer import RLHFTrainer

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


def add_args_flags(parser: argparse.ArgumentParser):
    """One flag per RLHFArgs field (`--base-lr`, ...), defaulting to "not given"."""
    docs = field_docs(RLHFArgs)
    group = parser.add_argument_group("RLHFArgs (override the preset)")
    hints = typing.get_type_hints(RLHFArgs)
    for field in dataclasses.fields(RLHFArgs):
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
    train.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                       help=f"starting configuration (default {DEFAULT_PRESET}, offline)")
    train.add_argument("--out", type=Path, help="run folder (default runs/<preset>-<time>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint")
    train.add_argument("--checkpoint-every", type=int, default=5, help="phases between saves")
    train.add_argument("--table-every", type=int, default=5,
                       help="print a sample table every N phases (0: never)")
    train.add_argument("--reward", choices=["vader", "classifier", "control", "char_count"],
                       help="override the preset's reward")
    train.add_argument("--direction", choices=["pos", "neg"], help="sentiment to steer towards")
    train.add_argument("--classifier", help="HF sequence classifier (hub name or folder)")
    train.add_argument("--wandb", action="store_true", dest="use_wandb",
                       default=argparse.SUPPRESS, help="log to Weights & Biases")
    train.add_argument("--wandb-mode", choices=["online", "offline"], default="offline",
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
    return parser


# ---- rewards ----

def make_reward_fn(spec: dict, device) -> RewardFn:
    """The reward function a run's reward spec names."""
    from minirlhf import sentiment

    kind = spec["kind"]
    if kind == "vader":
        return sentiment.make_vader_reward(spec.get("direction", "pos"))
    if kind == "control":
        return sentiment.make_control_token_reward()
    if kind == "classifier":
        model, tokenizer = sentiment.load_hf_classifier(spec["classifier"], device)
        return sentiment.make_classifier_reward(model, tokenizer, spec.get("direction", "pos"),
                                                spec.get("output", "prob"))
    if kind == "char_count":
        char = spec.get("char", ".")

        def reward_fn(samples: list[str]):
            return reward_fn_char_count(samples, char)

        reward_fn.__name__ = f"char_count({char!r})"
        return reward_fn
    raise ValueError(f"Unknown reward kind {kind!r}.")


def make_prompts(spec: dict, args: RLHFArgs) -> list[str] | None:
    if spec["kind"] != "control":
        return None
    from minirlhf.sentiment import make_control_prompts

    return make_control_prompts(args.prefix, args.batch_size)


# ---- train ----

def new_run(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Path, dict]:
    """The run folder and its config (args + reward) from the preset and the flags."""
    preset = PRESETS[ns.preset]
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
    out = ns.out or Path("runs") / f"{ns.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "checkpoint.pt").exists():
        parser.error(f"{out} already holds a run: add --resume to continue it, or pick --out.")
    out.mkdir(parents=True, exist_ok=True)
    run = {"preset": ns.preset, "args": args.to_dict(), "reward": reward}
    (out / "run.json").write_text(json.dumps(run, indent=2))
    (out / "metrics.jsonl").write_text("")
    return out, run


def resumed_run(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Path, dict]:
    if ns.out is None or not (ns.out / "run.json").exists():
        parser.error("--resume needs --out pointing at the folder of an earlier run.")
    return ns.out, json.loads((ns.out / "run.json").read_text())


def cmd_train(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    out, run = resumed_run(ns, parser) if ns.resume else new_run(ns, parser)
    args = RLHFArgs.from_dict(run["args"])
    console = Console()
    console.print(f"[bold]minirlhf train[/]: {run['preset']} -> {out}", soft_wrap=True)
    device = loading.pick_device(args.device)
    reward_fn = make_reward_fn(run["reward"], device)
    trainer = RLHFTrainer(args, reward_fn, prompts=make_prompts(run["reward"], args),
                          console=console, table_every=ns.table_every)
    extra: dict = {}
    if ns.resume:
        checkpoint = load_checkpoint(out, map_location=trainer.device)
        trainer.load_state_dict(checkpoint["trainer"])
        extra = checkpoint["extra"]
        # Phases after the checkpoint are re-run, so their old metric lines go.
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in trainer.history))
        console.print(f"Resumed at phase {trainer.phase} of {args.total_phases}.")

    def on_phase_end(trainer: RLHFTrainer, metrics: dict[str, float]):
        append_metrics(out / "metrics.jsonl", metrics)
        if "before" not in extra:
            extra["before"] = (trainer.last_samples, trainer.last_rewards)
        extra["after"] = (trainer.last_samples, trainer.last_rewards)
        if trainer.phase % ns.checkpoint_every == 0 or trainer.phase == args.total_phases:
            save_checkpoint(trainer, out, extra)
            plot_metrics(trainer.history, out / PLOT_NAME, title=run["preset"])

    try:
        trainer.train(on_phase_end, wandb_kwargs={"mode": ns.wandb_mode, "dir": str(out)})
    except BaseException:
        save_after_crash(trainer, out, extra, console)
        raise
    finish_run(trainer, out, extra, console)


def save_after_crash(trainer: RLHFTrainer, out: Path, extra: dict, console: Console):
    """Keep every completed phase: outside a learning phase the weights are consistent."""
    if trainer.updating or trainer.phase == 0:
        console.print("[red]Stopped mid-update: the last checkpoint in the run folder stands.")
        return
    trainer.set_rng_state(trainer.rng_at_boundary)
    save_checkpoint(trainer, out, extra)
    console.print(f"[yellow]Stopped: saved phase {trainer.phase} to {out / 'checkpoint.pt'}. "
                  f"Continue with: minirlhf train --out {out} --resume", soft_wrap=True)


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
    if not (ns.run / "run.json").exists():
        parser.error(f"{ns.run} is not a run folder (no run.json): pass the --out of a training.")
    run = json.loads((ns.run / "run.json").read_text())
    args = RLHFArgs.from_dict(run["args"])
    device = loading.pick_device(ns.device)
    checkpoint = load_checkpoint(ns.run, map_location=device)
    model = TransformerWithValueHead(loading.load_policy(args.base_model, device))
    prompt = ns.prompt or args.prefix
    settings = dict(batch_size=ns.num_samples, gen_len=ns.gen_len or args.gen_len,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    prepend_bos=args.prepend_bos, seed=ns.seed)
    columns = {}
    if ns.compare:
        columns["before training"] = get_samples(model.base_model, prompt, **settings).samples
    model.load_state_dict(checkpoint["trainer"]["model"])
    columns[f"after {checkpoint['trainer']['phase']} phases"] = get_samples(
        model.base_model, prompt, **settings).samples
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


def main(argv: list[str] | None = None):
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "train":
        cmd_train(ns, parser)
    else:
        cmd_sample(ns, parser)


if __name__ == "__main__":
    main(sys.argv[1:])
