"""`minirlhf sample`: continuations from a trained run's policy, scored, beside the base model's."""

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from minirlhf.args import RLHFArgs
from minirlhf.cli.presets import make_reward_fn
from minirlhf.cli.provenance import add_accept_flag
from minirlhf.cli.run_folder import load_run_policy
from minirlhf.rewards import get_rewards
from minirlhf.runtime import loading
from minirlhf.runtime.device import pick_device
from minirlhf.sampling import SamplingConfig, get_samples


def add_sample_parser(commands):
    sample = commands.add_parser("sample", help="print continuations from a trained run")
    sample.add_argument("--run", type=Path, required=True, help="the run folder of a training")
    sample.add_argument("--prompt", help="prompt (default: the run's prefix)")
    sample.add_argument("-n", "--num-samples", type=int, default=8)
    sample.add_argument("--gen-len", type=int, help="tokens to generate (default: the run's)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    add_accept_flag(sample)
    sample.add_argument("--compare", action="store_true",
                        help="also sample the model as it was before training")


def cmd_sample(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    device = pick_device(ns.device)
    trained = load_run_policy(ns.run, device, ns.accept_changed_inputs)
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
        columns["before training"] = get_samples(base_model, prompt, **settings).texts
    columns[f"after {trained.phase} phases"] = get_samples(
        trained.policy, prompt, **settings).texts
    # Control-token rewards need the control token, which a free prompt may not have; an SFT
    # run has no reward ("none").
    scored = run["reward"]["kind"] not in ("control", "none")
    reward_fn = make_reward_fn(run["reward"], device) if scored else None
    table = Table(*columns, title=f"{ns.run}: {prompt!r}", show_lines=True)
    for row in zip(*columns.values()):
        if reward_fn is not None:
            rewards = get_rewards(reward_fn, list(row))
            row = [f"[{r:+.2f}] {text}" for r, text in zip(rewards.tolist(), row)]
        table.add_row(*map(Text, row))  # Text: model output is not rich markup
    Console().print(table)
