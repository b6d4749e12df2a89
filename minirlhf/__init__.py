"""minirlhf: a from-scratch, readable implementation of PPO for language models (RLHF's RL step).

The pipeline, one module per stage, in the order data flows:

    loading    -> a HookedTransformer policy (tiny random, SmolLM2 offline, GPT-2 from the hub)
    models     -> TransformerWithValueHead: (logits, values) from one forward pass
    sampling   -> get_samples: the hand-written, KV-cached sampler
    rewards    -> reward functions, their checks, normalize_reward
    advantages -> compute_advantages (one-step), compute_gae
    memory     -> ReplayMemory / ReplayMinibatch
    losses     -> the four terms of the RLHF objective and get_logprobs
    optim      -> AdamW with two learning rates, warmup + linear decay
    trainer    -> RLHFTrainer, which composes all of the above

and the step before PPO, learning the reward from preferences:

    preferences     -> (prompt, chosen, rejected) records, JSONL, RLAIF pairs from a judge
    reward_model    -> RewardModel (scalar head), get_last_token_index, calc_pairwise_loss
    reward_training -> train_reward_model, normalize_on_policy
"""

from minirlhf.advantages import compute_advantages, compute_gae
from minirlhf.args import RLHFArgs
from minirlhf.losses import (
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_function_loss,
    get_logprobs,
)
from minirlhf.memory import ReplayMemory, ReplayMinibatch
from minirlhf.models import TransformerWithValueHead, get_reference_model
from minirlhf.optim import get_lr_scale, get_optimizer, get_optimizer_and_scheduler
from minirlhf.reward_model import RewardModel, calc_pairwise_loss, get_last_token_index
from minirlhf.rewards import get_rewards, normalize_reward, reward_fn_char_count
from minirlhf.sampling import Samples, get_samples
from minirlhf.trainer import RLHFTrainer

__all__ = [
    "RLHFArgs",
    "RLHFTrainer",
    "ReplayMemory",
    "ReplayMinibatch",
    "RewardModel",
    "Samples",
    "TransformerWithValueHead",
    "calc_clipped_surrogate_objective",
    "calc_entropy_bonus",
    "calc_kl_penalty",
    "calc_pairwise_loss",
    "calc_value_function_loss",
    "compute_advantages",
    "compute_gae",
    "get_last_token_index",
    "get_logprobs",
    "get_lr_scale",
    "get_optimizer",
    "get_optimizer_and_scheduler",
    "get_reference_model",
    "get_rewards",
    "get_samples",
    "normalize_reward",
    "reward_fn_char_count",
]
