"""Tests for minirlhf.runtime.tied: one matrix for the embedding and the unembedding.

Oracles: the untied model (TransformerLens's two parameters, equal at the start), whose two
gradients summed are the gradient of the shared matrix (the chain rule for a weight used
twice), a hand-written SGD step, and Hugging Face's own count of a tied model's parameters.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import GPT2Config, GPT2LMHeadModel

from minirlhf import cli
from minirlhf.args import RLHFArgs
from minirlhf.cli.run_folder import load_run_policy
from minirlhf.models import frozen_copy
from minirlhf.pairs.reward_model import load_reward_model
from minirlhf.rewards import reward_fn_char_count
from minirlhf.runtime import hf_checkpoints
from minirlhf.runtime.export import export_hf
from minirlhf.runtime.hf_checkpoints import load_hf_folder
from minirlhf.runtime.loading import get_gpt2_tokenizer
from minirlhf.runtime.tied import (
    TiedUnembed,
    is_tied,
    tie_unembedding,
    untie_if_saved_apart,
)
from minirlhf.trainer import RLHFTrainer

TOKENS = torch.tensor([[5, 17, 13, 40, 2, 13, 88, 61], [1, 2, 3, 4, 5, 6, 7, 8]])


def make_pair(make_printable_model):
    """An untied model whose W_U is set to W_E.T, and a tied copy of it."""
    untied = make_printable_model(seed=3)
    with torch.no_grad():
        untied.unembed.W_U.copy_(untied.embed.W_E.T)
    return untied, tie_unembedding(copy.deepcopy(untied))


def loss_of(model) -> torch.Tensor:
    """Next-token cross-entropy of TOKENS: uses the matrix both to embed and to unembed."""
    logits = model(TOKENS)[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten())


def test_a_tied_model_holds_one_matrix_and_computes_the_same_logits(make_printable_model):
    untied, tied = make_pair(make_printable_model)
    assert is_tied(tied) and not is_tied(untied)
    assert tied.unembed.W_U.data_ptr() == tied.embed.W_E.data_ptr()  # a view, not a copy
    assert "unembed.W_U" not in tied.state_dict()
    n_untied = sum(p.numel() for p in untied.parameters())
    assert sum(p.numel() for p in tied.parameters()) == n_untied - untied.W_U.numel()
    torch.testing.assert_close(tied(TOKENS), untied(TOKENS), rtol=0, atol=0)


def test_the_tied_gradient_is_the_sum_of_both_uses(make_printable_model):
    untied, tied = make_pair(make_printable_model)
    loss_of(untied).backward()
    loss_of(tied).backward()
    expected = untied.embed.W_E.grad + untied.unembed.W_U.grad.T
    # Both uses matter: the unembedding's share is the larger, the embedding's is not zero.
    assert untied.embed.W_E.grad.abs().sum() > 0
    torch.testing.assert_close(tied.embed.W_E.grad, expected)


def test_the_gradient_check_fails_on_a_detached_tie(make_printable_model, monkeypatch):
    """A tie that reads W_E without its gradient (W_E.detach().T) trains only the embedding's
    use of the matrix: the check above must catch it."""
    untied, tied = make_pair(make_printable_model)
    monkeypatch.setattr(TiedUnembed, "W_U", property(lambda self: self._tied_to[0].W_E.detach().T))
    loss_of(untied).backward()
    loss_of(tied).backward()
    expected = untied.embed.W_E.grad + untied.unembed.W_U.grad.T
    assert not torch.allclose(tied.embed.W_E.grad, expected)


def test_an_optimiser_step_moves_both_uses_together(make_printable_model):
    untied, tied = make_pair(make_printable_model)
    loss_of(untied).backward()
    expected = untied.embed.W_E.detach() - 0.1 * (untied.embed.W_E.grad + untied.unembed.W_U.grad.T)
    optimizer = torch.optim.SGD(tied.parameters(), lr=0.1)
    loss_of(tied).backward()
    optimizer.step()
    torch.testing.assert_close(tied.embed.W_E.detach(), expected)
    assert torch.equal(tied.unembed.W_U, tied.embed.W_E.T)


def test_a_copy_is_tied_to_its_own_embedding(make_printable_model):
    """The reference model is a deep copy: tied within itself, sharing nothing trained."""
    _, tied = make_pair(make_printable_model)
    reference = frozen_copy(tied)
    assert is_tied(reference)
    assert reference.unembed.W_U.data_ptr() == reference.embed.W_E.data_ptr()
    assert reference.embed.W_E.data_ptr() != tied.embed.W_E.data_ptr()
    with torch.no_grad():
        tied.embed.W_E.add_(1.0)
    assert not torch.equal(reference.unembed.W_U, tied.unembed.W_U)


def test_the_unembedding_hooks_still_fire(make_printable_model):
    _, tied = make_pair(make_printable_model)
    logits, cache = tied.run_with_cache(TOKENS, names_filter="unembed.hook_out")
    torch.testing.assert_close(cache["unembed.hook_out"], logits)


def test_an_untied_checkpoint_is_refused_unless_untied_first(make_printable_model):
    untied, tied = make_pair(make_printable_model)
    tied.load_state_dict(untied.state_dict())  # W_U equal to W_E.T: accepted
    with torch.no_grad():
        untied.unembed.W_U.mul_(1.5)  # trained apart from the embedding
    state = untied.state_dict()
    with pytest.raises(RuntimeError, match="tie_word_embeddings"):
        tied.load_state_dict(state)
    untie_if_saved_apart(tied, state)
    assert not is_tied(tied)
    tied.load_state_dict(state)
    torch.testing.assert_close(tied(TOKENS), untied(TOKENS), rtol=0, atol=0)


@pytest.fixture(scope="module")
def tied_gpt2_folder(tmp_path_factory) -> tuple[GPT2LMHeadModel, Path]:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32, tie_word_embeddings=True)
    hf_model = GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("tied")
    hf_model.save_pretrained(folder)
    get_gpt2_tokenizer().save_pretrained(folder)
    return hf_model, folder


def test_a_tied_checkpoint_loads_tied_with_its_parameter_count(tied_gpt2_folder):
    hf_model, folder = tied_gpt2_folder
    model = load_hf_folder(folder)
    assert is_tied(model)
    # transformers counts a tied matrix once; TransformerLens's b_U (zero) is the difference.
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == hf_model.num_parameters() + model.cfg.d_vocab


def test_a_tied_model_exports_and_reloads_with_the_same_logits(tied_gpt2_folder, tmp_path):
    _, folder = tied_gpt2_folder
    model = load_hf_folder(folder)
    with torch.no_grad():
        model.embed.W_E.mul_(1.1)  # "trained": the export must carry the moved matrix
    export_hf(model, tmp_path / "out")
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["tie_word_embeddings"] is True  # transformers keeps one matrix too
    reloaded = load_hf_folder(tmp_path / "out")
    assert is_tied(reloaded)
    tokens = torch.tensor([[464, 3807, 373, 257, 1310]])
    torch.testing.assert_close(reloaded(tokens), model(tokens), atol=1e-4, rtol=1e-4)


def test_full_weight_training_keeps_the_tie_and_the_reference_apart(make_printable_model):
    _, tied = make_pair(make_printable_model)
    start = tied.embed.W_E.detach().clone()
    args = RLHFArgs(total_phases=1, batch_size=8, num_minibatches=2, gen_len=5, warmup_steps=0,
                    base_lr=3e-3, prefix="A", prepend_bos=False, advantage_estimator="grpo",
                    group_size=4, device="cpu")
    trainer = RLHFTrainer(args, reward_fn_char_count, base_model=tied,
                          console=Console(quiet=True), table_every=0)
    trainer.train()
    policy, reference = trainer.model.base_model, trainer.reference.model
    assert not torch.equal(policy.embed.W_E, start)
    assert torch.equal(policy.unembed.W_U, policy.embed.W_E.T)
    assert torch.equal(reference.unembed.W_U, start.T)


def test_a_run_trained_before_the_tie_is_read_back_untied(tied_gpt2_folder, tmp_path,
                                                          monkeypatch):
    """A run folder whose checkpoint holds its own trained W_U (minirlhf trained tied models
    untied before 2026-12-07) still loads, with that W_U, for sample / eval / export."""
    _, folder = tied_gpt2_folder
    out = tmp_path / "run"
    with monkeypatch.context() as old_minirlhf:  # loads tied checkpoints untied, as it did
        old_minirlhf.setattr(hf_checkpoints, "tie_unembedding", lambda model: model)
        cli.main(["train", "--preset", "tiny-smoke", "--base-model", str(folder),
                  "--table-every", "0", "--batch-size", "4", "--gen-len", "6",
                  "--total-phases", "1", "--out", str(out)])
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]["model"]
    W_U, W_E = saved["base_model.unembed.W_U"], saved["base_model.embed.W_E"]
    assert not torch.equal(W_U, W_E.T)  # the two were trained apart
    policy = load_run_policy(out).policy
    assert not is_tied(policy)
    torch.testing.assert_close(policy.W_U, W_U, rtol=0, atol=0)
    torch.testing.assert_close(policy.W_E, W_E, rtol=0, atol=0)


def test_a_reward_model_trained_before_the_tie_is_read_back_untied(tied_gpt2_folder, tmp_path,
                                                                   monkeypatch):
    """The same for a reward model: every weight trained, its unembedding unused and so left
    where it was while the embedding moved."""
    _, folder = tied_gpt2_folder
    prefs, out = tmp_path / "prefs.jsonl", tmp_path / "rm"
    base = ["--base-model", str(folder)]
    with monkeypatch.context() as old_minirlhf:
        old_minirlhf.setattr(hf_checkpoints, "tie_unembedding", lambda model: model)
        cli.main(["preferences", *base, "--prompt", "This is", "--num-pairs", "8", "--gen-len",
                  "4", "--batch-size", "16", "--judge", "char_count", "--char", "e",
                  "--out", str(prefs)])
        cli.main(["reward-model", "--data", str(prefs), "--out", str(out), *base, "--epochs",
                  "1", "--batch-size", "8", "--trainable-layers", "none",
                  "--normalize-samples", "8", "--normalize-prompt", "This is",
                  "--normalize-gen-len", "4"])
    reward_model, _ = load_reward_model(out)
    assert not is_tied(reward_model.base_model)
