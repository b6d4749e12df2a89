"""The trainer with the critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++ and its baseline
variant), the sampled KL estimators and the adaptive KL controller, on the tiny end-to-end task of
test_trainer.py.

Measured by benchmarks/critic_free_tiny.py (E2E_ARGS, group_size 4: 8 prompts x 4 samples):
gain of the last 3 phases' mean reward over the first 3's, seeds 1 / 2 / 3 (re-measured
2026-12-07): gae 3.00 / 2.40 / 2.88, grpo 2.98 / 1.56 / 2.81, rloo 2.70 / 2.91 / 3.03, dr_grpo
2.82 / 3.19 / 2.70; reinforce_pp with the k3 KL in the reward 3.29 / 6.47 / 4.28;
reinforce_pp_baseline (exact KL in the loss) 3.07 / 2.03 / 2.30.
The margin (test_trainer.MARGIN = 1.0, over 20 standard deviations of an untrained policy's
phase means) is the same; a trainer with the advantages' sign flipped fails it.
"""

import pytest
import torch
from rich.console import Console
from test_trainer import E2E_ARGS, learning_problem, train

from minirlhf import policy_outputs
from minirlhf import trainer as trainer_module
from minirlhf.args import RLHFArgs
from minirlhf.losses import calc_kl_k3
from minirlhf.models import TransformerWithValueHead, build_policy
from minirlhf.rewards import reward_fn_char_count
from minirlhf.token_stats import calc_kl_from_stats
from minirlhf.trainer import RLHFTrainer

CRITIC_FREE_RUNS = {
    "grpo": dict(advantage_estimator="grpo", group_size=4),
    "dr_grpo": dict(advantage_estimator="dr_grpo", group_size=4),
    "rloo": dict(advantage_estimator="rloo", group_size=4),
    "reinforce_pp": dict(advantage_estimator="reinforce_pp", kl_in="reward", kl_estimator="k3"),
    "reinforce_pp_baseline": dict(advantage_estimator="reinforce_pp_baseline", group_size=4),
}
CRITIC_KEYS = {"losses/value_loss", "losses/explained_variance", "charts/lr_head"}


@pytest.mark.parametrize("name", list(CRITIC_FREE_RUNS))
def test_critic_free_estimator_learns_without_a_value_head(make_printable_model, name):
    trainer, _ = train(make_printable_model(seed=1), **CRITIC_FREE_RUNS[name])
    problem = learning_problem(trainer.history)
    assert problem is None, f"{name}: {problem}"
    assert not CRITIC_KEYS & set(trainer.history[-1]), "a critic-free run logged a critic metric"
    assert len(trainer.optimizer.param_groups) == 1, "the value head must not be optimised"
    assert trainer.model.value_head is None, "a critic-free policy must have no value head"


def test_the_learning_check_rejects_flipped_critic_free_advantages(make_printable_model,
                                                                     monkeypatch):
    right = trainer_module.compute_advantages
    monkeypatch.setattr(trainer_module, "compute_advantages",
                        lambda *args, **kwargs: -right(*args, **kwargs))
    trainer, _ = train(make_printable_model(seed=1), **CRITIC_FREE_RUNS["grpo"])
    assert learning_problem(trainer.history) is not None


def make_trainer(model, **overrides) -> RLHFTrainer:
    args = RLHFArgs(**{**E2E_ARGS, "total_phases": 3, "batch_size": 8, "num_minibatches": 2,
                       "gen_len": 5, **overrides})
    return RLHFTrainer(args, reward_fn_char_count, base_model=model,
                       console=Console(quiet=True), table_every=0)


