"""The reward model: pairwise loss, last-token gather, padding, normalisation, training, saving.

Oracles: numbers worked by hand, `-F.logsigmoid`, a naive loop over the attention mask, and each
text scored alone (no padding at all) as the answer a padded batch must reproduce.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from minirlhf.pairs import reward_model as rm_module
from minirlhf.pairs.preferences import Preference
from minirlhf.pairs.reward_model import (
    RewardModel,
    calc_pairwise_loss,
    calc_pairwise_metrics,
    fit_normalization,
    gather_last_token,
    get_end_token_id,
    get_last_token_index,
    load_reward_model,
    make_reward_model_reward_fn,
    prepare_reward_model,
    save_reward_model,
    score_texts,
    tokenize_texts,
)
from minirlhf.pairs.reward_training import RewardModelArgs, TextScorer, evaluate, train_reward_model
from minirlhf.rewards import get_rewards
from minirlhf.runtime.loading import load_tiny_model

TEXTS = ["This movie was fine", "Great", "This movie was a long and rather dull affair, sadly",
         "I loved it"]


def make_rm(seed: int = 0, n_layers: int = 2) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(load_tiny_model(n_layers=n_layers, d_model=32, n_heads=2, n_ctx=64))


@pytest.fixture(scope="module")
def reward_model() -> RewardModel:
    """A shared tiny reward model. Do not train or renormalise it."""
    return make_rm()


# ---------------------------------------------------------------- the pairwise loss


def test_pairwise_loss_matches_numbers_worked_by_hand():
    # r_c - r_r = 0 -> log 2; = ln 3 -> log(1 + 1/3) = log(4/3); margin 1 on a gap of 1 -> log 2
    chosen, rejected = torch.tensor([0.5, math.log(3.0)]), torch.tensor([0.5, 0.0])
    assert calc_pairwise_loss(chosen, rejected).item() == pytest.approx(
        (math.log(2) + math.log(4 / 3)) / 2, abs=1e-6)
    loss = calc_pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert calc_pairwise_loss(torch.tensor([0.0]), torch.tensor([2.0])).item() == pytest.approx(
        math.log(1 + math.e**2), abs=1e-6)


def test_pairwise_loss_matches_minus_logsigmoid_and_its_gradient():
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randn(16, generator=generator, requires_grad=True)
    rejected = torch.randn(16, generator=generator, requires_grad=True)
    margin = torch.rand(16, generator=generator)
    for m in (None, margin):
        expected = -F.logsigmoid(chosen - rejected - (0 if m is None else m)).mean()
        got = calc_pairwise_loss(chosen, rejected, m)
        torch.testing.assert_close(got, expected)
        grad_got = torch.autograd.grad(got, chosen)[0]
        grad_expected = torch.autograd.grad(expected, chosen)[0]
        torch.testing.assert_close(grad_got, grad_expected)


def test_pairwise_loss_is_finite_for_rewards_far_apart():
    loss = calc_pairwise_loss(torch.tensor([-500.0, 500.0]), torch.tensor([500.0, -500.0]))
    assert loss.item() == pytest.approx(500.0)  # (1000 + 0) / 2


def test_metrics_count_chosen_above_rejected():
    metrics = calc_pairwise_metrics(torch.tensor([1.0, 0.0, 3.0, 2.0]),
                                    torch.tensor([0.0, 1.0, 1.0, 2.0]))
    assert metrics == {"accuracy": 0.5, "margin": pytest.approx(0.5)}  # a tie is not a win


# ---------------------------------------------------------------- the last real token


def naive_last_index(mask: torch.Tensor) -> list[int]:
    return [max(i for i, v in enumerate(row) if v == 1) for row in mask.tolist()]


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_index_matches_a_naive_loop(side):
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 12, (50,), generator=generator).tolist()
    mask = torch.zeros(50, 12, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, 12 - length :] = 1
    assert get_last_token_index(mask).tolist() == naive_last_index(mask)
    if side == "right":
        assert get_last_token_index(mask).tolist() == [n - 1 for n in lengths]


def test_gather_reads_the_value_at_the_last_real_token():
    values = torch.arange(12.0).reshape(2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    assert gather_last_token(values, mask).tolist() == [2.0, 11.0]


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_of_a_padded_batch_equals_each_text_alone(reward_model, side):
    alone = torch.cat([score_texts(reward_model, [text]) for text in TEXTS])
    tokens, mask = reward_model.tokenize(TEXTS, padding_side=side)
    assert (mask == 0).any(), "the batch must contain padding for this test to mean anything"
    with torch.no_grad():
        batched = reward_model(tokens, mask)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_reading_the_reward_at_a_padding_position_is_caught(reward_model, monkeypatch):
    """The padding test above can fail: read the last column, as a naive `rewards[:, -1]` does."""
    monkeypatch.setattr(rm_module, "get_last_token_index",
                        lambda mask: torch.full((mask.shape[0],), mask.shape[1] - 1))
    with pytest.raises(AssertionError):
        test_reward_of_a_padded_batch_equals_each_text_alone(reward_model, "right")


def test_the_unembedding_is_never_computed(reward_model, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the reward model computed logits")

    monkeypatch.setattr(reward_model.base_model.unembed, "forward", forbidden)
    tokens, mask = reward_model.tokenize(TEXTS)
    with torch.no_grad():
        per_position = reward_model.get_rewards_per_position(tokens, mask)
        rewards = reward_model(tokens, mask)
    index = get_last_token_index(mask)
    torch.testing.assert_close(rewards, per_position[torch.arange(len(TEXTS)), index])


def test_head_reads_the_final_normalised_residual(reward_model):
    tokens, mask = reward_model.tokenize(TEXTS[:2])
    with torch.no_grad():
        _, cache = reward_model.base_model.run_with_cache(tokens, attention_mask=mask)
        expected = reward_model.reward_head(cache["ln_final.hook_normalized"]).squeeze(-1)
        torch.testing.assert_close(reward_model.get_rewards_per_position(tokens, mask), expected)


def test_texts_are_read_between_bos_and_the_end_of_text_token(reward_model):
    tokens, mask = reward_model.tokenize(["Great", "I loved it"])
    eot = reward_model.base_model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert get_end_token_id(reward_model.base_model) == eot == 50256
    assert tokens[:, 0].tolist() == [eot, eot]  # GPT-2's BOS is the same token
    last = get_last_token_index(mask)
    assert tokens[torch.arange(2), last].tolist() == [eot, eot]
    assert mask.sum(-1).tolist() == [3, 5]  # BOS, "Great", EOT / BOS, "I", " loved", " it", EOT
    plain = RewardModel(reward_model.base_model, prepend_bos=False, append_end_token=False)
    assert plain.tokenize(["Great"])[0].tolist() == [[13681]]  # "Great" alone


def test_a_vocabulary_mismatch_fails_with_a_message(printable_model):
    with pytest.raises(ValueError, match="outside the model's 94-token vocabulary"):
        tokenize_texts(printable_model, ["Hello world, this is text"], prepend_bos=False)


def test_prepare_reward_model_freezes_the_bottom():
    model = make_rm(n_layers=3)
    assert prepare_reward_model(model, 1) == 2  # frozen blocks, what TextScorer runs once
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.startswith("base_model.blocks.2.") for name in trainable)
    assert not any(name.startswith(("base_model.blocks.0.", "base_model.blocks.1.",
                                    "base_model.embed")) for name in trainable)
    assert {"reward_head.weight", "reward_head.bias", "base_model.ln_final.w"} <= trainable
    assert prepare_reward_model(model, None) == 0 and prepare_reward_model(model, 5) == 0
    # Everything trains but the zero unembedding bias (`models.freeze_absent_unembed_bias`; a
    # reward model never computes the unembedding anyway).
    assert all(p.requires_grad for name, p in model.named_parameters()
               if name != "base_model.unembed.b_U")


# ---------------------------------------------------------------- normalisation, reward fn


def test_fit_normalization_gives_mean_zero_std_one():
    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0])
    gain, bias = fit_normalization(rewards)
    normalised = gain * rewards + bias
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert normalised.std(correction=0).item() == pytest.approx(1.0, abs=1e-6)


def test_normalised_model_has_mean_zero_std_one_on_the_fitting_texts():
    model = make_rm(seed=3)
    raw = score_texts(model, TEXTS)
    model.set_normalization(*fit_normalization(raw))
    normalised = score_texts(model, TEXTS)
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert normalised.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(normalised, model.gain * raw + model.bias)


def test_reward_fn_is_batched_and_plugs_into_get_rewards():
    model = make_rm(seed=4)
    reward_fn = make_reward_model_reward_fn(model, batch_size=3)
    rewards = get_rewards(reward_fn, TEXTS * 2)
    assert rewards.shape == (8,)
    torch.testing.assert_close(rewards, score_texts(model, TEXTS * 2, batch_size=8), atol=1e-5,
                               rtol=1e-5)
    assert not any(p.requires_grad for p in model.parameters()), "a reward model stays frozen"


# ---------------------------------------------------------------- training and saving

GOOD, BAD = ["lovely", "wonderful", "great", "superb"], ["awful", "terrible", "dull", "bad"]


def word_pairs(n: int, seed: int) -> list[Preference]:
    """Chosen texts end in a good word, rejected ones in a bad word."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, 4, (n, 2), generator=generator).tolist()
    return [Preference("It was ", GOOD[g], BAD[b]) for g, b in picks]


