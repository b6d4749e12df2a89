"""`minirlhf preferences`: RLAIF preference pairs (JSONL): two samples of a policy, a judge
prefers one."""

import argparse
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from minirlhf.cli.presets import make_reward_fn
from minirlhf.runtime import loading
from minirlhf.runtime.device import pick_device


def add_preferences_parser(commands):
    prefs = commands.add_parser("preferences", help="write RLAIF preference pairs (JSONL): "
                                "two samples of the policy, the judge prefers one")
    prefs.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    prefs.add_argument("--force", action="store_true", help="replace a file already at --out")
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



def check_out(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    """Refuse, before any sampling, an --out that is a link, a folder, or (without --force) a
    file already there."""
    if ns.out.is_symlink():
        parser.error(f"{ns.out} is a symbolic link: pick another --out (its target is left "
                     "alone).")
    if ns.out.is_dir():
        parser.error(f"{ns.out} is a folder: --out names the JSONL file to write.")
    if ns.out.exists() and not ns.force:
        parser.error(f"{ns.out} already exists: pick another --out, or add --force to replace "
                     "it.")
    if not ns.out.parent.is_dir():
        parser.error(f"{ns.out.parent} is not a folder: create it, or pick another --out.")


def cmd_preferences(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    from minirlhf.pairs.preferences import make_preferences, write_preferences

    if ns.batch_size < 2 or ns.batch_size % 2:
        parser.error(f"--batch-size must be even (two samples a pair), got {ns.batch_size}.")
    check_out(ns, parser)
    device = pick_device(ns.device)
    judge_spec = {"kind": ns.judge, "direction": ns.direction, "char": ns.char}
    console = Console()
    with console.status(f"sampling pairs from {ns.base_model}, judged by {ns.judge}"):
        preferences = make_preferences(
            loading.load_policy(ns.base_model, device), make_reward_fn(judge_spec, device),
            ns.prompt or ["This movie was"], ns.num_pairs, gen_len=ns.gen_len,
            batch_size=ns.batch_size, min_gap=ns.min_gap, margin=ns.margin, seed=ns.seed,
            prepend_bos=ns.prepend_bos)
    tmp = ns.out.with_name(f".{ns.out.name}.tmp-{os.getpid()}")
    try:  # a temporary name, then a rename: an interrupted write leaves the old file whole
        write_preferences(preferences, tmp)
        os.replace(tmp, ns.out)
    finally:
        tmp.unlink(missing_ok=True)
    table = Table("chosen", "rejected", title=f"{len(preferences)} pairs -> {ns.out}",
                  show_lines=True)
    for p in preferences[:4]:
        table.add_row(Text(f"[{p.chosen_score:+.2f}] {p.chosen_text}"),
                      Text(f"[{p.rejected_score:+.2f}] {p.rejected_text}"))
    console.print(table)
    console.print(f"Train a reward model on it: minirlhf reward-model --data {ns.out} "
                  f"--base-model {ns.base_model} --out runs/reward-model", soft_wrap=True)
