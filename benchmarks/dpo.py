"""DPO on VADER-judged SmolLM2 pairs: mean VADER of samples before and after, KL, wall time.

    minirlhf preferences --base-model smollm2 --out prefs.jsonl --num-pairs 320
    python benchmarks/dpo.py --data prefs.jsonl [--epochs 2 --lr 1e-5 --beta 0.1]

Samples `--samples` continuations of each prompt (the training prompt and prompts the pairs never
used) from the policy before and after DPO, scores them with VADER (the judge that labelled the
pairs), and estimates the KL to the reference per sequence as the mean over the policy's own
samples of log pi(y|x) - log pi_ref(y|x). The DPO comparison with reward model + PPO is not made
here: see benchmarks/reward_model.py for that pipeline's numbers.
"""

import argparse
import json
import time

import torch
from rich.console import Console

from minirlhf import loading
from minirlhf.dpo import get_sequence_logprobs
from minirlhf.dpo_training import DPOArgs, train_dpo
from minirlhf.models import ReferenceModel, run_model
from minirlhf.preferences import read_preferences, split_preferences
from minirlhf.sampling import get_samples
from minirlhf.sentiment import make_vader_reward

PROMPTS = ["This movie was", "The film was", "I thought the book was", "The restaurant was"]


@torch.no_grad()
def measure(policy, reference, prompts: list[str], n: int, gen_len: int) -> dict:
    """Mean VADER per prompt, the KL estimate, and a few samples."""
    vader = make_vader_reward("pos")
    result = {"vader": {}, "kl": {}, "samples": {}}
    for prompt in prompts:
        out = get_samples(policy, prompt, batch_size=n, gen_len=gen_len, seed=0)
        response = torch.zeros_like(out.attention_mask)
        response[:, out.prefix_len :] = 1
        logps = [get_sequence_logprobs(run_model(m, out.sample_ids, out.attention_mask,
                                                 True)[0], out.sample_ids, out.attention_mask,
                                       response) for m in (policy, reference)]
        result["vader"][prompt] = vader(out.samples).mean().item()
        result["kl"][prompt] = (logps[0] - logps[1]).mean().item()
        result["samples"][prompt] = out.samples[:3]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--base-model", default="smollm2", help="tiny: a smoke test")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=20)
    parser.add_argument("--out", default="dpo_benchmark.json")
    ns = parser.parse_args()
    args = DPOArgs(base_model=ns.base_model, epochs=ns.epochs, lr=ns.lr, beta=ns.beta,
                   batch_size=ns.batch_size, eval_every=10)
    train, heldout = split_preferences(read_preferences(ns.data), args.heldout_fraction, args.seed)
    policy = loading.load_policy(ns.base_model, "cpu")
    reference = ReferenceModel(policy).model
    before = measure(policy, reference, PROMPTS, ns.samples, ns.gen_len)
    start = time.perf_counter()
    history = train_dpo(policy, train, heldout, args, Console())
    seconds = time.perf_counter() - start
    after = measure(policy, reference, PROMPTS, ns.samples, ns.gen_len)
    final = {k: v for k, v in history[-1].items() if k.startswith("heldout/")}
    report = {"args": args.to_dict(), "pairs": [len(train), len(heldout)],
              "train_seconds": seconds, "heldout": final, "before": before, "after": after}
    with open(ns.out, "w") as file:
        json.dump(report, file, indent=2)
    print(json.dumps({k: report[k] for k in ("pairs", "train_seconds", "heldout")}, indent=2))
    for prompt in PROMPTS:
        print(f"{prompt!r}: VADER {before['vader'][prompt]:+.3f} -> {after['vader'][prompt]:+.3f}"
              f", KL {after['kl'][prompt]:.2f} nats/sequence")


if __name__ == "__main__":
    main()
