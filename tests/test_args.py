"""Tests for minirlhf.args.RLHFArgs: validation with messages a learner understands (shared with
RewardModelArgs), derived fields, and a JSON round trip. Each check also rejects a plausible wrong
version."""

import dataclasses
import json
from collections.abc import Callable

import pytest
from jaxtyping import TypeCheckError

from minirlhf.args import RLHFArgs
from minirlhf.pairs.reward_training import RewardModelArgs


def test_defaults_are_valid_and_minibatch_size_is_derived():
    args = RLHFArgs()
    assert args.minibatch_size == args.batch_size // args.num_minibatches
    assert RLHFArgs(batch_size=48, num_minibatches=6).minibatch_size == 8
    assert RLHFArgs(batch_size=5, num_minibatches=5).minibatch_size == 1


def test_minibatch_size_is_not_an_argument():
    with pytest.raises(TypeError):
        RLHFArgs(minibatch_size=3)


# Each bad config with words its message must contain, so a learner knows what to change.
BAD_CONFIGS = [
    (dict(batch_size=30, num_minibatches=4),
     ["batch_size (30)", "divisible", "num_minibatches (4)"]),
    (dict(total_phases=10, warmup_steps=10), ["warmup_steps (10)", "total_phases (10)"]),
    (dict(total_phases=10, warmup_steps=25), ["warmup_steps (25)", "less than"]),
    (dict(warmup_steps=-1), ["warmup_steps (-1)"]),
    (dict(gen_len=0), ["gen_len", "at least 1", "0"]),
    (dict(batch_size=0), ["batch_size", "at least 1"]),
    (dict(total_phases=-3), ["total_phases", "-3"]),
    (dict(num_minibatches=0), ["num_minibatches", "at least 1"]),
    (dict(batches_per_learning_phase=0), ["batches_per_learning_phase"]),
    (dict(temperature=0.0), ["temperature"]),
    (dict(top_k=0), ["top_k"]),
    (dict(top_p=1.5), ["top_p"]),
    (dict(gae_lambda=1.5), ["gae_lambda"]),
    (dict(final_scale=2.0), ["final_scale"]),
    (dict(base_lr=0.0), ["base_lr"]),
    (dict(kl_coef=-1.0), ["kl_coef"]),
]


BAD_REWARD_MODEL_CONFIGS = [
    (dict(epochs=0), ["epochs", "at least 1", "0"]),
    (dict(eval_every=0), ["eval_every", "at least 1"]),
    (dict(trainable_layers=-1), ["trainable_layers", "at least 0", "-1"]),
    (dict(held_out_fraction=1.0), ["held_out_fraction", "(0, 1)"]),
    (dict(base_lr=0.0), ["base_lr", "> 0"]),
    (dict(head_lr=-1.0), ["head_lr", "> 0"]),
    (dict(normalize_samples=1), ["normalize_samples", "at least 2"]),
]


def validation_problem(cls: Callable, bad_configs: list = BAD_CONFIGS) -> str | None:
    """None if every bad config raises a ValueError holding its words, else what went wrong."""
    for kwargs, words in bad_configs:
        try:
            cls(**kwargs)
        except ValueError as error:
            missing = [word for word in words if word not in str(error)]
            if missing:
                return f"{cls.__name__}(**{kwargs}) raised {str(error)!r}, without {missing}"
        else:
            return f"{cls.__name__}(**{kwargs}) raised no ValueError"
    return None


@dataclasses.dataclass
class ArgsWithoutChecks(RLHFArgs):
    """A plausible wrong version: derives minibatch_size (rounding down) but validates nothing."""

    def __post_init__(self):
        self.minibatch_size = self.batch_size // max(self.num_minibatches, 1)


@dataclasses.dataclass
class ArgsWithTerseMessages(RLHFArgs):
    """Checks everything, but says only that something is wrong."""

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError:
            raise ValueError("invalid arguments") from None


def test_invalid_configs_raise_helpful_errors():
    problem = validation_problem(RLHFArgs)
    assert problem is None, problem


def test_invalid_reward_model_configs_raise_helpful_errors():
    problem = validation_problem(RewardModelArgs, BAD_REWARD_MODEL_CONFIGS)
    assert problem is None, problem


@pytest.mark.parametrize("wrong", [ArgsWithoutChecks, ArgsWithTerseMessages])
def test_validation_check_rejects_wrong_versions(wrong):
    assert validation_problem(wrong) is not None


def test_unknown_advantage_estimator_is_refused():
    """Under the test's runtime checker the Literal annotation refuses it before __post_init__;
    without the checker (the CLI) __post_init__'s ValueError does. Either names the field."""
    with pytest.raises((ValueError, TypeCheckError), match="advantage_estimator"):
        RLHFArgs(advantage_estimator="td")


