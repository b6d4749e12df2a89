"""Checks for the exercises: re-implement one piece of PPO at a time and test it at once.

Each `check_*` takes your function (or class), runs it on seeded inputs of several shapes and
edge cases, and compares it with minirlhf's own solution and an independent oracle. On success it
prints one line; otherwise it raises `ExerciseCheckError` saying what differed and, when it
recognises it, the mistake you most likely made. The notebooks in `notebooks/` call these after
each exercise; `pytest tests --impl=my_solutions.py` or `python -m minirlhf.exercises
my_solutions.py` runs every check whose function a Python file defines.

Stages, in pipeline order (notebooks 1 to 4, then 6 to 9): the value head and the sampler; the
char-count reward, reward normalisation, one-step advantages and GAE; replay-memory minibatches,
log-probs, the four objective terms and their signs; the optimiser, the LR schedule and one
learning phase; the reward model's last-token index and pairwise loss; the critic-free
advantages (GRPO, Dr. GRPO, RLOO) and the sampled KL estimators k1, k2, k3; DPO's sequence
log-probs and its loss (with IPO's); a LoRA adapter, attaching it to a model, and the reference
with it off (notebook 9); answers that end (notebook 10); what RL changed: the share of weights
that moved, the per-token KL, the logit lens and steering (notebook 11); answers a program
checks: an exact checker, pass@k and the share of groups with no reward spread (notebook 12).

When a check fails, `last_failure()` returns the failing case (inputs, expected and got, what was
raised) to re-run by hand; `python -m minirlhf.exercises start` copies the notebooks to work on.
"""

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from minirlhf.exercises import (
    answers,
    checkable,
    critic_free,
    dpo,
    inspection,
    kl_lab,
    learning_phase,
    lora,
    memory_and_logprobs,
    objective,
    optim_and_learning,
    reward_model,
    rewards_and_advantages,
)
from minirlhf.exercises.answers import (
    check_aggregate,
    check_compute_gae_with_ends,
    check_get_response_mask,
    check_get_token_weights,
    check_masked_mean,
)
from minirlhf.exercises.checkable import (
    check_calc_pass_at_k,
    check_get_zero_spread_share,
    check_is_exact_sum,
)
from minirlhf.exercises.core import Mistake, ReferenceOracleMismatch, load_char_model
from minirlhf.exercises.critic_free import (
    check_calc_kl_k1,
    check_calc_kl_k2,
    check_calc_kl_k3,
    check_compute_group_advantages,
    check_compute_rloo_advantages,
)
from minirlhf.exercises.dpo import check_calc_dpo_loss, check_get_sequence_logprobs
from minirlhf.exercises.inspection import (
    check_apply_logit_lens,
    check_calc_changed_share,
    check_calc_per_token_kl,
    check_get_steered_logits,
)
from minirlhf.exercises.kl_lab import check_calc_kl_k3_is, check_expected_kl_gradient
from minirlhf.exercises.learning_phase import check_learning_phase
from minirlhf.exercises.lora import check_get_ref_logits, check_lora
from minirlhf.exercises.lora_attach import check_attach_lora, reference_attach_lora
from minirlhf.exercises.memory_and_logprobs import check_get_logprobs, check_replay_memory
from minirlhf.exercises.model_and_sampling import check_get_samples, check_value_head
from minirlhf.exercises.objective import (
    check_calc_clipped_surrogate_objective,
    check_calc_entropy_bonus,
    check_calc_kl_penalty,
    check_calc_rlhf_objective,
    check_calc_value_function_loss,
    check_whiten,
)
from minirlhf.exercises.optim_and_learning import (
    check_get_lr_scale,
    check_get_optimizer,
    check_get_optimizer_and_scheduler,
)
from minirlhf.exercises.reporting import ExerciseCheckError, Failure, last_failure
from minirlhf.exercises.reward_model import check_calc_pairwise_loss, check_get_last_token_index
from minirlhf.exercises.rewards_and_advantages import (
    check_compute_gae,
    check_compute_one_step_advantages,
    check_normalize_reward,
    check_reward_fn_char_count,
)
from minirlhf.exercises.trainer_methods import check_compute_rlhf_objective, check_rollout_phase

