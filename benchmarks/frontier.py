"""Benchmark: the reward-vs-KL frontier on held-out review prompts, both directions, every method.

A mean reward alone flatters a policy that has learnt to repeat what the judge pays for. The field
compares RLHF methods by reward against KL(policy || reference) on held-out prompts, several KL
strengths per method (the DPO paper's IMDb figure, Rafailov et al. 2023), with the answers'
fluency beside it. Each *point* here is one method at one KL strength in one direction:

1. train from SmolLM2-135M-Instruct on the training split of the shipped review prompts, with the
   offline preset's settings (`smollm2-vader`: LoRA r16 on the top 8 blocks) in float32, 8 prompts
   x 4 samples a phase, for `--phases` phases; VADER (pos) or minus VADER (neg) as the reward;
   - PPO-GAE, GRPO, RLOO, REINFORCE++, REINFORCE++-baseline (minirlhf): `kl_coef` (or, with
     `--kl-target`, the adaptive controller's `kl_target`) is the strength;
   - DPO (minirlhf): `beta`, on pairs of the base model's answers to the training prompts judged
     by VADER in that direction (benchmarks/dpo.py's settings);
   - TRL's GRPOTrainer: its `beta`, the same job as benchmarks/trl_peer.py (its own venv,
     `.bench/trl-venv`); the trained model comes back as a Hugging Face folder that minirlhf loads;
2. judge it with `minirlhf.evaluation.evaluate_policy`, the same for every method: `--samples`
   answers to every held-out prompt (never trained on), 20 tokens, seed 0; mean VADER, the exact
   KL to the base model summed over each answer's tokens, distinct-1/2, the share of repeated
   3-grams, the reference's log-likelihood per token.

Each point is written to `<out>/frontier-<method>-<direction>-<strength>.json` as soon as it is
measured and skipped when that file exists, so the grid (many hours on a CPU) can be run in parts
and resumed. The base model (KL 0) is every curve's first point. The table (`frontier.md`) and
the plot (`frontier.png`) always cover every point in `<out>`.

    python benchmarks/frontier.py                                    # the whole grid
    python benchmarks/frontier.py --methods grpo,trl_grpo --directions neg --kl 0.05 --phases 25
    python benchmarks/frontier.py --methods dpo --dpo-beta 0.1,0.5
    python benchmarks/frontier.py --report-only                      # table + plot of saved points
    python benchmarks/frontier.py --smoke                            # tiny model, seconds

What is compared and the measured results: docs/frontier.md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))  # trl_peer.py and dpo.py sit beside us
import dpo as dpo_bench  # noqa: E402
import frontier_report  # noqa: E402
import trl_peer  # noqa: E402

from minirlhf.args import RLHFArgs  # noqa: E402
from minirlhf.cli.eval import to_json  # noqa: E402
from minirlhf.cli.presets import PRESETS  # noqa: E402
from minirlhf.evaluation import EvalSettings, evaluate_policy  # noqa: E402
from minirlhf.pairs.dpo_training import DPOArgs, train_dpo  # noqa: E402
from minirlhf.pairs.preferences import (  # noqa: E402
    make_preferences,
    read_preferences,
    split_preferences,
    write_preferences,
)
from minirlhf.prompts import load_prompt_split, prompt_text  # noqa: E402
from minirlhf.runtime.device import describe_cpu  # noqa: E402
from minirlhf.runtime.loading import load_policy  # noqa: E402
from minirlhf.sentiment import make_vader_reward  # noqa: E402
from minirlhf.trainer import RLHFTrainer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RL_METHODS = {"ppo_gae": "gae", "grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce_pp",
              "reinforce_pp_baseline": "reinforce_pp_baseline"}
"""minirlhf's RL methods and their `advantage_estimator`."""
METHODS = [*RL_METHODS, "dpo", "trl_grpo"]
KL_GRID = (0.01, 0.05, 0.2)
"""kl_coef (TRL: beta) of the RL methods; the preset's is 0.05."""
BETA_GRID = (0.05, 0.1, 0.5)
"""DPO's beta; benchmarks/dpo.py's is 0.1."""
JOB_ARGS = dict(prompts="reviews", group_size=4, precision="fp32", temperature=1.0, top_k=None,
                top_p=None)
"""On top of the offline preset: the review prompts (8 a phase, 4 samples each: batch 32, as
docs/critic_free.md measured), fp32 on both sides, plain sampling (what TRL's side samples)."""
SMOKE_ARGS = dict(base_model="tiny", trainable_layers=None, lora_rank=0, batch_size=8,
                  num_minibatches=1, batches_per_learning_phase=1, gen_len=8, group_size=2,
                  warmup_steps=0, base_lr=1e-3, head_lr=1e-3)