def test_training_learns_preferences_and_a_flipped_sign_unlearns_them(monkeypatch):
    args = RewardModelArgs(epochs=3, batch_size=8, base_lr=3e-3, head_lr=1e-2, eval_every=5)
    train, held_out = word_pairs(48, seed=0), word_pairs(16, seed=1)
    model = make_rm(seed=5)
    history = train_reward_model(model, train, held_out, args, console=Console(quiet=True))
    assert history[-1]["held_out/accuracy"] == 1.0
    assert history[-1]["held_out/loss"] < history[0]["train/loss"]
    # The same training with the sign flipped learns the opposite preference: accuracy 0.
    flipped = make_rm(seed=5)
    monkeypatch.setattr("minirlhf.pairs.reward_training.calc_pairwise_loss",
                        lambda chosen, rejected, margin=None: calc_pairwise_loss(rejected, chosen))
    train_reward_model(flipped, train, held_out, args, console=Console(quiet=True))
    assert evaluate(TextScorer(flipped, 0), held_out, args)["accuracy"] == 0.0


def test_trunk_cache_runs_frozen_layers_once_and_scores_like_the_whole_model(monkeypatch):
    model = make_rm(seed=7, n_layers=3)
    cache = TextScorer(model, frozen_layers=2)
    with torch.no_grad():
        torch.testing.assert_close(cache(TEXTS), score_texts(model, TEXTS), atol=1e-5, rtol=1e-5)
        assert len(cache.trunks.residuals) == len(set(TEXTS))  # one per distinct text
        calls = []
        monkeypatch.setattr("minirlhf.runtime.trunk.get_trunk",
                            lambda *args: calls.append(args))  # must not be needed again
        reordered = cache(TEXTS[::-1] + TEXTS[:1])
    torch.testing.assert_close(reordered, score_texts(model, TEXTS[::-1] + TEXTS[:1]), atol=1e-5,
                               rtol=1e-5)
    assert not calls