CHECKS: dict[str, Callable[[Any], None]] = {
    "TransformerWithValueHead": check_value_head,
    "get_samples": check_get_samples,
    "reward_fn_char_count": check_reward_fn_char_count,
    "normalize_reward": check_normalize_reward,
    "compute_one_step_advantages": check_compute_one_step_advantages,
    "compute_gae": check_compute_gae,
    "ReplayMemory": check_replay_memory,
    "get_logprobs": check_get_logprobs,
    "calc_kl_penalty": check_calc_kl_penalty,
    "calc_entropy_bonus": check_calc_entropy_bonus,
    "calc_value_function_loss": check_calc_value_function_loss,
    "whiten": check_whiten,
    "calc_clipped_surrogate_objective": check_calc_clipped_surrogate_objective,
    "calc_rlhf_objective": check_calc_rlhf_objective,
    "get_optimizer": check_get_optimizer,
    "get_lr_scale": check_get_lr_scale,
    "get_optimizer_and_scheduler": check_get_optimizer_and_scheduler,
    "compute_rlhf_objective": check_compute_rlhf_objective,
    "rollout_phase": check_rollout_phase,
    "learning_phase": check_learning_phase,
    "get_last_token_index": check_get_last_token_index,
    "calc_pairwise_loss": check_calc_pairwise_loss,
    "compute_group_advantages": check_compute_group_advantages,
    "compute_rloo_advantages": check_compute_rloo_advantages,
    "calc_kl_k1": check_calc_kl_k1,
    "calc_kl_k2": check_calc_kl_k2,
    "calc_kl_k3": check_calc_kl_k3,
    "calc_kl_k3_is": check_calc_kl_k3_is,
    "expected_kl_gradient": check_expected_kl_gradient,
    "get_sequence_logprobs": check_get_sequence_logprobs,
    "calc_dpo_loss": check_calc_dpo_loss,
    "Lora": check_lora,
    "attach_lora": check_attach_lora,
    "get_ref_logits": check_get_ref_logits,
    "get_response_mask": check_get_response_mask,
    "masked_mean": check_masked_mean,
    "compute_gae_with_ends": check_compute_gae_with_ends,
    "aggregate": check_aggregate,
    "get_token_weights": check_get_token_weights,
    "calc_changed_share": check_calc_changed_share,
    "calc_per_token_kl": check_calc_per_token_kl,
    "apply_logit_lens": check_apply_logit_lens,
    "get_steered_logits": check_get_steered_logits,
    "is_exact_sum": check_is_exact_sum,
    "calc_pass_at_k": check_calc_pass_at_k,
    "get_zero_spread_share": check_get_zero_spread_share,
}
"""The name a learner's function must have -> its check, in pipeline order."""


MISTAKES: dict[str, list[Mistake]] = {
    "reward_fn_char_count": rewards_and_advantages.CHAR_COUNT_MISTAKES,
    "normalize_reward": rewards_and_advantages.NORMALIZE_MISTAKES,
    "compute_one_step_advantages": rewards_and_advantages.ADVANTAGE_MISTAKES,
    "compute_gae": rewards_and_advantages.GAE_MISTAKES,
    "get_logprobs": memory_and_logprobs.LOGPROBS_MISTAKES,
    "calc_kl_penalty": objective.KL_MISTAKES,
    "calc_entropy_bonus": objective.ENTROPY_MISTAKES,
    "calc_value_function_loss": objective.VALUE_LOSS_MISTAKES,
    "whiten": objective.WHITEN_MISTAKES,
    "calc_clipped_surrogate_objective": objective.SURROGATE_MISTAKES,
    "calc_rlhf_objective": objective.OBJECTIVE_MISTAKES,
    "get_lr_scale": optim_and_learning.LR_MISTAKES,
    "learning_phase": learning_phase.LEARNING_MISTAKES,
    "calc_pairwise_loss": reward_model.PAIRWISE_MISTAKES,
    "get_last_token_index": reward_model.LAST_TOKEN_MISTAKES,
    "compute_group_advantages": critic_free.GROUP_MISTAKES,
    "compute_rloo_advantages": critic_free.RLOO_MISTAKES,
    "calc_kl_k1": critic_free.K1_MISTAKES,
    "calc_kl_k2": critic_free.K2_MISTAKES,
    "calc_kl_k3": critic_free.K3_MISTAKES,
    "calc_kl_k3_is": kl_lab.K3_IS_MISTAKES,
    "expected_kl_gradient": kl_lab.GRADIENT_MISTAKES,
    "get_sequence_logprobs": dpo.SEQUENCE_MISTAKES,
    "calc_dpo_loss": dpo.DPO_MISTAKES,
    "get_response_mask": answers.MASK_MISTAKES,
    "masked_mean": answers.MASKED_MEAN_MISTAKES,
    "compute_gae_with_ends": answers.GAE_MISTAKES,
    "aggregate": answers.AGGREGATE_MISTAKES,
    "get_token_weights": answers.WEIGHT_MISTAKES,
    "calc_changed_share": inspection.CHANGED_SHARE_MISTAKES,
    "calc_per_token_kl": inspection.KL_MISTAKES,
    "apply_logit_lens": inspection.LENS_MISTAKES,
    "is_exact_sum": checkable.SUM_MISTAKES,
    "calc_pass_at_k": checkable.PASS_AT_K_MISTAKES,
    "get_zero_spread_share": checkable.ZERO_SPREAD_MISTAKES,
}
"""The catalogue of named mistakes, by exercise: each `imitate` makes one mistake, and the check
shows its `hint` when the learner's result matches it. This is the one copy of these wrong
implementations: tests/test_exercises feeds each to its check, tests/test_losses.py to the loss
oracles. (Mistakes a check recognises by what it observes, such as a sampler that ignores top_k,
are proven by the wrong implementations in tests/wrong_impls.)"""


