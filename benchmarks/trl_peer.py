"""Benchmark: minirlhf's GRPO against Hugging Face TRL's GRPOTrainer, same job, same machine.

Both sides train SmolLM2-135M-Instruct (the same weights: minirlhf's converted model exported to
a Hugging Face folder, checked by comparing log-probs) with GRPO against VADER on the shipped
review prompts: 8 prompts a phase, 4 samples each (batch 32), 20 new tokens, float32, the same
learning rate and schedule, KL coefficient, clipping, entropy bonus and 8 optimiser steps of 8
samples per generated batch. minirlhf runs first in this process, then TRL in its own virtual
environment (`.bench/trl-venv`, made on first use; TRL is not a dependency of minirlhf) through
benchmarks/trl_peer_trl.py. Reported: seconds per phase (one generated batch of 32 and its 8
optimiser steps), samples per second, the ratio minirlhf / TRL, and the mean reward of the last 3
phases, with the CPU, whether it has fast bf16, and every version.

    python benchmarks/trl_peer.py --phases 20              # full weights on both sides
    python benchmarks/trl_peer.py --phases 20 --lora       # LoRA r16 on the top 8 blocks
    python benchmarks/trl_peer.py --phases 3 --side trl    # one side only (smoke runs)
    python benchmarks/trl_peer.py --report-only            # table + plot of saved results

What is matched and what differs: docs/critic_free.md, "Against TRL's GRPOTrainer". Target
(issue 14): minirlhf at least 1.5x TRL's samples per second on this CPU, at the same reward.
"""

import argparse
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from minirlhf.args import RLHFArgs
from minirlhf.cli.presets import MOVIE_ARGS, PRESETS
from minirlhf.cli.report import two_panel_figure
from minirlhf.prompts import (
    get_phase_prompts,
    load_prompts,
    prompt_text,
    resolve_prompt_file,
    split_prompts,
)
from minirlhf.runtime.device import describe_cpu
from minirlhf.runtime.loading import load_policy
from minirlhf.sentiment import make_vader_reward
from minirlhf.trainer import RLHFTrainer, Rollout

REPO = Path(__file__).resolve().parent.parent
TRL_SCRIPT = REPO / "benchmarks" / "trl_peer_trl.py"
TRL_PACKAGES = ["torch==2.13.0", "trl==1.16.0", "transformers==5.24.0", "accelerate==1.15.0",
                "datasets==5.2.0", "peft==0.21.2", "gguf==0.19.0", "vaderSentiment==3.3.2"]
"""What the TRL environment installs (the versions checked here, December 2026)."""
LAST_PHASES = 3
"""The reward "after the same number of samples" is the mean of this many last phases."""
CHECK_SENTENCES = ["This movie was a huge disappointment.",
                   "The acting is wonderful, and the score stays with you for days.",
                   "I went in expecting nothing; I came out wanting to see it again."]
LOGPROB_TOLERANCE = 1e-4
TRAINED = {"full": "every weight trained", "lora": "LoRA r16 on the top 8 blocks"}

JOB_ARGS = dict(
    base_model="smollm2", prompts="reviews", held_out_fraction=0.0, group_size=4, batch_size=32,
    num_minibatches=4, batches_per_learning_phase=2, gen_len=20, advantage_estimator="grpo",
    precision="fp32", temperature=1.0, top_k=None, top_p=None, keep_freed_memory=True,
)
"""Both scopes: GRPO, batch 32 = 8 prompts x 4, 20 tokens, fp32, plain sampling. No prompts
are held out: the held-out evaluation would add minutes to minirlhf's phases that TRL's lack.
minirlhf keeps freed memory for the next step (its setting for speed; it changes no number)."""


def get_args(lora: bool, phases: int, seed: int) -> RLHFArgs:
    """Full weights: the movie presets' settings (LR 1e-4, 2 warmup phases, decay to 0.5, exact
    KL 0.05). LoRA: the offline preset's (rank 16, alpha 32, top 8 blocks, LR 1e-3, to 0.8)."""
    base = PRESETS["smollm2-vader"]["args"] if lora else MOVIE_ARGS
    return RLHFArgs(**{**base, **JOB_ARGS, "total_phases": phases, "seed": seed})


