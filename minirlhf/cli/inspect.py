"""`minirlhf inspect`: what RL changed inside a run's policy, compared with its base model.

A thin wrapper: it loads the run's trained policy (LoRA merged) and its reference (the run's base
model), runs `minirlhf.inspection` on held-out prompts and neutral text, and hands the findings to
`cli.inspect_report`, which writes report.md, inspect.json and the figures into --out (default
RUN/inspect) and prints a summary.
"""

import argparse
import time
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from minirlhf import inspection
from minirlhf.args import RLHFArgs
from minirlhf.cli.checkpoint import load_checkpoint
from minirlhf.cli.inspect_report import Findings, print_summary, write_report
from minirlhf.cli.presets import make_reward_fn
from minirlhf.cli.provenance import add_accept_flag
from minirlhf.cli.run_folder import load_run_policy
from minirlhf.models import TransformerWithValueHead
from minirlhf.prompts import load_prompt_split, render_prompts
from minirlhf.runtime.device import pick_device
from minirlhf.sampling import SamplingConfig, get_samples

NEUTRAL_TEXT = (
    "The river runs through the middle of the town, and a stone bridge crosses it near the old "
    "market. On most days the shops open at nine and close at six. The library keeps its books "
    "on three floors, and the reading room looks out over a small garden with a few trees. "
    "Trains to the city leave every hour from the station on the north side of the square."
)
"""Text with nothing to like or dislike: the activation-difference lens averages over it."""

POSITIVE_WORDS = [" good", " great", " best", " love", " wonderful", " excellent", " beautiful",
                  " fun", " perfect", " amazing"]
NEGATIVE_WORDS = [" bad", " worst", " boring", " hate", " awful", " terrible", " poor", " waste",
                  " stupid", " horrible"]
"""The reward-relevant tokens of the sentiment rewards (each word's first token)."""


def add_inspect_parser(commands):
    inspect = commands.add_parser("inspect", help="what training changed inside a run's policy: "
                                  "weights, tokens, the direction learnt, the reward's sources")
    inspect.add_argument("--run", type=Path, required=True,
                         help="the folder of a `minirlhf train` or `minirlhf dpo` run")
    inspect.add_argument("--out", type=Path, help="the report folder (default: RUN/inspect)")
    inspect.add_argument("--prompts", type=int, default=16,
                         help="held-out prompts to sample an answer to (default 16)")
    inspect.add_argument("--layers", help="comma-separated blocks to steer at (default: 3 spread "
                         "over the blocks whose output training moved)")
    inspect.add_argument("--scales", default="1,2,4",
                         help="multiples of the mean difference to steer with (default 1,2,4)")
    inspect.add_argument("--seed", type=int, default=0)
    inspect.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    add_accept_flag(inspect)


