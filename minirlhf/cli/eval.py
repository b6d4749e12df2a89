"""`minirlhf eval`: a run's policy (or a base model) judged on held-out prompts: mean reward,
sequence-level KL to the reference, fluency. A thin wrapper around `evaluation.evaluate_policy`.

It loads the run's policy as `sample` does (a LoRA run's adapters merged, a DPO run's weights),
and its base model as the reference; with `--base`, the base model alone (KL 0: the point a
frontier starts from). The answers go to `eval.json` (`eval-base.json`, `eval-<tag>.json`) in
the run folder, written under the run lock, and a table with a few of them is printed.
"""

import argparse
import math
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from minirlhf.args import RLHFArgs
from minirlhf.cli.presets import PRESETS, make_reward_fn
from minirlhf.cli.provenance import add_accept_flag
from minirlhf.cli.run_folder import (
    RunFolderError,
    load_run_policy,
    locked,
    read_run_json,
    write_json,
)
from minirlhf.evaluation import EvalSettings, evaluate_policy
from minirlhf.prompts import Prompt, load_prompt_split
from minirlhf.runtime import loading
from minirlhf.runtime.device import pick_device

TAG = re.compile(r"[A-Za-z0-9_.-]+")


def add_eval_parser(commands):
    ev = commands.add_parser("eval", help="judge a run on held-out prompts: reward, KL to the "
                             "reference, fluency")
    ev.add_argument("--run", type=Path, help="the folder of a `minirlhf train` or `dpo` run")
    ev.add_argument("--base", action="store_true",
                    help="judge the base model (of --run, or of --preset) instead of the policy")
    ev.add_argument("--preset", choices=sorted(PRESETS),
                    help="with --base and --out, no run: the preset's base model and reward")
    ev.add_argument("--out", type=Path, help="with --preset: the folder eval-base.json goes to")
    ev.add_argument("--tag", help="write eval-TAG.json (default eval.json, eval-base.json)")
    ev.add_argument("--prompts", help='prompt file ("reviews" or a path) instead of the run\'s')
    ev.add_argument("--max-prompts", type=int, default=32,
                    help="held-out prompts to answer, the first of the split (default 32)")
    ev.add_argument("--samples-per-prompt", type=int, default=4, help="default 4")
    ev.add_argument("--batch-size", type=int, default=32, help="answers at a time (default 32)")
    ev.add_argument("--gen-len", type=int, help="tokens per answer (default: the run's)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--reward", choices=["vader", "classifier", "char_count"],
                    help="judge with this reward instead of the run's")
    ev.add_argument("--direction", choices=["pos", "neg"], help="the reward's sentiment")
    ev.add_argument("--show", type=int, default=4, help="answers printed (default 4)")
    ev.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    add_accept_flag(ev)