def draw_phase_prompts(args: RLHFArgs, split_seed: int | None = None) -> list[list[str]]:
    """Each phase's distinct prompts, in the order RLHFTrainer draws them (the same split and
    the same generator, seeded seed + 2), so TRL can be fed the same prompts in the same order.
    `split_seed`: the trainer was handed the split made with this seed instead of args.seed's."""
    split_seed = args.seed if split_seed is None else split_seed
    train_prompts, _ = split_prompts(load_prompts(resolve_prompt_file(args.prompts)),
                                     args.held_out_fraction, split_seed)
    generator = torch.Generator().manual_seed(args.seed + 2)
    return [[prompt_text(record) for record in get_phase_prompts(
        train_prompts, args.prompts_per_phase, args.group_size, generator)[:: args.group_size]]
        for _ in range(args.total_phases)]


def run_minirlhf(args: RLHFArgs, phase_prompts: list[list[str]], console: Console) -> dict:
    """Train with RLHFTrainer; per phase the wall seconds (the first from the start of
    `train`, so both sides count their first phase the same way) and the mean reward."""
    trainer = RLHFTrainer(args, make_vader_reward("pos"), base_model=load_policy("smollm2"),
                          console=console, table_every=0)
    times, last = [], [time.perf_counter()]

    def on_phase_end(trainer: RLHFTrainer, rollout: Rollout):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        expected = phase_prompts[len(times) - 1]
        assert all(s.startswith(expected[i // args.group_size])
                   for i, s in enumerate(rollout.texts)), "prompt draws differ from TRL's"
        console.print(f"minirlhf phase {len(times) - 1}: {times[-1]:.1f} s, reward "
                      f"{rollout.metrics['charts/reward_mean']:+.3f}", soft_wrap=True)

    start = time.perf_counter()
    history = trainer.train(on_phase_end=on_phase_end)
    trainable = sum(p.numel() for p in trainer.model.base_model.parameters() if p.requires_grad)
    return {"phase_time_s": times, "wall_time_s": time.perf_counter() - start,
            "reward_mean_per_phase": [m["charts/reward_mean"] for m in history],
            "kl_per_phase": [m["charts/kl"] for m in history],
            "trainable_parameters": trainable, "threads": torch.get_num_threads(),
            "versions": get_versions()}


def get_versions() -> dict[str, str]:
    """minirlhf's side: Python and the packages it trains with."""
    return {"python": sys.version.split()[0],
            **{name: metadata.version(name) for name in ("torch", "transformers",
                                                         "transformer-lens", "vaderSentiment")}}


def ensure_trl_venv(venv: Path, console: Console) -> Path:
    """The TRL environment's python, after creating the environment if it is not there."""
    python = venv / "bin" / "python"
    if not python.exists():
        console.print(f"Creating {venv} with {' '.join(TRL_PACKAGES)}", soft_wrap=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    return python


def run_trl_script(python: Path, mode: str, job: dict, work_dir: Path, threads: int) -> dict:
    """Run benchmarks/trl_peer_trl.py in the TRL environment on `job`; its result."""
    work_dir.mkdir(parents=True, exist_ok=True)
    job_file, result_file = work_dir / f"{mode}-job.json", work_dir / f"{mode}-result.json"
    job_file.write_text(json.dumps(job, indent=1))
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONWARNINGS": "ignore::FutureWarning"}
    subprocess.run([str(python), str(TRL_SCRIPT), mode, str(job_file), str(result_file)],
                   check=True, env=env)
    return json.loads(result_file.read_text())


def prepare_hf_folder(folder: Path, console: Console, base_model: str = "smollm2"):
    """minirlhf's `base_model` exported as a Hugging Face folder (tokenizer adding BOS, as
    minirlhf feeds the policy), made once: the weights both sides start from. A folder whose
    embeddings are tied otherwise than minirlhf's model (exported before minirlhf tied them) is
    made again: both sides train the same parameters."""
    from minirlhf.runtime.export import export_hf
    from minirlhf.runtime.tied import is_tied

    model = load_policy(base_model)
    if (folder / "model.safetensors").exists():
        config = json.loads((folder / "config.json").read_text())
        if config.get("tie_word_embeddings", False) == is_tied(model):
            return
    console.print(f"Exporting {base_model} to {folder}", soft_wrap=True)
    export_hf(model, folder, prepend_bos=True)


@torch.no_grad()
def check_same_weights(python: Path, folder: Path, work_dir: Path, threads: int) -> float:
    """The largest |log-prob difference| over every token of CHECK_SENTENCES between minirlhf's
    SmolLM2 and the folder as TRL's transformers loads it; raises above LOGPROB_TOLERANCE."""
    model = load_policy("smollm2")
    theirs = run_trl_script(python, "logprobs", {"model_dir": str(folder),
                                                 "sentences": CHECK_SENTENCES}, work_dir, threads)
    worst = 0.0
    for sentence, their_logprobs in zip(CHECK_SENTENCES, theirs["logprobs"]):
        tokens = model.to_tokens(sentence)  # BOS first, as in training
        ours = model(tokens).float().log_softmax(-1)[0, :-1].gather(-1, tokens[0, 1:, None])[:, 0]
        assert len(their_logprobs) == len(ours), f"the two tokenise {sentence!r} differently"
        worst = max(worst, (ours - torch.tensor(their_logprobs)).abs().max().item())
    if worst > LOGPROB_TOLERANCE:
        raise RuntimeError(f"The two models differ by {worst:.2e} in log-prob: not the same "
                           f"weights. Delete {folder} to export it again.")
    return worst


def get_trl_job(args: RLHFArgs, phase_prompts: list[list[str]], folder: Path, work_dir: Path,
                threads: int, direction: str = "pos") -> dict:
    """Everything the TRL side needs, from minirlhf's args: the same numbers under TRL's names
    (benchmarks/trl_peer_trl.py:get_config maps them), and the reward's direction."""
    lora = None
    if args.lora_rank:
        n_layers = 30  # SmolLM2-135M's blocks; LoRA on the top trainable_layers of them
        lora = {"rank": args.lora_rank, "alpha": args.lora_alpha,
                "layers": list(range(n_layers - args.trainable_layers, n_layers))}
    return {
        "model_dir": str(folder), "work_dir": str(work_dir / "trainer"), "seed": args.seed,
        "threads": threads, "prompts": [p for phase in phase_prompts for p in phase],
        "phases": args.total_phases, "group_size": args.group_size,
        "minibatch_size": args.minibatch_size, "num_minibatches": args.num_minibatches,
        "batches_per_learning_phase": args.batches_per_learning_phase,
        "steps_per_phase": args.num_minibatches * args.batches_per_learning_phase,
        "gen_len": args.gen_len, "temperature": args.temperature, "learning_rate": args.base_lr,
        "warmup_steps": args.warmup_steps, "final_scale": args.final_scale,
        "max_grad_norm": args.max_grad_norm, "kl_coef": args.kl_coef,
        "clip_coef": args.clip_coef, "ent_coef": args.ent_coef, "lora": lora,
        "direction": direction,
    }


def summarise(side: dict, batch_size: int) -> dict:
    """Seconds per phase (with and without the first), samples per second, final reward."""
    times, rewards = side["phase_time_s"], side["reward_mean_per_phase"]
    after_first = times[1:] or times
    return {
        "s_per_phase": sum(times) / len(times),
        "s_per_phase_after_first": sum(after_first) / len(after_first),
        "samples_per_s": batch_size * len(after_first) / sum(after_first),
        "samples_per_s_with_first": batch_size * len(times) / sum(times),
        "samples": batch_size * len(rewards),
        "reward_first_phase": rewards[0],
        "reward_last_phases": sum(rewards[-LAST_PHASES:]) / len(rewards[-LAST_PHASES:]),
    }


def plot(result: dict, path: Path):
    """Mean reward per phase against samples seen and against wall seconds, both sides."""
    with two_panel_figure(path, title=result["title"], figsize=(11, 4)) as (by_samples, by_time):
        for name in ("minirlhf", "trl"):
            side = result.get(name)
            if side is None:
                continue
            rewards = side["reward_mean_per_phase"]
            samples = [result["batch_size"] * (i + 1) for i in range(len(rewards))]
            seconds = [sum(side["phase_time_s"][: i + 1]) for i in range(len(rewards))]
            label = "minirlhf" if name == "minirlhf" else "TRL GRPOTrainer"
            by_samples.plot(samples, rewards, marker="o", ms=3, label=label)
            by_time.plot(seconds, rewards, marker="o", ms=3, label=label)
        by_samples.set(xlabel="samples", ylabel="mean VADER compound of the phase's samples")
        by_time.set(xlabel="wall seconds", ylabel="mean VADER compound")
        by_samples.legend()
        by_time.legend()


def report(result: dict, console: Console):
    """A table of both sides and the ratio."""
    table = Table("side", "s/phase (after 1st)", "s/phase (all)", "samples/s", "reward phase 0",
                  f"reward, last {LAST_PHASES}", "trainable", title=result["title"])
    for name in ("minirlhf", "trl"):
        if name in result:
            s, trainable = result[name]["summary"], result[name]["trainable_parameters"]
            table.add_row(name, f"{s['s_per_phase_after_first']:.1f}", f"{s['s_per_phase']:.1f}",
                          f"{s['samples_per_s']:.2f}", f"{s['reward_first_phase']:+.3f}",
                          f"{s['reward_last_phases']:+.3f}", f"{trainable / 1e6:.2f} M")
    console.print(table)
    for name in ("minirlhf", "trl"):
        if name in result:
            console.print(f"{name} side: " + ", ".join(
                f"{k} {v}" for k, v in result[name]["versions"].items()), soft_wrap=True)
    machine = result["machine"]
    if "ratio_samples_per_s" in result:
        console.print(f"minirlhf / TRL samples per second: {result['ratio_samples_per_s']:.2f}x "
                      f"(with the first phase: {result['ratio_with_first']:.2f}x); "
                      f"on {machine['cpu']}, {machine['cores']} cores, fast bf16: "
                      f"{machine['fast_bf16']}, {result['threads']} torch threads",
                      soft_wrap=True)


def run(ns: argparse.Namespace, console: Console) -> dict:
    """Both sides (or the one asked for) on one scope; the result, also saved as JSON."""
    args = get_args(ns.lora, ns.phases, ns.seed)
    scope = "lora" if ns.lora else "full"
    work_dir, folder = ns.bench_dir / f"trl_peer-{scope}", ns.bench_dir / "smollm2-hf"
    python = ensure_trl_venv(ns.bench_dir / "trl-venv", console)
    prepare_hf_folder(folder, console)
    phase_prompts = draw_phase_prompts(args)
    result = {"scope": scope, "phases": ns.phases, "seed": ns.seed, "threads": ns.threads,
              "batch_size": args.batch_size, "args": args.to_dict(), "machine": describe_cpu(),
              "logprob_max_diff": check_same_weights(python, folder, work_dir, ns.threads),
              "title": f"GRPO on SmolLM2-135M, {TRAINED[scope]}, batch 32, gen_len 20, fp32"}
    if ns.side in ("both", "minirlhf"):
        result["minirlhf"] = run_minirlhf(args, phase_prompts, console)
    if ns.side in ("both", "trl"):
        job = get_trl_job(args, phase_prompts, folder, work_dir, ns.threads)
        result["trl"] = run_trl_script(python, "train", job, work_dir, ns.threads)
        result["trl_job"] = job
        # The share of TRL's completions that reached gen_len (the rest stopped at EOS).
        clipped = [h["completions/clipped_ratio"] for h in result["trl"]["log_history"]
                   if "completions/clipped_ratio" in h]
        result["trl"]["completions_clipped_ratio"] = sum(clipped) / max(1, len(clipped))
    for name in ("minirlhf", "trl"):
        if name in result:
            result[name]["summary"] = summarise(result[name], args.batch_size)
    if "minirlhf" in result and "trl" in result:
        ours, theirs = result["minirlhf"]["summary"], result["trl"]["summary"]
        result["ratio_samples_per_s"] = ours["samples_per_s"] / theirs["samples_per_s"]
        result["ratio_with_first"] = (ours["samples_per_s_with_first"]
                                      / theirs["samples_per_s_with_first"])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, default=20, help="generated batches of 32, each")
    parser.add_argument("--lora", action="store_true", help="LoRA scope (default: full weights)")
    parser.add_argument("--side", default="both", choices=["both", "minirlhf", "trl"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads on both sides")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/trl_peer")
    parser.add_argument("--bench-dir", type=Path, default=REPO / ".bench",
                        help="the TRL environment, the shared model folder, TRL's work files")
    parser.add_argument("--report-only", action="store_true", help="train nothing")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    console = Console()
    ns.out.mkdir(parents=True, exist_ok=True)
    path = ns.out / f"{'lora' if ns.lora else 'full'}.json"
    if ns.report_only:
        result = json.loads(path.read_text())
    else:
        result = run(ns, console)
        path.write_text(json.dumps(result, indent=1))
    plot(result, path.with_suffix(".png"))
    report(result, console)
    console.print(f"Figures: {path}  Plot: {path.with_suffix('.png')}", soft_wrap=True)


if __name__ == "__main__":
    main()