"""--smoke: a tiny random model, one optimiser step a phase (TRL: one step in all)."""
SMOKE_DPO = dict(trainable_layers=None, lora_rank=0, epochs=1, batch_size=4, eval_every=1)
PAIRS = dict(num_pairs=640, min_gap=0.3)
SMOKE_PAIRS = dict(num_pairs=8, min_gap=-1.0)  # a random model's answers are mostly VADER ties
STRENGTH_NAMES = {"kl_coef": "kl", "kl_target": "kltarget", "beta": "beta"}


def point_name(method: str, direction: str, kind: str, strength: float, phases: int) -> str:
    """The point's file stem: "frontier-grpo-neg-kl0.05-p25" (DPO's has no phases)."""
    name = f"frontier-{method}-{direction}-{STRENGTH_NAMES[kind]}{strength:g}"
    return name if kind == "beta" else f"{name}-p{phases}"


def get_job_args(ns: argparse.Namespace, method: str, kind: str, strength: float) -> RLHFArgs:
    """The run's RLHFArgs: the preset, the job, --smoke's, --set's, the method and strength."""
    base = {**PRESETS["smollm2-vader"]["args"], **JOB_ARGS, **(SMOKE_ARGS if ns.smoke else {}),
            **ns.overrides, "total_phases": ns.phases, "eval_every": ns.phases,
            "seed": ns.seed if ns.train_seed is None else ns.train_seed}
    if method in RL_METHODS:
        base["advantage_estimator"] = RL_METHODS[method]
    elif method == "trl_grpo":
        base["advantage_estimator"] = "grpo"
    if kind in ("kl_coef", "kl_target"):
        base[kind] = strength
    return RLHFArgs(**base)


def get_eval_settings(ns: argparse.Namespace, args: RLHFArgs) -> EvalSettings:
    """Every method is judged with the same settings: the job's sampling, seed 0."""
    return EvalSettings.from_args(args, samples_per_prompt=ns.samples, batch_size=32, seed=0)


def get_held_out(ns: argparse.Namespace, args: RLHFArgs) -> list:
    _, held_out = load_prompt_split(args.prompts, args.held_out_fraction, ns.seed)
    return held_out[: ns.max_prompts]


def measure(policy, reference, records: list, direction: str, settings: EvalSettings) -> dict:
    """evaluate_policy with VADER in `direction`; VADER itself reported (not the negated reward)."""
    sign = 1.0 if direction == "pos" else -1.0
    start = time.perf_counter()
    result = evaluate_policy(policy, reference, records, make_vader_reward(direction), settings)
    answers = [{"prompt": a["prompt"], "response": a["response"], "vader": sign * a["reward"],
                "kl": a["kl"]} for a in result["answers"]]
    return {"vader_mean": sign * result["metrics"]["reward_mean"], "metrics": result["metrics"],
            "eval_seconds": time.perf_counter() - start, "answers": answers,
            "eval_settings": result["settings"]}


def train_rl(ns, args: RLHFArgs, direction: str, console: Console) -> tuple:
    """One of minirlhf's RL methods; (policy, reference, what to record). The prompts are split
    by --seed even when --train-seed seeds the training."""
    split = load_prompt_split(args.prompts, args.held_out_fraction, ns.seed)
    trainer = RLHFTrainer(args, make_vader_reward(direction),
                          base_model=load_policy(args.base_model), console=console,
                          table_every=0, prompt_split=split)
    history = trainer.train()
    policy = trainer.model.base_model
    # LoRA: the reference is the policy with its adapters off (evaluate_policy turns them off).
    reference = policy if args.lora_rank else load_policy(args.base_model)
    keys = ("charts/reward_mean", "charts/kl", "fluency/repeated_3gram", "fluency/distinct_2")
    return policy, reference, {"history": [{k: m.get(k) for k in keys} for m in history]}


def get_pairs(ns, args: RLHFArgs, direction: str, console: Console) -> list:
    """The base model's answers to the training prompts in pairs, judged by VADER in
    `direction` (made once per direction and model, then read from --work)."""
    path = ns.work / f"pairs-{args.base_model}-{direction}.jsonl"
    if path.is_file():
        return read_preferences(path)
    train_records, _ = load_prompt_split(args.prompts, args.held_out_fraction, args.seed)
    settings = SMOKE_PAIRS if ns.smoke else PAIRS
    pairs = make_preferences(load_policy(args.base_model), make_vader_reward(direction),
                             [prompt_text(r) for r in train_records], gen_len=args.gen_len,
                             batch_size=64, seed=0, **settings)
    ns.work.mkdir(parents=True, exist_ok=True)
    write_preferences(pairs, path)
    console.print(f"{len(pairs)} pairs -> {path}", soft_wrap=True)
    return pairs


