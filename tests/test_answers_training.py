"""Answers that end, in the trainer: fixed-length runs unchanged, a policy that learns to stop, and
the sampler's log-probs equal to the rollout's.

All on the 94-token printable model (conftest.py). Its vocabulary has no EOS (GPT-2's 50256 is out
of it), so with `stop_at_eos` no answer ever ends; `with_period_eos` gives a copy of it one: the
period, id 13, which a random policy emits once every 94 tokens.
"""

import copy

import pytest
import torch
from rich.console import Console

from minirlhf import RLHFArgs, RLHFTrainer
from minirlhf.rewards import reward_fn_char_count

PERIOD = 13
# Library bug (models.gather_rollout -> runtime.distributed.gather_rows): gather_rows is annotated
# Float[Tensor, "batch ..."], but gather_rollout passes it the response mask (int64) and `ended`
# (bool), so under the runtime type checker every run with stop_at_eos=True stops in its first
# rollout. Fix: annotate gather_rows (and its return) Shaped[Tensor, ...]. Remove this mark then.
ANSWER_KEYS = {"charts/response_length", "charts/response_length_max", "charts/frac_truncated",
               "charts/logprob_gap_mean", "charts/logprob_gap_max"}


def with_period_eos(model):
    """The model with a private copy of its tokenizer whose EOS is '.' (the shared tokenizer
    object is left alone)."""
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.eos_token = "."
    assert tokenizer.eos_token_id == PERIOD
    model.tokenizer = tokenizer
    return model


def likes_periods(model):
    """The model with '.' made about 20 times likelier (an untrained one writes it once in 94
    tokens), so some answers of a small batch end."""
    with torch.no_grad():
        model.unembed.b_U[PERIOD] += 3.0
    return model


def make_trainer(model, reward_fn=reward_fn_char_count, **overrides) -> RLHFTrainer:
    args = RLHFArgs(**{**dict(total_phases=2, batch_size=8, num_minibatches=2, gen_len=6,
                              prefix="a", prepend_bos=False, warmup_steps=0, seed=0,
                              kl_coef=0.5, base_lr=1e-2, head_lr=1e-2), **overrides})
    return RLHFTrainer(args, reward_fn, base_model=model, console=Console(quiet=True),
                       table_every=0)


def run_phases(trainer: RLHFTrainer, phases: int) -> list[dict[str, float]]:
    return [trainer.train_one_phase().metrics for _ in range(phases)]


def comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in metrics.items() if not key.endswith("_time")}


# ---------------------------------------------------------------- no row ends: nothing changes


def never_ending_pair(make_printable_model, estimator):
    """Two phases of fixed-length training, and two of stop_at_eos=True where no answer can end
    (no EOS in the vocabulary), from the same model and seed."""
    overrides = dict(advantage_estimator=estimator, group_size=2 if estimator == "grpo" else 1)
    fixed = run_phases(make_trainer(make_printable_model(seed=2), **overrides), 2)
    ending = run_phases(make_trainer(make_printable_model(seed=2), stop_at_eos=True,
                                     **overrides), 2)
    return [(comparable(a), comparable(b)) for a, b in zip(fixed, ending)]


@pytest.mark.parametrize("estimator", ["one_step", "gae", "grpo"])
def test_answers_that_never_end_train_bit_identically(make_printable_model, estimator):
    """Every shared metric equal (==) phase after phase, plus the answers' own keys (all but
    charts/kl_per_answer: the next test)."""
    for before, after in never_ending_pair(make_printable_model, estimator):
        shared = (before.keys() & after.keys()) - {"charts/kl_per_answer"}
        assert {key: after[key] for key in shared} == {key: before[key] for key in shared}
        assert after.keys() - before.keys() == {"charts/frac_truncated"}
        assert after["charts/frac_truncated"] == 1.0  # nothing ended
        assert ANSWER_KEYS <= after.keys()


# Library bug (metrics.get_rollout_metrics, "charts/kl_per_answer"): without a mask it is
# mean(KL) * gen_len, with one (exact_kl * mask).sum(-1).mean(): equal in exact arithmetic, not in
# float32 (3.1362398e-07 vs 3.1362396e-07 here), and it is the KL controller's input
# (Rollout.kl), so with kl_target the coefficient drifts too. Fix: one formula for both, e.g.
# torch.where(mask, exact_kl, 0).sum(-1).mean() with an all-ones mask when there is none.
def test_kl_per_answer_is_bit_identical_too(make_printable_model):
    for before, after in never_ending_pair(make_printable_model, "one_step"):
        assert after["charts/kl_per_answer"] == before["charts/kl_per_answer"]


