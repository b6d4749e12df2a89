"""`minirlhf export`: a run's trained policy as a Hugging Face model folder, checked
by log-probs."""

import argparse
from pathlib import Path

from rich.console import Console

from minirlhf.args import RLHFArgs
from minirlhf.cli.provenance import add_accept_flag
from minirlhf.cli.run_folder import load_run_policy, new_folder
from minirlhf.runtime.device import pick_device
from minirlhf.runtime.export import compare_logprobs, export_hf
from minirlhf.runtime.export_checks import ExportError


def add_export_parser(commands):
    export = commands.add_parser("export", help="write a run's trained policy as a Hugging Face "
                                 "model folder (AutoModelForCausalLM.from_pretrained loads it)")
    export.add_argument("--run", type=Path, required=True,
                        help="the folder of a `minirlhf train`, `dpo` or `sft` run")
    export.add_argument("--out", type=Path, required=True, help="the model folder to write")
    export.add_argument("--force", action="store_true",
                        help="replace a model folder already in --out")
    export.add_argument("--drop-unembed-bias", action="store_true",
                        help="export even when the policy's unembedding bias differs between "
                        "tokens (GPT-2 and Llama have none): log-probs change by up to its spread")
    export.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    add_accept_flag(export)


def cmd_export(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    """Load the run's policy, write it to a scratch folder beside --out, check transformers
    reads the same log-probs from it, then move it into place."""
    console = Console()
    trained = load_run_policy(ns.run, pick_device(ns.device), ns.accept_changed_inputs)
    if trained.note:
        console.print(f"[yellow]{trained.note}", soft_wrap=True)
    prepend_bos = RLHFArgs.from_dict(trained.run["args"]).prepend_bos
    with new_folder(ns.out, ns.force) as scratch:
        try:
            exported = export_hf(trained.policy, scratch, ns.drop_unembed_bias, prepend_bos)
        except ExportError as error:
            parser.exit(1, f"minirlhf export: error: {error}\n")
        difference = compare_logprobs(trained.policy, scratch)
    unit = "steps" if "dpo" in trained.run or "sft" in trained.run else "phases"
    console.print(f"[bold]minirlhf export[/]: {ns.run} (after {trained.phase} {unit}) -> "
                  f"{ns.out}, a {exported.architecture} model. Largest log-prob difference "
                  f"in transformers: {difference:.2g}.", soft_wrap=True)
    for note in exported.notes:
        console.print(f"[yellow]{note}", soft_wrap=True)
    console.print(f"Load it: AutoModelForCausalLM.from_pretrained({str(ns.out)!r})",
                  soft_wrap=True)