def train_dpo_point(ns, args: RLHFArgs, direction: str, beta: float, console: Console) -> tuple:
    """DPO at `beta` on the direction's pairs; (policy, reference, what to record)."""
    pairs = get_pairs(ns, args, direction, console)
    dpo_args = DPOArgs(**{**dpo_bench.DPO_ARGS, **(SMOKE_DPO if ns.smoke else {}),
                          "base_model": args.base_model, "seed": args.seed, "beta": beta,
                          **ns.dpo_overrides})
    train, held_out = split_preferences(pairs, dpo_args.held_out_fraction, dpo_args.seed)
    policy = load_policy(args.base_model)
    history = train_dpo(policy, train, held_out, dpo_args, console)
    reference = policy if dpo_args.lora_rank else load_policy(args.base_model)
    final = {k: v for k, v in history[-1].items() if k.startswith("held_out/")}
    return policy, reference, {"dpo_args": dpo_args.to_dict(), "steps": len(history),
                               "pairs": [len(train), len(held_out)], "final": final}


def prepare_hf_folder(ns, base_model: str, console: Console) -> Path:
    """The base model as a Hugging Face folder TRL starts from (.bench/smollm2-hf is the one
    benchmarks/trl_peer.py makes and checks)."""
    folder = ns.bench_dir / f"{base_model}-hf"
    trl_peer.prepare_hf_folder(folder, console, base_model)
    return folder


def train_trl(ns, args: RLHFArgs, name: str, direction: str, console: Console) -> tuple:
    """TRL's GRPOTrainer on the same job (its beta = args.kl_coef), in its own venv; the trained
    model comes back as a folder (trl_peer_trl.py's `save_dir`) that minirlhf loads."""
    python = trl_peer.ensure_trl_venv(ns.bench_dir / "trl-venv", console)
    folder = prepare_hf_folder(ns, args.base_model, console)
    work_dir = ns.bench_dir / "frontier" / name
    if args.base_model == "smollm2" and not ns.weights_checked:
        trl_peer.check_same_weights(python, folder, work_dir, ns.threads)
        ns.weights_checked = True
    prompts = trl_peer.draw_phase_prompts(args, split_seed=ns.seed)  # args.seed: --train-seed
    job = trl_peer.get_trl_job(args, prompts, folder, work_dir, ns.threads, direction) | {
        "save_dir": str(work_dir / "model")}
    result = trl_peer.run_trl_script(python, "train", job, work_dir, ns.threads)
    policy, reference = load_policy(job["save_dir"]), load_policy(args.base_model)
    assert policy.cfg.default_prepend_bos == reference.cfg.default_prepend_bos, \
        "TRL's saved tokenizer adds BOS differently from the base model's"
    keep = ("versions", "phase_time_s", "reward_mean_per_phase", "trainable_parameters")
    return policy, reference, {"trl": {k: result[k] for k in keep}, "trl_job": job}


def run_point(ns, method: str, direction: str, kind: str, strength: float,
              console: Console) -> dict:
    """Train one point and measure it."""
    name = point_name(method, direction, kind, strength, ns.phases)
    args = get_job_args(ns, method, kind, strength)
    start = time.perf_counter()
    if method == "dpo":
        policy, reference, info = train_dpo_point(ns, args, direction, strength, console)
    elif method == "trl_grpo":
        policy, reference, info = train_trl(ns, args, name, direction, console)
    else:
        policy, reference, info = train_rl(ns, args, direction, console)
    train_seconds = time.perf_counter() - start
    measured = measure(policy, reference, get_held_out(ns, args), direction,
                       get_eval_settings(ns, args))
    return {"name": name, "method": method, "direction": direction, "kind": kind,
            "strength": strength, "phases": None if method == "dpo" else ns.phases,
            "seed": ns.seed, "train_seed": args.seed, "train_seconds": train_seconds,
            **measured, **info,
            "args": args.to_dict(), "machine": ns.machine, "smoke": ns.smoke}


def run_base(ns, direction: str, console: Console) -> dict:
    """The base model judged the same way: KL 0, every curve's first point."""
    args = get_job_args(ns, "base", "kl_coef", 0.0)
    model = load_policy(args.base_model)
    measured = measure(model, model, get_held_out(ns, args), direction,
                       get_eval_settings(ns, args))
    return {"name": f"frontier-base-{direction}", "method": "base", "direction": direction,
            "kind": None, "strength": None, "phases": 0, "train_seconds": 0.0, **measured,
            "args": args.to_dict(), "machine": ns.machine, "smoke": ns.smoke}


def get_grid(ns) -> list[tuple[str, str, str, float]]:
    """(method, direction, kind, strength) of every point asked for."""
    grid = []
    for direction in ns.directions:
        for method in ns.methods:
            if method == "dpo":
                grid += [(method, direction, "beta", beta) for beta in ns.dpo_beta]
            elif method == "trl_grpo" and ns.kl_target:
                ns.console.print("trl_grpo skipped: TRL has no adaptive KL controller")
            else:
                kind = "kl_target" if ns.kl_target and method != "trl_grpo" else "kl_coef"
                grid += [(method, direction, kind, strength) for strength in ns.kl]
    return grid