def test_training_only_the_top_layer_uses_the_cache_and_learns():
    args = RewardModelArgs(epochs=3, batch_size=8, base_lr=3e-3, head_lr=1e-2, eval_every=5,
                           trainable_layers=1)
    model = make_rm(seed=5)
    frozen = model.base_model.blocks[0].attn.W_Q.detach().clone()
    history = train_reward_model(model, word_pairs(48, seed=0), word_pairs(16, seed=1), args,
                                 console=Console(quiet=True))
    assert history[-1]["held_out/accuracy"] == 1.0
    torch.testing.assert_close(model.base_model.blocks[0].attn.W_Q, frozen, atol=0, rtol=0)


def test_save_and_load_keeps_trained_weights_and_normalisation(tmp_path):
    torch.manual_seed(6)
    model = RewardModel(load_tiny_model())  # what load_policy("tiny") rebuilds on loading
    prepare_reward_model(model, 1)
    with torch.no_grad():
        model.base_model.blocks[1].mlp.W_out.add_(0.1)
    model.set_normalization(2.0, -0.5)
    path = save_reward_model(model, tmp_path, {"base_model": "tiny"})
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert "base_model.blocks.1.mlp.W_out" in saved and "gain" in saved
    assert not any(k.startswith("base_model.blocks.0.") for k in saved), "frozen weights saved"
    loaded, info = load_reward_model(tmp_path)
    assert info["base_model"] == "tiny" and loaded.gain.item() == 2.0
    torch.testing.assert_close(score_texts(loaded, TEXTS), score_texts(model, TEXTS))
    with pytest.raises(FileNotFoundError, match="minirlhf reward-model"):
        load_reward_model(tmp_path / "missing")


