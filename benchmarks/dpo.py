"""Benchmark: DPO vs reward model + PPO on the same VADER-judged SmolLM2 pairs, side by side.

1. Prompts: the shipped review openings (`--prompts reviews`), split as the trainer splits them
   (RLHFArgs' held_out_fraction and seed). Pairs are made on the training prompts only; every
   score below is measured on the held-out prompts, which neither method ever trains on.
2. Pairs: SmolLM2-135M's own continuations, two per prompt, judged by VADER (positive wins;
   gaps of `--min-gap` or less are ties and dropped): `minirlhf.pairs.preferences.make_preferences`,
   what `minirlhf preferences` runs. Saved to `<work>/preferences.jsonl` and reused.
3. DPO on those pairs (`train_dpo`; LoRA rank 16 on the top 8 blocks, as the PPO preset).
4. Reward model + PPO: a reward model trained on the same pairs (`fit_reward_model`), then PPO
   with the `smollm2-vader` preset on the same training prompts, the reward model as reward.

Each policy, and the base model before either, is measured the same way: `--samples` samples (20
tokens, seed 0) of every held-out prompt, their mean VADER score, and the KL to the base model per
sequence, estimated as the mean over those samples of log pi(y|x) - log pi_ref(y|x) (unbiased:
the samples are the policy's own). Times are wall seconds of each method's training alone.

    python benchmarks/dpo.py                                   # pairs, DPO, RM + PPO
    python benchmarks/dpo.py --skip-ppo --dpo-set lr=5e-4      # DPO alone, another setting
    python benchmarks/dpo.py --report-only                     # the saved table

Target (issue 16): DPO lifts held-out mean VADER from the base model's (about 0.15) to at least
0.6 in at most 10 minutes of training, with fluent samples.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from minirlhf.args import RLHFArgs
from minirlhf.cli.presets import PRESETS
from minirlhf.models import run_model
from minirlhf.pairs.dpo import get_sequence_logprobs
from minirlhf.pairs.dpo_training import DPOArgs, train_dpo
from minirlhf.pairs.preferences import (
    make_preferences,
    read_preferences,
    split_preferences,
    write_preferences,
)
from minirlhf.pairs.reward_model import make_reward_model_reward_fn
from minirlhf.pairs.reward_training import RewardModelArgs, fit_reward_model
from minirlhf.prompts import load_prompts, prompt_text, resolve_prompt_file, split_prompts
from minirlhf.runtime import lora
from minirlhf.runtime.device import describe_cpu
from minirlhf.runtime.loading import load_policy
from minirlhf.sampling import get_samples
from minirlhf.sentiment import make_vader_reward, vader_compound
from minirlhf.trainer import RLHFTrainer

PPO_ARGS = {**PRESETS["smollm2-vader"]["args"], "prompts": "reviews", "total_phases": 25}
DPO_ARGS = dict(base_model="smollm2", trainable_layers=8, lora_rank=16, lora_alpha=32.0,
                lr=5e-4, beta=0.1, epochs=2, batch_size=8, eval_every=40)
RM_ARGS = dict(base_model="smollm2", trainable_layers=10, epochs=2, batch_size=16, lr=1e-4,
               head_lr=1e-2, eval_every=40, normalize_samples=64,
               normalize_prompt="This movie was")
TARGET = 0.6


def held_out_split(seed: int) -> tuple[list[str], list[str]]:
    """The shipped prompts' training and held-out split, as the PPO trainer draws it (their
    text: the shipped records are plain prompts)."""
    args = RLHFArgs(**{**PPO_ARGS, "seed": seed})
    train, held_out = split_prompts(load_prompts(resolve_prompt_file("reviews")),
                                    args.held_out_fraction, args.seed)
    return [prompt_text(r) for r in train], [prompt_text(r) for r in held_out]


@torch.no_grad()
def measure(policy, prompts: list[str], n: int, gen_len: int) -> dict:
    """Mean VADER of n samples of every prompt, the KL estimate per sequence, a few samples.
    The reference is the policy with its LoRA adapters off (the base model)."""
    rows = [prompt for prompt in prompts for _ in range(n)]
    vader, kl, texts = [], [], []
    for start in range(0, len(rows), 32):
        out = get_samples(policy, rows[start : start + 32], None, gen_len, seed=start)
        response = torch.zeros_like(out.attention_mask)
        response[:, out.prefix_len :] = 1
        logits, _ = run_model(policy, out.sample_ids, out.attention_mask, True)
        with lora.adapters_off(policy):
            ref_logits, _ = run_model(policy, out.sample_ids, out.attention_mask, True)
        logps = [get_sequence_logprobs(x, out.sample_ids, out.attention_mask, response)
                 for x in (logits, ref_logits)]
        vader.append(vader_compound(out.texts))
        kl.append(logps[0] - logps[1])
        texts += out.texts
    vader_all = torch.cat(vader)
    return {"vader": vader_all.mean().item(), "kl_per_sequence": torch.cat(kl).mean().item(),
            "samples": [[t, v] for t, v in zip(texts[::n][:8], vader_all[::n][:8].tolist())]}


def get_pairs(ns, train_prompts: list[str], console: Console) -> tuple[list, dict]:
    """The VADER-judged pairs on the training prompts (made once, then read from --work)."""
    path = ns.work / "preferences.jsonl"
    figures = ns.work / "preferences.json"
    if path.is_file() and figures.is_file():
        return read_preferences(path), json.loads(figures.read_text())
    start = time.perf_counter()
    pairs = make_preferences(load_policy("smollm2"), make_vader_reward("pos"), train_prompts,
                             num_pairs=ns.pairs, gen_len=ns.gen_len, batch_size=64,
                             min_gap=ns.min_gap, seed=0)
    write_preferences(pairs, path)
    gaps = [p.chosen_score - p.rejected_score for p in pairs]
    info = {"pairs": len(pairs), "prompts": len({p.prompt for p in pairs}),
            "min_gap": ns.min_gap, "mean_gap": sum(gaps) / len(gaps),
            "seconds": time.perf_counter() - start}
    figures.write_text(json.dumps(info, indent=1))
    console.print(f"{len(pairs)} pairs in {info['seconds']:.0f} s -> {path}")
    return pairs, info


def run_dpo(ns, pairs: list, held_out: list[str], console: Console) -> dict:
    """DPO from the base model on the pairs; its training time and measurements."""
    args = DPOArgs(**{**DPO_ARGS, **ns.dpo_set})
    train, heldout_pairs = split_preferences(pairs, args.heldout_fraction, args.seed)
    policy = load_policy("smollm2")
    start = time.perf_counter()
    history = train_dpo(policy, train, heldout_pairs, args, console)
    seconds = time.perf_counter() - start
    final = {k: v for k, v in history[-1].items() if k.startswith("heldout/")}
    return {"args": args.to_dict(), "train_seconds": seconds, "steps": len(history),
            "pairs": [len(train), len(heldout_pairs)], "final": final,
            "after": measure(policy, held_out, ns.samples, ns.gen_len)}


def run_rm_ppo(ns, pairs: list, held_out: list[str], console: Console) -> dict:
    """A reward model on the pairs, then PPO against it; times and measurements."""
    rm_args = RewardModelArgs(**{**RM_ARGS, **ns.rm_set})
    train, heldout_pairs = split_preferences(pairs, rm_args.heldout_fraction, rm_args.seed)
    policy = load_policy("smollm2")
    start = time.perf_counter()
    trained = fit_reward_model(train, heldout_pairs, rm_args, policy=policy, console=console)
    rm_seconds = time.perf_counter() - start
    args = RLHFArgs(**{**PPO_ARGS, **ns.ppo_set})
    trainer = RLHFTrainer(args, make_reward_model_reward_fn(trained.reward_model),
                          base_model=policy, console=console, table_every=0)
    start = time.perf_counter()
    history = trainer.train()
    ppo_seconds = time.perf_counter() - start
    return {"rm_args": rm_args.to_dict(), "ppo_args": args.to_dict(),
            "rm_seconds": rm_seconds, "ppo_seconds": ppo_seconds,
            "train_seconds": rm_seconds + ppo_seconds,
            "rm_heldout_accuracy": trained.final_heldout["heldout/accuracy"],
            "ppo_kl_per_token": history[-1]["charts/kl"],
            "held_out_reward_per_phase": [m.get("eval/held_out_reward") for m in history],
            "after": measure(trainer.model.base_model, held_out, ns.samples, ns.gen_len)}


def report(result: dict, console: Console):
    """The side-by-side table and a few samples of each policy."""
    table = Table("policy", "held-out VADER", "KL / sequence", "training time", "note",
                  title=f"DPO vs reward model + PPO ({result['pairs']['pairs']} pairs on "
                  f"{result['pairs']['prompts']} training prompts; {result['held_out_prompts']}"
                  " held-out prompts)")
    base = result["base"]
    table.add_row("SmolLM2 (base)", f"{base['vader']:+.3f}", "0", "", "")
    if "dpo" in result:
        dpo = result["dpo"]
        table.add_row("DPO", f"{dpo['after']['vader']:+.3f}",
                      f"{dpo['after']['kl_per_sequence']:.2f}",
                      f"{dpo['train_seconds'] / 60:.1f} min",
                      f"{dpo['steps']} steps; pair accuracy {dpo['final']['heldout/accuracy']:.2f}")
    if "rm_ppo" in result:
        rm = result["rm_ppo"]
        table.add_row("reward model + PPO", f"{rm['after']['vader']:+.3f}",
                      f"{rm['after']['kl_per_sequence']:.2f}",
                      f"{rm['train_seconds'] / 60:.1f} min",
                      f"RM {rm['rm_seconds'] / 60:.1f} min (accuracy "
                      f"{rm['rm_heldout_accuracy']:.2f}), PPO {rm['ppo_seconds'] / 60:.1f} min")
    console.print(table)
    for name in ("base", "dpo", "rm_ppo"):
        if name in result:
            samples = result[name]["samples"] if name == "base" else \
                result[name]["after"]["samples"]
            console.print(f"[bold]{name}[/]")
            for text, vader in samples[:4]:
                console.print(f"  [{vader:+.2f}] {text!r}", soft_wrap=True)


def parse_sets(texts: list[str]) -> dict:
    """FIELD=VALUE overrides; values are read as JSON where they parse (numbers, true, null)."""
    values = {}
    for text in texts:
        key, _, value = text.partition("=")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=640, help="preference pairs to make")
    parser.add_argument("--min-gap", type=float, default=0.3, help="VADER gap below = a tie")
    parser.add_argument("--gen-len", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4, help="samples per held-out prompt")
    parser.add_argument("--seed", type=int, default=1, help="the prompt split's seed")
    parser.add_argument("--skip-dpo", action="store_true")
    parser.add_argument("--skip-ppo", action="store_true")
    parser.add_argument("--dpo-set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--rm-set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--ppo-set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmark-dpo"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dpo_smollm2.json"))
    parser.add_argument("--report-only", action="store_true")
    ns = parser.parse_args()
    console = Console()
    if ns.report_only:
        report(json.loads(ns.out.read_text()), console)
        return
    ns.dpo_set, ns.rm_set, ns.ppo_set = map(parse_sets, (ns.dpo_set, ns.rm_set, ns.ppo_set))
    ns.work.mkdir(parents=True, exist_ok=True)
    machine = {**describe_cpu(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    result = {"machine": machine, "command": vars(ns) | {"work": str(ns.work), "out": str(ns.out)}}
    console.print(result["machine"])
    train_prompts, held_out = held_out_split(ns.seed)
    pairs, result["pairs"] = get_pairs(ns, train_prompts, console)
    result["held_out_prompts"] = len(held_out)
    result["base"] = measure(load_policy("smollm2"), held_out, ns.samples, ns.gen_len)
    if not ns.skip_dpo:
        result["dpo"] = run_dpo(ns, pairs, held_out, console)
    if not ns.skip_ppo:
        result["rm_ppo"] = run_rm_ppo(ns, pairs, held_out, console)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=1))
    report(result, console)


if __name__ == "__main__":
    main()