def test_the_divisibility_message_suggests_a_batch_size():
    with pytest.raises(ValueError, match="batch_size=28"):
        RLHFArgs(batch_size=30, num_minibatches=4)


# ---------------------------------------------------------------- serialisation


def round_trip_problem(to_dict: Callable, from_dict: Callable) -> str | None:
    """None if to_dict -> JSON -> from_dict gives back an equal config, derived fields included;
    else what went wrong."""
    args = RLHFArgs(
        seed=7, batch_size=12, num_minibatches=3, top_k=10, top_p=0.9, device="cpu",
        advantage_estimator="gae", prefix="Once upon a time", prepend_bos=False,
    )
    try:
        data = json.loads(json.dumps(to_dict(args)))
        restored = from_dict(data)
    except (TypeError, ValueError) as error:
        return f"raised {error!r}"
    if restored != args or restored.minibatch_size != 4:
        return f"restored {restored}, expected {args}"
    if data.get("minibatch_size") != 4:
        return f"the saved dict has minibatch_size {data.get('minibatch_size')}, expected 4"
    return None


def wrong_from_dict(values: dict) -> RLHFArgs:
    """Feeds every key back to the constructor, the derived minibatch_size included."""
    return RLHFArgs(**values)


def wrong_to_dict(args: RLHFArgs) -> dict:
    """`vars` of the init fields only: loses minibatch_size (and so the logged config lies)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}


def test_to_dict_from_dict_round_trip():
    problem = round_trip_problem(RLHFArgs.to_dict, RLHFArgs.from_dict)
    assert problem is None, problem


def test_round_trip_check_rejects_wrong_versions():
    assert round_trip_problem(RLHFArgs.to_dict, wrong_from_dict) is not None
    assert round_trip_problem(wrong_to_dict, RLHFArgs.from_dict) is not None


def test_from_dict_refuses_the_fields_of_older_configs():
    """No format shims: a config from before `precision` and `fast_path` is refused by name."""
    data = RLHFArgs().to_dict()
    del data["precision"], data["fast_path"]
    for old in ({"autocast": True}, {"fast_forward": True}):
        with pytest.raises(ValueError, match=f"Unknown RLHFArgs fields: \\['{next(iter(old))}'\\]"):
            RLHFArgs.from_dict({**data, **old})


def test_precision_must_be_a_known_name():
    with pytest.raises((ValueError, TypeCheckError), match="precision"):
        RLHFArgs(precision="fp16")


def test_from_dict_rejects_unknown_fields():
    data = RLHFArgs().to_dict()
    data["kl_coeff"] = 0.1  # a typo must not be silently ignored
    with pytest.raises(ValueError, match="kl_coeff"):
        RLHFArgs.from_dict(data)


def test_to_dict_holds_no_callables():
    """Reward functions live in the trainer, not the config: every value is plain data."""
    for value in RLHFArgs().to_dict().values():
        assert value is None or isinstance(value, (bool, int, float, str))


def test_a_negative_seed_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="seed"):
        RLHFArgs(seed=-1)


# ---------------------------------------------------------------- critic-free options (issue 14)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_a_group_estimator_refuses_groups_of_one(estimator):
    with pytest.raises(ValueError, match=f'"{estimator}" compares the samples of one prompt'):
        RLHFArgs(advantage_estimator=estimator, group_size=1)
    args = RLHFArgs(advantage_estimator=estimator, group_size=4, batch_size=32)
    assert (args.prompts_per_phase, args.critic_free) == (8, True)


def test_reinforce_pp_needs_no_groups_and_ppo_keeps_its_critic():
    assert RLHFArgs(advantage_estimator="reinforce_pp", kl_in="reward").critic_free
    assert not RLHFArgs(advantage_estimator="gae").critic_free


def test_critic_free_options_are_checked():
    with pytest.raises(ValueError, match="multiple of group_size"):
        RLHFArgs(batch_size=32, group_size=5)
    with pytest.raises(ValueError, match='only advantage_estimator="reinforce_pp"'):
        RLHFArgs(advantage_estimator="gae", kl_in="reward")
    assert RLHFArgs(advantage_estimator="reinforce_pp_baseline", kl_in="reward",
                    group_size=4).kl_in == "reward"
    with pytest.raises(ValueError, match="kl_target must be > 0"):
        RLHFArgs(kl_target=0.0)
    args = RLHFArgs(kl_estimator="k3", kl_target=6.0, group_size=4, advantage_estimator="rloo")
    assert RLHFArgs.from_dict(args.to_dict()) == args
