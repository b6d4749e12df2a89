"""Activation checkpointing (`RLHFArgs.activation_checkpointing`, `fast_path.forward`'s
`checkpoint_blocks`): the learning step keeps each block's input instead of its activations and
runs the block again in the backward pass. The oracles: TransformerLens's own forward and
backward for values and gradients, autograd's saved-tensor hooks for what is kept, and a count of
the blocks run during the backward pass; each check fails on a version that ignores the setting.
"""

import copy

import pytest
import torch
from rich.console import Console
from test_fast_path import MODELS, max_diff_real, padded_batch
from test_trainer import one_phase, training_difference

from minirlhf.args import RLHFArgs
from minirlhf.rewards import reward_fn_char_count
from minirlhf.runtime import fast_blocks
from minirlhf.runtime import fast_path as ff
from minirlhf.trainer import RLHFTrainer


def checkpointed_forward(model, tokens, mask, checkpoint_blocks: bool):
    weights = ff.get_fast_weights(model)
    residual = ff.forward(weights, tokens, mask, checkpoint_blocks=checkpoint_blocks)
    return ff.unembed(weights.output, residual)


@pytest.fixture(params=sorted(MODELS))
def model(request: pytest.FixtureRequest):
    return MODELS[request.param]()


def test_checkpointed_blocks_give_transformer_lens_values_and_gradients(model):
    tokens, mask = padded_batch(model.cfg.d_vocab)
    twin = copy.deepcopy(model)
    expected = model(tokens, attention_mask=mask)
    expected[mask.bool()].logsumexp(-1).sum().backward()
    got = checkpointed_forward(twin, tokens, mask, checkpoint_blocks=True)
    got[mask.bool()].logsumexp(-1).sum().backward()
    assert max_diff_real(got, expected, mask) < 1e-5
    for (name, want), (_, have) in zip(model.named_parameters(), twin.named_parameters()):
        assert have.grad is not None, f"no gradient reached {name}"
        assert torch.allclose(have.grad, want.grad, atol=1e-4, rtol=1e-3), name


def kept_and_rerun(model, checkpoint_blocks: bool, monkeypatch) -> tuple[int, int]:
    """(bytes autograd keeps for the backward pass, blocks run during the backward pass)."""
    tokens, mask = padded_batch(model.cfg.d_vocab)
    kept, runs = [], {"forward": 0, "backward": 0}
    phase = "forward"

    def counting_block(*args, **kwargs):
        runs[phase] += 1
        return run_block(*args, **kwargs)

    run_block = fast_blocks.run_block
    monkeypatch.setattr(ff, "run_block", counting_block)
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t):
        logits = checkpointed_forward(model, tokens, mask, checkpoint_blocks)
    phase = "backward"
    logits.logsumexp(-1).sum().backward()
    assert runs["forward"] == model.cfg.n_layers
    return sum(kept), runs["backward"]


def test_checkpointed_blocks_keep_a_residual_per_block_and_rerun_each_once(model, monkeypatch):
    """Without checkpointing, autograd keeps every block's activations (Q, K, V, the attention
    pattern, the MLP's hidden layer) and reruns nothing; with it, a fraction of that, and every
    block runs once more in the backward pass."""
    kept_plain, rerun_plain = kept_and_rerun(model, False, monkeypatch)
    kept_lean, rerun_lean = kept_and_rerun(model, True, monkeypatch)
    assert (rerun_plain, rerun_lean) == (0, model.cfg.n_layers)
    assert kept_lean < 0.25 * kept_plain, (kept_lean, kept_plain)


def test_the_checks_above_see_checkpointing_ignored(monkeypatch):
    forward = ff.forward
    monkeypatch.setattr(ff, "forward", lambda *args, checkpoint_blocks=False, **kwargs:
                        forward(*args, **kwargs))
    model = MODELS["llama"]()
    kept_plain, _ = kept_and_rerun(model, False, monkeypatch)
    kept_lean, rerun_lean = kept_and_rerun(model, True, monkeypatch)
    assert rerun_lean == 0 and kept_lean == kept_plain


def counted_phase(model, monkeypatch, **overrides) -> tuple[tuple, int]:
    """`one_phase`, and how many blocks it ran."""
    runs, run_block = [], fast_blocks.run_block
    monkeypatch.setattr(ff, "run_block", lambda *args: runs.append(1) or run_block(*args))
    return one_phase(model, **overrides), len(runs)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_a_checkpointed_learning_phase_trains_the_same(make_printable_model, monkeypatch,
                                                       estimator):
    """One rollout and learning phase, every weight trained, with and without checkpointing:
    the same samples, losses and weights after the step (the value head's gradient too), and
    each learning step's backward pass runs every block once more."""
    overrides = {"advantage_estimator": estimator, "group_size": 2}
    plain, plain_runs = counted_phase(make_printable_model(seed=5), monkeypatch, **overrides)
    lean, lean_runs = counted_phase(make_printable_model(seed=5), monkeypatch,
                                    activation_checkpointing=True, **overrides)
    trainer = lean[0]
    assert lean_runs - plain_runs == trainer.global_step * trainer.model.base_model.cfg.n_layers
    problem = training_difference(plain, lean)
    assert problem is None, problem


def test_checkpointing_without_the_fast_path_is_refused(make_printable_model):
    args = RLHFArgs(fast_path=False, activation_checkpointing=True, batch_size=4, gen_len=4,
                    prefix="A", prepend_bos=False)
    with pytest.raises(ValueError, match="activation_checkpointing runs on the fast path.*"
                                         "fast_path is off"):
        RLHFTrainer(args, reward_fn_char_count, base_model=make_printable_model(),
                    console=Console(quiet=True), table_every=0)