def test_the_identity_check_can_fail(make_printable_model):
    """The comparison above sees a change: the same run with a period as EOS (answers end) does
    not match the fixed-length one."""
    fixed = comparable(run_phases(make_trainer(make_printable_model(seed=2)), 1)[0])
    model = likes_periods(with_period_eos(make_printable_model(seed=2)))
    ending = comparable(run_phases(make_trainer(model, stop_at_eos=True), 1)[0])
    assert ending["charts/frac_truncated"] < 1.0
    assert ending["charts/response_length"] != fixed["charts/response_length"]


# ---------------------------------------------------------------- a policy learns to stop


def pay_for_short_answers(responses: list[str]) -> list[float]:
    """-1 for an answer that used all 8 tokens, 0 for one that ended at once (its EOS alone):
    the responses come without their EOS, one character per token."""
    return [-len(response) / 8 for response in responses]


def test_a_reward_for_ending_early_shortens_the_answers(make_printable_model):
    model = with_period_eos(make_printable_model(seed=1))
    trainer = make_trainer(model, pay_for_short_answers, total_phases=10, batch_size=32,
                           gen_len=8, kl_coef=0.0, stop_at_eos=True)
    history = run_phases(trainer, 10)
    lengths = [m["charts/response_length"] for m in history]
    truncated = [m["charts/frac_truncated"] for m in history]
    assert lengths[0] > 7 and truncated[0] > 0.8  # a random policy rarely writes a period
    assert max(lengths[-3:]) < 3 and max(truncated[-3:]) <= 0.1, (lengths, truncated)
    assert all(m["charts/response_length_max"] <= 8 for m in history)


# ---------------------------------------------------------------- sampler and rollout agree


def test_the_sampler_and_the_rollout_log_probs_agree_exactly(make_printable_model):
    """fp32 on the fast path: the log-prob each token was drawn with is the one the loss
    reads, bit for bit, on every real token of a whole phase (answers ending or not)."""
    model = likes_periods(with_period_eos(make_printable_model(seed=3)))
    metrics = run_phases(make_trainer(model, stop_at_eos=True, temperature=2.0, gen_len=12), 2)
    for phase in metrics:
        assert phase["charts/frac_truncated"] < 1.0  # some answers ended
        assert phase["charts/logprob_gap_max"] == 0.0 and phase["charts/logprob_gap_mean"] == 0.0


def test_a_gap_shows_where_the_two_forwards_differ(make_printable_model):
    """The gap metric can see a difference: TransformerLens's forward with its own KV cache
    (fast_path=False) rounds differently from the full forward of the rollout."""
    model = likes_periods(with_period_eos(make_printable_model(seed=3)))
    metrics = run_phases(make_trainer(model, stop_at_eos=True, temperature=2.0, gen_len=12,
                                      fast_path=False), 1)[0]
    assert 0.0 < metrics["charts/logprob_gap_max"] < 1e-4
    assert metrics["charts/logprob_gap_mean"] <= metrics["charts/logprob_gap_max"]


def test_the_gap_counts_only_real_tokens(make_printable_model, monkeypatch):
    """Padding after an answer's end (log-prob 0 in the sampler, whatever in the rollout) never
    enters the gap: a sampler that got its padding wrong still shows 0."""
    import minirlhf.trainer as trainer_module

    real_get_samples = trainer_module.get_samples

    def wrong_padding(*args, **kwargs):
        samples = real_get_samples(*args, **kwargs)
        if samples.logprobs is None or samples.response_mask is None:
            return samples
        logprobs = torch.where(samples.response_mask.bool(), samples.logprobs, -123.0)
        return samples._replace(logprobs=logprobs)

    monkeypatch.setattr(trainer_module, "get_samples", wrong_padding)
    model = likes_periods(with_period_eos(make_printable_model(seed=3)))
    metrics = run_phases(make_trainer(model, stop_at_eos=True, temperature=2.0, gen_len=12), 1)[0]
    assert metrics["charts/frac_truncated"] < 1.0 and metrics["charts/logprob_gap_max"] == 0.0