def test_sampled_kl_in_the_loss_is_the_estimator_and_exact_kl_is_logged(make_printable_model,
                                                                          monkeypatch):
    trainer = make_trainer(make_printable_model(seed=3), kl_estimator="k3", kl_coef=0.7,
                           advantage_estimator="grpo", group_size=2)
    seen = []

    def recording_calc_kl(estimator, stats, old_logprobs=None):
        """The learning step's KL, checked against k3 of the per-token log-probs (which
        tests/test_chunked.py checks against torch.distributions)."""
        kl = calc_kl_from_stats(estimator, stats, old_logprobs)
        assert torch.allclose(kl, calc_kl_k3(stats.logprobs, stats.ref_logprobs), atol=1e-5)
        seen.append((estimator, kl.mean().item()))
        return kl

    monkeypatch.setattr(policy_outputs, "calc_kl_from_stats", recording_calc_kl)
    metrics = trainer.train_one_phase().metrics
    assert seen and all(estimator == "k3" for estimator, _ in seen)
    # Every learning step's KL penalty is kl_coef times the k3 estimate's mean.
    penalties = [0.7 * kl for _, kl in seen]
    assert metrics["losses/kl_penalty"] == pytest.approx(sum(penalties) / len(penalties))
    assert {"charts/kl", "charts/kl_k3", "charts/kl_coef"} <= set(metrics)
    assert metrics["charts/kl_coef"] == 0.7


def test_kl_in_the_reward_leaves_the_loss_without_it(make_printable_model):
    trainer = make_trainer(make_printable_model(seed=3), advantage_estimator="reinforce_pp",
                           kl_in="reward")
    for _ in range(2):
        metrics = trainer.train_one_phase().metrics
    assert metrics["losses/kl_penalty"] == 0.0 and metrics["charts/kl"] > 0


def test_adaptive_kl_coefficient_moves_and_is_checkpointed(make_printable_model):
    """A first phase has KL 0 (policy = reference): the error is clipped to -0.2, so with 8
    samples and horizon 100 the coefficient shrinks by 0.2 * 8 / 100 = 1.6%."""
    overrides = dict(kl_target=1.0, kl_horizon=100, kl_coef=0.5)
    trainer = make_trainer(make_printable_model(seed=4), **overrides)
    first = trainer.train_one_phase().metrics
    assert first["charts/kl_coef"] == 0.5
    assert trainer.kl_controller.value == pytest.approx(0.5 * (1 - 0.2 * 8 / 100))
    state = trainer.state_dict()
    resumed = make_trainer(make_printable_model(seed=4), **overrides)
    resumed.load_state_dict(state)
    assert resumed.kl_controller.value == trainer.kl_controller.value
    second = trainer.train_one_phase().metrics
    assert resumed.train_one_phase().metrics["charts/kl_coef"] == second["charts/kl_coef"]


def test_ppo_keeps_its_value_head(make_printable_model):
    trainer = make_trainer(make_printable_model(seed=5), advantage_estimator="gae")
    metrics = trainer.train_one_phase().metrics
    assert CRITIC_KEYS <= set(metrics)
    assert len(trainer.optimizer.param_groups) == 2
    assert torch.isfinite(torch.tensor(metrics["losses/value_loss"]))


def value_head_tensors(trainer: RLHFTrainer) -> list[str]:
    """The names of the value head's tensors in the trainer's checkpoint."""
    return [name for name in trainer.state_dict()["model"] if name.startswith("value_head.")]


def build_policy_with_a_head(base_model, args) -> TransformerWithValueHead:
    """The known-wrong policy: a value head whatever the estimator (as before critic-free
    policies lost theirs), which would be saved, and restored, for nothing."""
    policy = build_policy(base_model, args)
    return TransformerWithValueHead(base_model, args.temperature, args.fast_path,
                                    value_head=True, frozen_layers=policy.frozen_layers)


def test_a_critic_free_checkpoint_holds_no_value_head(make_printable_model, monkeypatch):
    trainer = make_trainer(make_printable_model(seed=6), advantage_estimator="grpo", group_size=2)
    trainer.train_one_phase()
    assert value_head_tensors(trainer) == []
    resumed = make_trainer(make_printable_model(seed=6), advantage_estimator="grpo",
                           group_size=2)
    resumed.load_state_dict(trainer.state_dict())  # and it loads where no head is expected
    # The check sees a head where there is one: PPO's, and a critic-free policy given one.
    assert value_head_tensors(make_trainer(make_printable_model(seed=6),
                                           advantage_estimator="gae"))
    monkeypatch.setattr(trainer_module, "build_policy", build_policy_with_a_head)
    wrong = make_trainer(make_printable_model(seed=6), advantage_estimator="grpo", group_size=2)
    assert value_head_tensors(wrong)
