"""minirlhf: a from-scratch, readable implementation of PPO for language models (RLHF's RL step).

The pipeline, one module per stage, in the order data flows:

    loading    -> a HookedTransformer policy (tiny random, SmolLM2 offline, GPT-2 from the hub)
    models     -> TransformerWithValueHead: (logits, values) from one forward pass;
                  ReferenceModel: the frozen policy at the start, the KL penalty's anchor
    sampling   -> get_samples: the hand-written, KV-cached sampler (SamplingConfig)
    rewards    -> reward functions, their checks, normalize_reward
    advantages -> compute_advantages (one-step), compute_gae
    memory     -> ReplayMemory / ReplayMinibatch
    losses     -> the four terms of the RLHF objective, get_logprobs, get_gen_logprobs
    optim      -> AdamW with two learning rates, warmup + linear decay
    trainer    -> RLHFTrainer, which composes all of the above

below them, device (where and in what precision) and fast_path (the same forward pass with
the weights laid out once); and the step before PPO, learning the reward from preferences:

    preferences     -> (prompt, chosen, rejected) records, JSONL, RLAIF pairs from a judge
    reward_model    -> RewardModel (scalar head), get_last_token_index, calc_pairwise_loss
    reward_training -> train_reward_model, normalize_on_policy

or, instead of the reward model and PPO, DPO on the same pairs:

    dpo             -> get_sequence_logprobs, calc_dpo_loss (DPO, conservative DPO, IPO)
    dpo_training    -> DPOArgs, train_dpo
"""

from minirlhf.advantages import compute_advantages, compute_gae
from minirlhf.args import RLHFArgs
from minirlhf.losses import (
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
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
    "calc_kl_penalty",
    "calc_pairwise_loss",
    "calc_value_function_loss",
    "compute_advantages",
    "compute_gae",
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