def get_reference(name: str) -> Any:
    """minirlhf's own solution for the exercise `name` (what the checks compare against)."""
    import minirlhf
    from minirlhf import advantages, losses
    from minirlhf.trainer import RLHFTrainer

    if name == "compute_rlhf_objective":
        return RLHFTrainer.compute_rlhf_objective
    if name == "rollout_phase":
        return RLHFTrainer.rollout_phase
    if name == "learning_phase":
        return RLHFTrainer.learning_phase
    if name == "get_samples":
        from minirlhf.exercises.model_and_sampling import reference_get_samples

        return reference_get_samples
    if name == "attach_lora":
        return reference_attach_lora
    if name in lora.REFERENCES:
        return lora.REFERENCES[name]
    if name in answers.REFERENCES:
        return answers.REFERENCES[name]
    if name in inspection.REFERENCES:
        return inspection.REFERENCES[name]
    if name in checkable.REFERENCES:
        return checkable.REFERENCES[name]
    if name == "calc_rlhf_objective":  # the trainer computes it inside compute_rlhf_objective
        return objective.calc_rlhf_objective
    if name == "expected_kl_gradient":  # a lab computation, not a piece of the library
        return kl_lab.expected_kl_gradient
    if name == "calc_dpo_loss":  # the exercise returns the loss alone, not the implicit rewards
        return dpo.reference_dpo_loss
    for module in (minirlhf, advantages, losses):  # the critic-free pieces are not top-level
        if hasattr(module, name):
            return getattr(module, name)
    raise KeyError(f"no reference solution named {name!r}")


def load_file(path: str | Path) -> ModuleType:
    """Import a learner's Python file as a module (it may import minirlhf itself)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"No Python file at {path}.")
    spec = importlib.util.spec_from_file_location(f"learner_{path.stem}", path)
    assert spec is not None and spec.loader is not None, f"cannot import {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_file(path: str | Path) -> dict[str, str]:
    """Run every check whose function the file defines; return name -> "passed" or the error."""
    module = load_file(path)
    results = {}
    for name, check in CHECKS.items():
        if hasattr(module, name):
            try:
                check(getattr(module, name))
                results[name] = "passed"
            except ExerciseCheckError as error:
                print(f"\N{BALLOT X} {name} failed:\n{error}", file=sys.stderr)
                results[name] = str(error)
    if not results:
        print(f"{path} defines none of: {', '.join(CHECKS)}", file=sys.stderr)
    else:
        print(summary(results))
    return results


def summary(results: dict[str, str]) -> str:
    """One line: how many checks passed, and which failed."""
    failed = [name for name, result in results.items() if result != "passed"]
    line = f"{len(results) - len(failed)} of {len(results)} checks passed"
    return f"{line}; \N{BALLOT X} failed: {', '.join(failed)}." if failed else f"{line}."


__all__ = [
    "CHECKS",
    "ExerciseCheckError",
    "MISTAKES",
    "Mistake",
    "Failure",
    "ReferenceOracleMismatch",
    "check_aggregate",
    "check_apply_logit_lens",
    "check_calc_changed_share",
    "check_calc_per_token_kl",
    "check_get_steered_logits",
    "check_calc_clipped_surrogate_objective",
    "check_whiten",
    "check_calc_dpo_loss",
    "check_calc_entropy_bonus",
    "check_calc_kl_k1",
    "check_calc_kl_k2",
    "check_calc_kl_k3",
    "check_calc_kl_k3_is",
    "check_expected_kl_gradient",
    "check_calc_kl_penalty",
    "check_calc_pairwise_loss",
    "check_calc_rlhf_objective",
    "check_calc_value_function_loss",
    "check_attach_lora",
    "check_get_ref_logits",
    "check_lora",
    "check_compute_one_step_advantages",
    "check_compute_gae",
    "check_compute_gae_with_ends",
    "check_compute_group_advantages",
    "check_compute_rloo_advantages",
    "check_file",
    "check_get_last_token_index",
    "check_get_logprobs",
    "check_get_lr_scale",
    "check_get_optimizer",
    "check_get_optimizer_and_scheduler",
    "check_get_samples",
    "check_get_response_mask",
    "check_get_sequence_logprobs",
    "check_get_token_weights",
    "check_masked_mean",
    "check_compute_rlhf_objective",
    "check_learning_phase",
    "check_rollout_phase",
    "check_normalize_reward",
    "check_replay_memory",
    "check_reward_fn_char_count",
    "check_value_head",
    "get_reference",
    "last_failure",
    "load_char_model",
    "load_file",
]