def test_the_loss_given_drives_the_training():
    """`loss_fn` is what each step minimises (notebook 6 passes the learner's loss): a loss with
    chosen and rejected swapped learns the opposite preference."""
    args = RewardModelArgs(epochs=3, batch_size=8, base_lr=3e-3, head_lr=1e-2, eval_every=5)
    train, held_out = word_pairs(48, seed=0), word_pairs(16, seed=1)
    swapped = make_rm(seed=5)
    train_reward_model(swapped, train, held_out, args, console=Console(quiet=True),
                       loss_fn=lambda chosen, rejected, margin=None:
                       calc_pairwise_loss(rejected, chosen))
    assert evaluate(TextScorer(swapped, 0), held_out, args)["accuracy"] == 0.0


def test_a_lora_reward_model_learns_keeps_its_base_and_reloads_to_the_same_scores(
        tmp_path, monkeypatch):
    """LoRA on the top block (with the final norm and head): it learns the word preference, no
    base weight moves or is saved, and loading attaches the same adapters before loading them,
    so the reloaded model scores exactly as the trained one did."""
    args = RewardModelArgs(epochs=3, batch_size=8, base_lr=3e-3, head_lr=1e-2, eval_every=5,
                           trainable_layers=1, lora_rank=4)
    torch.manual_seed(5)
    model = RewardModel(load_tiny_model())  # what load_policy("tiny") rebuilds on loading
    base = {name: p.detach().clone() for name, p in model.base_model.named_parameters()
            if not name.startswith("ln_final.")}  # the final norm trains, as the head does
    held_out = word_pairs(16, seed=1)
    history = train_reward_model(model, word_pairs(48, seed=0), held_out, args,
                                 console=Console(quiet=True))
    assert history[-1]["held_out/accuracy"] == 1.0
    after = dict(model.base_model.named_parameters())
    for name, before in base.items():
        torch.testing.assert_close(after[name], before, atol=0, rtol=0, msg=name)
    assert all(p.requires_grad == name.startswith("lora.") or name.startswith("ln_final.")
               for name, p in model.base_model.named_parameters())
    assert model.base_model.lora.get(1, "q").B.abs().sum() > 0, "the adapters did not train"
    assert model.base_model.lora.get(0, "q") is None, "adapters only on the trainable block"
    path = save_reward_model(model, tmp_path, {"base_model": "tiny"})
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert not set(saved) & {f"base_model.{name}" for name in base}, "base weights saved"
    assert {k for k in saved if not k.startswith("base_model.lora.")} == {
        "base_model.ln_final.w", "base_model.ln_final.b", "reward_head.weight",
        "reward_head.bias", "gain", "bias"}
    texts = [p.chosen_text for p in held_out] + [p.rejected_text for p in held_out]
    expected = score_texts(model, texts)
    loaded, info = load_reward_model(tmp_path)
    assert info["lora"] == {"rank": 4, "alpha": 16.0, "targets": ["q", "k", "v", "o", "in",
                                                                  "out"], "layers": [1]}
    torch.testing.assert_close(score_texts(loaded, texts), expected, atol=0, rtol=0)
    check_loads_without_adapters_fail(tmp_path, saved, texts, expected, monkeypatch)


def check_loads_without_adapters_fail(folder, saved, texts, expected, monkeypatch):
    """Known wrong: the saved weights without their adapters score otherwise, and loading
    without attaching the adapters first is refused."""
    bare = RewardModel(load_tiny_model())
    bare.load_state_dict({k: v for k, v in saved.items() if ".lora." not in k}, strict=False)
    assert not torch.equal(score_texts(bare, texts), expected)
    monkeypatch.setattr(rm_module, "attach_saved_lora", lambda model, description: None)
    with pytest.raises(rm_module.RewardModelError, match="unexpected"):
        load_reward_model(folder)


def test_lora_args_are_checked_as_dpo_checks_them():
    with pytest.raises(ValueError, match="lora_targets"):
        RewardModelArgs(lora_rank=4, lora_targets="q,nope")
    with pytest.raises(ValueError, match="lora_alpha"):
        RewardModelArgs(lora_rank=4, lora_alpha=0.0)
    with pytest.raises(ValueError, match="trainable_layers 0"):
        RewardModelArgs(lora_rank=4, trainable_layers=0)
