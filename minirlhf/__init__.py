"""minirlhf: a from-scratch, readable implementation of RLHF's RL step (PPO and its critic-free
relatives) for language models, on TransformerLens.

The pipeline, one module per stage, in the order data flows:

    args        RLHFArgs: every hyperparameter, validated (validation: the shared checks)
    prompts     prompt files, the held-out split, each phase's groups of prompts
    sampling    get_samples: the hand-written, KV-cached sampler -> Samples
    rewards     reward functions and their checks, normalize_reward (sentiment: VADER, ...)
                (shaping: a reward minus its answer's repetition)
    models      the policy (TransformerWithValueHead: logits + values, the value head optional),
                ReferenceModel, and get_rollout_outputs: a rollout's log-probs, values, KL,
                entropy and what the models keep for the learning steps
    advantages  ESTIMATORS and compute_advantages, the one place an estimator is chosen:
                one_step, gae (with a value head); grpo, dr_grpo, rloo, reinforce_pp,
                reinforce_pp_baseline (without)
    memory      ReplayMemory -> shuffled ReplayMinibatch-es
    token_stats the per-token log-prob, entropy and exact KL, a few positions at a time
                (policy_outputs: the learning step's, without the whole logits)
    losses      the four terms of the objective; calc_kl: exact, k1, k2, k3, k3_is
    kl_control  the KL coefficient: fixed or adaptive
    optim       AdamW with two learning rates, warmup + linear decay
    metrics     what a rollout logs (fluency: repetition and distinct-n of the answers)
    trainer     RLHFTrainer: rollout_phase -> learning_phase, composed from all of the above
    tracking    the progress bar, sample tables, wandb

Beside the pipeline, three wings:

    runtime/    what runs the model: device, loading (hf_checkpoints), tokens, fast_path
                (fast_weights, fast_blocks), trunk (a frozen trunk run once), lora, distributed
                (torchrun), random_streams, trained_state, export (to HF folders; export_checks)
    pairs/      learning from pairs of answers: preferences, reward_model + reward_training,
                dpo + dpo_training
    cli/        the command line, one module per subcommand (train, sample, export,
                preferences, reward_model, dpo, eval, inspect) and the run folder's
                machinery (run_folder, resume, keeper, checkpoint, report, presets, flags)

inspection (what training changed inside a policy: weights, tokens, the direction learnt, the
reward's sources; `minirlhf inspect`), evaluation (reward, KL and fluency on held-out prompts;
`minirlhf eval`), and exercises/, the checks the notebooks run on a
learner's code. Imports point down: the wings
below the pipeline know nothing of it, and nothing imports the command line.
"""

from minirlhf.advantages import (
    ESTIMATORS,
    compute_advantages,
    compute_gae,
    compute_one_step_advantages,
)
from minirlhf.args import RLHFArgs
from minirlhf.losses import (
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl,
    calc_kl_penalty,
    calc_value_function_loss,
    get_gen_logprobs,
    get_logprobs,
)
from minirlhf.memory import ReplayMemory, ReplayMinibatch
from minirlhf.models import ReferenceModel, TransformerWithValueHead
from minirlhf.optim import get_lr_scale, get_optimizer, get_optimizer_and_scheduler
from minirlhf.pairs.dpo import calc_dpo_loss, get_sequence_logprobs
from minirlhf.pairs.dpo_training import DPOArgs, train_dpo
from minirlhf.pairs.reward_model import RewardModel, calc_pairwise_loss, get_last_token_index
from minirlhf.rewards import get_rewards, normalize_reward, reward_fn_char_count
from minirlhf.sampling import Samples, SamplingConfig, get_samples
from minirlhf.trainer import RLHFTrainer

__all__ = [
    "DPOArgs",
    "ESTIMATORS",
    "RLHFArgs",
    "RLHFTrainer",
    "ReplayMemory",
    "ReplayMinibatch",
    "ReferenceModel",
    "RewardModel",
    "Samples",
    "SamplingConfig",
    "TransformerWithValueHead",
    "calc_clipped_surrogate_objective",
    "calc_dpo_loss",
    "calc_entropy_bonus",
    "calc_kl",
    "calc_kl_penalty",
    "calc_pairwise_loss",
    "calc_value_function_loss",
    "compute_advantages",
    "compute_gae",
    "compute_one_step_advantages",
    "get_gen_logprobs",
    "get_last_token_index",
    "get_logprobs",
    "get_lr_scale",
    "get_optimizer",
    "get_optimizer_and_scheduler",
    "get_rewards",
    "get_samples",
    "get_sequence_logprobs",
    "normalize_reward",
    "reward_fn_char_count",
    "train_dpo",
]
