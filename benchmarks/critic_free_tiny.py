"""Benchmark: each advantage estimator on the tiny end-to-end task (a random 94-character model
learns to emit periods), the gain of the last 3 phases' mean reward over the first 3's.

The settings are tests/test_trainer.py's E2E_ARGS; critic-free runs add group_size 4 (8 prompts
x 4 samples). A few seconds a run on one CPU thread; the numbers quoted in
tests/test_critic_free_trainer.py come from it.

    python benchmarks/critic_free_tiny.py --seeds 1 2 3
"""

import argparse

import torch
from rich.console import Console

from minirlhf.args import RLHFArgs
from minirlhf.rewards import reward_fn_char_count
from minirlhf.runtime.loading import PRINTABLE_VOCAB, load_tiny_model
from minirlhf.trainer import RLHFTrainer

E2E_ARGS = dict(total_phases=12, batch_size=32, num_minibatches=4, gen_len=16, warmup_steps=0,
                base_lr=3e-3, head_lr=3e-3, kl_coef=0.05, prefix="A", prepend_bos=False,
                advantage_estimator="gae", gae_lambda=1.0, device="cpu")
RUNS = {
    "gae": {},
    "grpo": dict(advantage_estimator="grpo", group_size=4),
    "dr_grpo": dict(advantage_estimator="dr_grpo", group_size=4),
    "rloo": dict(advantage_estimator="rloo", group_size=4),
    "reinforce_pp": dict(advantage_estimator="reinforce_pp", kl_in="reward", kl_estimator="k3"),
    "reinforce_pp_baseline": dict(advantage_estimator="reinforce_pp_baseline", group_size=4),
}


def run(seed: int, overrides: dict) -> list[dict[str, float]]:
    model = load_tiny_model(1, 32, 2, n_ctx=64, seed=seed, d_vocab=PRINTABLE_VOCAB)
    args = RLHFArgs(seed=seed, **{**E2E_ARGS, **overrides})
    trainer = RLHFTrainer(args, reward_fn_char_count, base_model=model,
                          console=Console(quiet=True), table_every=0)
    return trainer.train()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ns = parser.parse_args()
    torch.set_num_threads(1)
    for name in ns.runs:
        for seed in ns.seeds:
            history = run(seed, RUNS[name])
            rewards = [metrics["charts/reward_mean"] for metrics in history]
            first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
            print(f"{name:13s} seed {seed}: first 3 {first:.2f}, last 3 {last:.2f}, "
                  f"gain {last - first:.2f}, final KL/token {history[-1]['charts/kl']:.3f}")


if __name__ == "__main__":
    main()