def save(result: dict, path: Path):
    path.write_text(json.dumps(to_json(result), indent=1))


def run_grid(ns, console: Console):
    """The base point of each direction, then every point of the grid whose file is missing."""
    for direction in ns.directions:
        path = ns.out / f"frontier-base-{direction}.json"
        if not path.exists():
            save(run_base(ns, direction, console), path)
    for method, direction, kind, strength in get_grid(ns):
        name = point_name(method, direction, kind, strength, ns.phases)
        path = ns.out / f"{name}.json"
        if path.exists():
            console.print(f"{name}: measured already ({path}), skipped", soft_wrap=True)
            continue
        console.rule(name)
        result = run_point(ns, method, direction, kind, strength, console)
        save(result, path)
        console.print(f"{name}: VADER {result['vader_mean']:+.3f}, KL/answer "
                      f"{result['metrics']['kl_per_answer']:.2f}, repeated 3-grams "
                      f"{result['metrics']['repeated_3gram']:.2f}, "
                      f"{result['train_seconds'] / 60:.1f} min", soft_wrap=True)


def parse_floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",") if value]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--directions", default="pos,neg", help="pos, neg or both")
    parser.add_argument("--kl", type=parse_floats, default=list(KL_GRID),
                        help="kl_coef (TRL: beta) values, comma-separated")
    parser.add_argument("--kl-target", action="store_true",
                        help="--kl values are minirlhf's kl_target (per answer), not kl_coef")
    parser.add_argument("--dpo-beta", type=parse_floats, default=list(BETA_GRID))
    parser.add_argument("--phases", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1, help="training and the prompt split")
    parser.add_argument("--train-seed", type=int, help="RL methods (not DPO): seed the "
                        "training with this instead, the split kept (another draw of a point; "
                        "give it its own --out)")
    parser.add_argument("--samples", type=int, default=4, help="answers per held-out prompt")
    parser.add_argument("--max-prompts", type=int, default=256, help="held-out prompts (35)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="default benchmarks/results "
                        "(--smoke: runs/frontier-smoke)")
    parser.add_argument("--work", type=Path, default=REPO / "runs/frontier", help="DPO pairs")
    parser.add_argument("--bench-dir", type=Path, default=REPO / ".bench",
                        help="TRL's venv, the exported model, TRL's work files")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="RLHFArgs overrides, e.g. base_lr=2e-4 (values as JSON)")
    parser.add_argument("--dpo-set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 phase, 4 prompts")
    parser.add_argument("--report-only", action="store_true", help="train nothing")
    return parser


def check_args(ns, parser: argparse.ArgumentParser):
    """Names known, counts positive; --smoke's scale and output folder."""
    ns.methods, ns.directions = ns.methods.split(","), ns.directions.split(",")
    unknown = [m for m in ns.methods if m not in METHODS] + \
        [d for d in ns.directions if d not in ("pos", "neg")]
    if unknown:
        parser.error(f"unknown method or direction {unknown}: methods are {METHODS}, "
                     "directions pos and neg")
    if ns.train_seed is not None and "dpo" in ns.methods:
        parser.error("--train-seed is for the RL methods (minirlhf's and TRL's): DPO draws its "
                     "pairs from the run's seed")
    if ns.smoke:
        ns.phases, ns.max_prompts, ns.samples = 1, 4, 2
        ns.work = ns.out = ns.out or REPO / "runs/frontier-smoke"
    if min(ns.phases, ns.samples, ns.max_prompts) < 1 or not ns.kl or not ns.dpo_beta:
        parser.error("--phases, --samples and --max-prompts must be at least 1, and --kl and "
                     "--dpo-beta need a value each")
    ns.out = ns.out or REPO / "benchmarks/results"
    ns.overrides = dpo_bench.parse_sets(ns.set)
    ns.dpo_overrides = dpo_bench.parse_sets(ns.dpo_set)
    ns.weights_checked = False


def main():
    parser = get_parser()
    ns = parser.parse_args()
    check_args(ns, parser)
    torch.set_num_threads(ns.threads)
    console = ns.console = Console()
    ns.machine = {**describe_cpu(), "torch": torch.__version__, "threads": ns.threads}
    console.print(f"CPU {ns.machine['cpu']}, {ns.machine['cores']} cores, fast bf16: "
                  f"{ns.machine['fast_bf16']}; torch {torch.__version__}, {ns.threads} threads",
                  soft_wrap=True)
    ns.out.mkdir(parents=True, exist_ok=True)
    if not ns.report_only:
        run_grid(ns, console)
    frontier_report.write_report(ns.out, console)


if __name__ == "__main__":
    main()
