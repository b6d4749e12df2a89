"""What a learner sees when a check fails: their own traceback, the inputs, a case to re-run.

Each test plants a mistake written here (so its frames are in this file, as a learner's would be
in their notebook) and reads the error the check raises.
"""

import traceback
from pathlib import Path

import pytest
import torch

from minirlhf import exercises
from minirlhf.exercises import ExerciseCheckError, last_failure
from minirlhf.exercises.core import explain_scalar
from minirlhf.exercises.reporting import EXERCISES_DIR

HERE = str(Path(__file__).resolve())


def logprobs_that_crash(logits, tokens, prefix_len):
    logprobs = logits[:, prefix_len - 1 : -1].log_softmax(-1)
    return logprobs.gather(-1, tokens[:, prefix_len:])  # the planted crash: no trailing axis


def checker_frames(tb) -> list[str]:
    return [f.name for f in traceback.extract_tb(tb)
            if Path(f.filename).resolve().is_relative_to(EXERCISES_DIR)]


def test_a_crash_shows_the_learners_own_line_first():
    with pytest.raises(ExerciseCheckError) as caught:
        exercises.check_get_logprobs(logprobs_that_crash)
    cause = caught.value.__cause__
    assert isinstance(cause, RuntimeError)
    frames = traceback.extract_tb(cause.__traceback__)
    assert (frames[0].filename, frames[0].name) == (HERE, "logprobs_that_crash")
    assert checker_frames(cause.__traceback__) == []  # none of the checker's frames
    assert checker_frames(caught.value.__traceback__) == ["wrapper"]  # one, last
    message = str(caught.value)
    assert "Your code raised it at line" in message and "in logprobs_that_crash" in message
    assert "the planted crash" in message  # the source line itself is quoted


def test_an_unwritten_exercise_is_not_chained():
    def not_written(reward, eps=1e-5):
        raise NotImplementedError()

    with pytest.raises(ExerciseCheckError, match="replace `raise NotImplementedError") as caught:
        exercises.check_normalize_reward(not_written)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_wrong_answer_prints_its_inputs_as_code_and_can_be_rerun():
    def normalize_without_mean(reward, eps=1e-5):
        return reward / (reward.std(correction=0) + eps)

    with pytest.raises(ExerciseCheckError) as caught:
        exercises.check_normalize_reward(normalize_without_mean)
    message = str(caught.value)
    line = next(x for x in message.splitlines() if x.strip().startswith("reward = torch.tensor("))
    rebuilt = eval(line.split("=", 1)[1], {"torch": torch})  # the printed code runs
    failure = last_failure()
    assert failure.exercise == "normalize_reward" and failure.case in message
    assert torch.allclose(rebuilt, failure.inputs["reward"], rtol=1e-5)
    assert "exercises.last_failure().rerun(normalize_reward)" in message
    assert torch.equal(failure.rerun(normalize_without_mean), failure.got)
    assert "Expected result: torch.tensor(" in message


def test_strings_and_masks_of_a_failing_case_are_shown():
    with pytest.raises(ExerciseCheckError) as caught:
        exercises.check_reward_fn_char_count(
            lambda samples, char=".": torch.tensor([s.count(char) + 1.0 for s in samples]))
    assert "samples = ['a.b.c', '', '...', 'no periods here']" in str(caught.value)
    with pytest.raises(ExerciseCheckError) as caught:
        exercises.check_get_last_token_index(lambda attention_mask: attention_mask.sum(-1) - 2)
    assert "attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]" in str(
        caught.value)


def test_big_inputs_are_pointed_to_not_printed():
    with pytest.raises(ExerciseCheckError) as caught:
        exercises.check_get_logprobs(lambda logits, tokens, prefix_len: logits[:, :1, 0])
    assert 'logits = exercises.last_failure().inputs["logits"]  # float32 of shape (2, 6, 11)' in (
        str(caught.value))


def test_float_positions_fail_before_anything_is_printed_as_passed(capsys):
    def float_positions(attention_mask):
        return attention_mask.cumsum(-1).argmax(-1).float()

    with pytest.raises(ExerciseCheckError, match="return integers"):
        exercises.check_get_last_token_index(float_positions)
    assert "passed" not in capsys.readouterr().out


def test_a_scalar_off_by_its_sign_is_explained():
    assert "minus the expected" in explain_scalar(torch.tensor(2.0), torch.tensor(-2.0), {})
    assert explain_scalar(torch.tensor(2.0), torch.tensor(2.5), {"x": torch.zeros(3, 4)}) is None


class LogprobsInsteadOfLogits(torch.nn.Module):
    """A value head whose forward returns log-probs: a failure after the model was built."""

    def __init__(self, base_model):
        super().__init__()
        self.base_model = base_model
        self.value_head = torch.nn.Linear(base_model.cfg.d_model, 1)

    def forward(self, tokens):
        values = None

        def store(normalized, hook):
            nonlocal values
            values = self.value_head(normalized).squeeze(-1)

        logits = self.base_model.run_with_hooks(
            tokens, fwd_hooks=[("ln_final.hook_normalized", store)])
        return logits.log_softmax(-1), values


def test_the_rerun_line_of_a_class_builds_it_first():
    with pytest.raises(ExerciseCheckError) as caught:
        exercises.check_value_head(LogprobsInsteadOfLogits)
    rerun = str(caught.value).split("Re-run it: `", 1)[1].split("`", 1)[0]
    assert rerun.startswith("TransformerWithValueHead(")
    logits, values = eval(rerun, {"exercises": exercises,
                                  "TransformerWithValueHead": LogprobsInsteadOfLogits})
    assert logits.shape[:2] == values.shape == last_failure().inputs["tokens"].shape


def test_a_mistake_no_catalogued_one_reproduces_gets_no_hint():
    """States one position late, targets right: once named as another off-by-one mistake (each
    catalogued one matched some case); now no mistake matches every case, so no hint is shown."""
    def states_one_late(values, rewards, prefix_len):
        targets = torch.cat([values[:, prefix_len:-1], rewards[:, None]], dim=-1)
        return targets - values[:, prefix_len:]

    with pytest.raises(ExerciseCheckError) as caught:
        exercises.check_compute_one_step_advantages(states_one_late)
    assert "Likely mistake" not in str(caught.value)
    assert "First mismatch" in str(caught.value)