def cmd_eval(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    check_flags(ns, parser)
    device = pick_device(ns.device)
    run, folder = get_run(ns)
    args = RLHFArgs.from_dict(run["args"])
    try:
        reward_fn = make_reward_fn(get_reward_spec(run["reward"], ns), device)
        settings = EvalSettings.from_args(
            args, samples_per_prompt=ns.samples_per_prompt, batch_size=ns.batch_size,
            seed=ns.seed, **({"gen_len": ns.gen_len} if ns.gen_len else {}))
    except ValueError as error:
        parser.error(str(error))
    records = get_records(args, ns.prompts, ns.max_prompts)
    reference = loading.load_policy(args.base_model, device)
    if ns.base:
        policy, what = reference, f"{args.base_model} (base model)"
    else:
        trained = load_run_policy(ns.run, device, ns.accept_changed_inputs)
        policy, what = trained.policy, f"{ns.run} after {trained.phase} phases"
    result = evaluate_policy(policy, reference, records, reward_fn, settings)
    result |= {"what": what, "prompts": ns.prompts or args.prompts, "reward": run["reward"]}
    path = folder / file_name(ns)
    with locked(folder, "eval"):
        write_json(path, to_json(result))
    print_result(result, path, ns.show)


def check_flags(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    """The flags name one thing to judge and one place to write; counts are positive."""
    if (ns.run is None) == (ns.preset is None):
        parser.error("give --run DIR (a run's policy, or with --base its base model) or "
                     "--preset NAME --base --out DIR (a preset's base model).")
    if ns.preset is not None and (not ns.base or ns.out is None):
        parser.error("--preset judges a base model without a run: add --base and --out DIR.")
    if ns.out is not None and ns.preset is None:
        parser.error("--out goes with --preset: a run's results go into its folder (--run).")
    if ns.tag is not None and not TAG.fullmatch(ns.tag):
        parser.error(f"--tag {ns.tag!r}: use letters, digits, '_', '.' and '-' only.")
    for flag in ("max_prompts", "samples_per_prompt", "batch_size", "gen_len"):
        value = getattr(ns, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}.")


def get_run(ns: argparse.Namespace) -> tuple[dict, Path]:
    """The run.json to judge by (a preset's, for --preset) and the folder results go to."""
    if ns.preset is not None:
        preset = PRESETS[ns.preset]
        args = RLHFArgs(**preset["args"])
        return {"args": args.to_dict(), "reward": dict(preset["reward"])}, ns.out
    if not (ns.run / "run.json").is_file():
        raise RunFolderError(f"{ns.run} is not a run folder (no run.json): pass the --out of "
                             "`minirlhf train` or `minirlhf dpo`.")
    return read_run_json(ns.run / "run.json"), ns.run


def get_reward_spec(spec: dict, ns: argparse.Namespace) -> dict:
    """The run's reward spec with --reward and --direction on top, without the repetition
    penalty a run may have trained with (the judge alone: repetition has its own column).
    Control-token rewards read a control token that held-out prompts do not carry: refused."""
    spec = {key: value for key, value in spec.items() if key != "repeat_penalty"}
    if ns.reward is not None:
        spec = {"kind": ns.reward, "direction": spec.get("direction", "pos")}
        if ns.reward == "classifier":
            spec["classifier"] = "lvwerra/distilbert-imdb"
    if ns.direction is not None:
        spec["direction"] = ns.direction
    if spec["kind"] == "control":
        raise ValueError("this run's reward reads control tokens that held-out prompts do not "
                         "carry: judge it with --reward vader (or classifier).")
    return spec


def get_records(args: RLHFArgs, prompts: str | None, max_prompts: int) -> list[Prompt]:
    """The first `max_prompts` held-out prompts of the run's split (of `prompts` if given,
    split as the run split its own); the run's prefix when it had no prompt file."""
    _, held_out = load_prompt_split(prompts or args.prompts, args.held_out_fraction, args.seed)
    return held_out[:max_prompts] or [{"prompt": args.prefix}]


def file_name(ns: argparse.Namespace) -> str:
    if ns.tag is not None:
        return f"eval-{ns.tag}.json"
    return "eval-base.json" if ns.base else "eval.json"


def to_json(value):
    """The result with NaN (a measure with nothing to measure) as null: strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_json(item) for item in value]
    return value


def print_result(result: dict, path: Path, show: int):
    """The metrics, then `show` answers spread over the prompts (model text printed literally)."""
    console = Console()
    metrics = Table("measure", "value", title=f"{result['what']}: "
                    f"{result['settings']['num_prompts']} held-out prompts x "
                    f"{result['settings']['samples_per_prompt']} answers")
    for key, value in result["metrics"].items():
        metrics.add_row(key, f"{value:.4f}")
    console.print(metrics)
    answers = result["answers"]
    table = Table("reward", "KL", "prompt", "answer", show_lines=True)
    for answer in answers[:: max(1, len(answers) // max(show, 1))][:show]:
        table.add_row(f"{answer['reward']:+.3f}", f"{answer['kl']:.2f}",
                      Text(answer["prompt"][-60:]), Text(answer["response"]))
    console.print(table)
    console.print(f"Wrote {path}", soft_wrap=True)