def cmd_inspect(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    start = time.perf_counter()
    device = pick_device(ns.device)
    trained = load_run_policy(ns.run, device, ns.accept_changed_inputs, keep_base=True)
    args, reference = RLHFArgs.from_dict(trained.run["args"]), trained.base
    try:
        layers = parse_layers(ns.layers, reference.cfg.n_layers)
        scales = [float(s) for s in ns.scales.split(",")]
    except ValueError as error:
        parser.error(f"--layers/--scales: {error}")
    findings = inspect_run(ns, trained.policy, reference, args, trained.run, layers, scales)
    findings.notes += [trained.note] if trained.note else []
    findings.seconds = time.perf_counter() - start
    out = ns.out or ns.run / "inspect"
    write_report(out, findings)
    print_summary(findings, out)


def parse_layers(text: str | None, n_layers: int) -> list[int] | None:
    """The blocks named in `text` (None: `steering_layers` picks them)."""
    if not text:
        return None
    layers = [int(x) for x in text.split(",")]
    if not all(0 <= layer < n_layers for layer in layers):
        raise ValueError(f"blocks are 0 to {n_layers - 1}, got {text!r}")
    return layers


def steering_layers(difference_norms: list[float], count: int = 3) -> list[int]:
    """`count` blocks spread from the first whose output moved to the last: below the first
    trained block (LoRA on the top blocks, a frozen trunk) the difference is exactly zero, and
    steering with it would sample the reference again."""
    moved = [layer for layer, norm in enumerate(difference_norms)
             if norm > 1e-6 * max(difference_norms)] or list(range(len(difference_norms)))
    return sorted({moved[round(i * (len(moved) - 1) / (count - 1))] for i in range(count)})


def get_prompts(args: RLHFArgs, model: HookedTransformer, n: int) -> list[str]:
    """`n` held-out prompts of the run (repeated if there are fewer), rendered as in training;
    the run's prefix when it had no prompt file."""
    _, held_out = load_prompt_split(args.prompts, args.held_out_fraction, args.seed)
    if not held_out:
        return [args.prefix] * n
    rendered = render_prompts(held_out, args.prompt_template, args.chat_template, model.tokenizer)
    return [rendered[i % len(rendered)] for i in range(n)]


def inspect_run(ns, policy: HookedTransformer, reference: HookedTransformer, args: RLHFArgs,
                run: dict, layers: list[int] | None, scales: list[float]) -> Findings:
    """Every analysis of `minirlhf.inspection`, on the run's held-out prompts and neutral text."""
    checkpoint = load_checkpoint(ns.run, map_location=policy.W_U.device).trainer["model"]
    prompts = get_prompts(args, reference, ns.prompts)
    samples = get_samples(policy, prompts, gen_len=args.gen_len, prepend_bos=args.prepend_bos,
                          sampling=SamplingConfig(), seed=ns.seed)
    neutral = policy.to_tokens(NEUTRAL_TEXT, prepend_bos=args.prepend_bos)[:, :policy.cfg.n_ctx]
    difference = inspection.get_mean_activation_difference(policy, reference, neutral,
                                                           skip=int(args.prepend_bos))
    findings = Findings(
        run=str(ns.run), base_model=args.base_model, kind=describe_run(run, args),
        changes=inspection.get_weight_changes(reference, policy),
        lora=get_lora_spectra(checkpoint, args.lora_alpha / max(args.lora_rank, 1)),
        tokens=inspection.get_token_changes(policy, reference, samples),
        answers=[policy.to_str_tokens(row) for row in samples.sample_ids[:, samples.prefix_len:]],
        lens=[inspection.top_tokens(reference, logits, 8)
              for logits in inspection.apply_logit_lens(reference, difference)],
        difference_norms=difference.norm(dim=-1).tolist(), layers=layers, scales=scales)
    findings.layers = layers or steering_layers(findings.difference_norms)
    findings.token_shifts = top_and_bottom(reference, inspection.rank_token_shifts(
        findings.tokens.gen_tokens, findings.tokens.logprob_shift, min_count=2))
    measure_steering(findings, run, args, reference, prompts, samples, difference, ns.seed)
    attribute_reward(findings, run, policy, reference, samples)
    read_value_head(findings, checkpoint, policy, reference, samples)
    return findings


def describe_run(run: dict, args: RLHFArgs) -> str:
    algorithm = "DPO" if "dpo" in run else f"PPO ({args.advantage_estimator})"
    trains = (f"LoRA rank {args.lora_rank}" if args.lora_rank else "every weight"
              if args.trainable_layers is None else f"the top {args.trainable_layers} blocks")
    return f"{algorithm}, {trains}"


def get_lora_spectra(state: dict[str, torch.Tensor], scale: float) -> dict[str, list[float]]:
    """The singular values of each LoRA adapter in a checkpoint's state, by "{layer}_{target}"."""
    prefix = "base_model.lora.adapters."
    keys = sorted(k.removeprefix(prefix)[:-2] for k in state if k.startswith(prefix)
                  and k.endswith(".A"))
    return {key: inspection.calc_lora_singular_values(
        state[f"{prefix}{key}.A"], state[f"{prefix}{key}.B"], scale).tolist() for key in keys}


def top_and_bottom(model: HookedTransformer, shifts: inspection.TokenShifts,
                   k: int = 8) -> tuple[list, list]:
    """(token, mean shift, count) of the k tokens that rose most and the k that fell most."""
    rows = [(model.to_single_str_token(int(i)), m, int(c))
            for i, m, c in zip(shifts.token_ids, shifts.mean_shift.tolist(), shifts.counts)]
    return rows[:k], rows[::-1][:k]


def measure_steering(findings, run, args, reference, prompts, samples, difference, seed):
    """The reward of the trained policy (on `samples`, its answers to `prompts`), the reference
    and the steered reference (control-token rewards are not measured: they need the control
    prompts). The reference is one more copy of the steering batch, steered by 0."""
    if run.get("reward", {}).get("kind") in (None, "control"):
        findings.notes.append("No reward measured: the run's reward needs control prompts.")
        return
    reward_fn = make_reward_fn(run["reward"], reference.W_U.device)
    findings.trained_reward = inspection.get_copy_rewards(samples, reward_fn).item()
    grid = [(layer, scale) for layer in findings.layers for scale in findings.scales]
    with inspection.steering_grid(reference, difference, grid + [(0, 0.0)]):
        rewards = inspection.get_mean_rewards(reference, prompts, reward_fn, args.gen_len,
                                              args.prepend_bos, seed, copies=len(grid) + 1)
    findings.reference_reward = rewards[-1].item()
    findings.steering = rewards[:-1].view(len(findings.layers), len(findings.scales)).tolist()


def attribute_reward(findings, run, policy, reference, samples):
    """Direct logit attribution of the reward's tokens, on the trained policy's answers."""
    reward = run.get("reward") or {}
    if reward.get("kind") == "char_count":
        promoted, suppressed = [reference.to_tokens(reward.get("char", "."), prepend_bos=False)
                                [0, 0].item()], None
        findings.reward_tokens = f"{reward.get('char', '.')!r} minus the mean token"
    elif reward.get("kind") in ("vader", "classifier", "reward_model", "control"):
        words = (POSITIVE_WORDS, NEGATIVE_WORDS)
        words = words if reward.get("direction", "pos") == "pos" else words[::-1]
        promoted, suppressed = ([reference.to_tokens(w, prepend_bos=False)[0, 0].item()
                                 for w in group] for group in words)
        findings.reward_tokens = f"{', '.join(words[0][:4])}, ... minus {', '.join(words[1][:4])}"
    else:
        return
    direction = inspection.get_reward_direction(reference, promoted, suppressed)
    findings.attribution = {
        name: inspection.get_logit_attribution(model, samples.sample_ids, direction,
                                               samples.attention_mask)
        for name, model in [("reference", reference), ("trained", policy)]}


def read_value_head(findings, state, policy, reference, samples):
    """Which generated tokens move the value head's estimate most, where the run has one."""
    head = {k.removeprefix("value_head."): v for k, v in state.items()
            if k.startswith("value_head.")}
    if not head:
        return
    critic = TransformerWithValueHead(policy)
    critic.value_head.load_state_dict(head)
    with torch.no_grad():
        _, values = critic(samples.sample_ids, samples.attention_mask)
    responses = inspection.get_value_responses(values, samples.prefix_len)
    findings.value_shifts = top_and_bottom(reference, inspection.rank_token_shifts(
        samples.sample_ids[:, samples.prefix_len:], responses, min_count=2))

