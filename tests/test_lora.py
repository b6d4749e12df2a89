"""LoRA and the frozen trunk, against independent oracles.

The oracle for a LoRA model is the same HookedTransformer with each adapted weight *replaced* by
W + (alpha / rank) * B @ A, written here in TransformerLens's own layouts with einsum-free
reshapes (`oracle_weights`), and run through TransformerLens's forward with
`torch.func.functional_call`: no hooks, no fast path, no `minirlhf.runtime.lora` code. Gradients
with respect to A and B come from autograd through that replacement. Each check is also run against
a deliberately wrong variant, which it must catch.
"""

import pytest
import torch
from rich.console import Console
from torch.func import functional_call
from transformer_lens import HookedTransformer

from minirlhf.args import RLHFArgs
from minirlhf.models import ReferenceModel, prepare_policy, run_model
from minirlhf.rewards import reward_fn_char_count
from minirlhf.runtime import lora
from minirlhf.runtime.trunk import Trunk, get_trunk
from minirlhf.trainer import RLHFTrainer
from tests.test_fast_path import tiny_gpt2, tiny_llama

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
ALL = list(lora.LORA_TARGETS)


def batch(model: HookedTransformer, seed: int = 0):
    """Left-padded tokens and their mask (row 0 has two padding positions)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, model.cfg.d_vocab, (3, 7), generator=gen)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    return tokens, mask


def randomise(adapters: lora.LoraAdapters, seed: int = 1):
    """Non-zero A and B, so adapters change the model (fresh ones have B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapters.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def oracle_weights(model: HookedTransformer, scale_fix: float = 1.0) -> dict[str, torch.Tensor]:
    """TransformerLens parameter name -> W + scale * B @ A, in TransformerLens's layouts:
    W_Q / _W_K / _W_V [head, d_model, d_head], W_O [head, d_head, d_model], W_in / W_gate
    [d_model, d_mlp], W_out [d_mlp, d_model]. Differentiable in A and B."""
    names = {"q": "attn.W_Q", "k": "attn._W_K", "v": "attn._W_V", "o": "attn.W_O",
             "in": "mlp.W_in", "gate": "mlp.W_gate", "out": "mlp.W_out"}
    params = dict(model.named_parameters())
    replaced = {}
    for key, adapter in model.lora.adapters.items():
        layer, target = key.split("_", 1)
        name = f"blocks.{layer}.{names[target]}"
        if name not in params:  # no grouped-query attention: W_K / W_V
            name = name.replace("._W_", ".W_")
        weight = params[name]
        # x @ W (TransformerLens) == F.linear(x, W_lin): W_lin[out, in]; delta is [out, in].
        delta = (adapter.B @ adapter.A) * adapter.scale * scale_fix
        if target in ("q", "k", "v"):  # out = (head, d_head), in = d_model
            heads, d_model, d_head = weight.shape
            delta = delta.reshape(heads, d_head, d_model).transpose(1, 2)
        elif target == "o":  # out = d_model, in = (head, d_head)
            delta = delta.T.reshape(weight.shape)
        else:
            delta = delta.T
        replaced[name] = weight + delta
    return replaced


def oracle_logits(model, tokens, mask, scale_fix: float = 1.0):
    """TransformerLens's forward with the replaced weights and no hook at all."""
    with lora.adapters_off(model):
        return functional_call(model, oracle_weights(model, scale_fix), (tokens,),
                               {"attention_mask": mask})


def lora_model(name: str, rank: int = 3, targets=ALL, randomised=True) -> HookedTransformer:
    model = MODELS[name]()
    adapters = lora.add_lora(model, rank, alpha=6.0, targets=targets)
    if randomised:
        randomise(adapters)
    return model


def real(logits, mask):
    """Logits at real (not padding) positions: padding positions are never read."""
    return logits[mask.bool()]


# ---------------------------------------------------------------- the adapted model


@pytest.mark.parametrize("name", MODELS)
def test_fresh_adapters_change_nothing(name):
    """B = 0 at the start: the LoRA model's logits are the base model's, on both paths."""
    model = MODELS[name]()
    tokens, mask = batch(model)
    base = model(tokens, attention_mask=mask)
    lora.add_lora(model, 4, 8.0, ALL)
    assert torch.equal(model(tokens, attention_mask=mask), base)
    fast, _ = run_model(model, tokens, mask, fast_path=True)
    torch.testing.assert_close(real(fast, mask), real(base, mask), atol=1e-5, rtol=0)


def test_fresh_adapters_check_catches_random_b(monkeypatch):
    """A wrong initialisation (B random, as A is) changes the model at the start."""
    model = tiny_gpt2()
    tokens, mask = batch(model)
    base = model(tokens, attention_mask=mask)
    original = lora.Lora.__init__

    def wrong_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        torch.nn.init.normal_(self.B.data)

    monkeypatch.setattr(lora.Lora, "__init__", wrong_init)
    lora.add_lora(model, 4, 8.0, ALL)
    assert not torch.allclose(model(tokens, attention_mask=mask), base, atol=1e-3)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("targets", [ALL, ["q", "v"], ["k", "o", "out"]])
def test_both_paths_equal_the_replaced_weights(name, targets):
    """Hooks (TransformerLens path), low-rank terms (fast path, with gradients) and merged
    matrices (fast path, no gradients) all give the oracle's logits."""
    model = lora_model(name, targets=targets)
    tokens, mask = batch(model)
    expected = real(oracle_logits(model, tokens, mask), mask)
    hooked, _ = run_model(model, tokens, mask, fast_path=False)
    low_rank, _ = run_model(model, tokens, mask, fast_path=True)
    with torch.no_grad():
        merged, _ = run_model(model, tokens, mask, fast_path=True)
    for logits in (hooked, low_rank, merged):
        torch.testing.assert_close(real(logits, mask), expected, atol=2e-5, rtol=0)


def test_oracle_catches_a_forgotten_scale():
    """The same comparison fails when alpha / rank is left out (the usual slip)."""
    model = lora_model("gpt2")
    tokens, mask = batch(model)
    wrong = real(oracle_logits(model, tokens, mask, scale_fix=1 / model.lora.get(0, "q").scale),
                 mask)
    hooked, _ = run_model(model, tokens, mask, fast_path=False)
    assert (real(hooked, mask) - wrong).abs().max() > 1e-2


@pytest.mark.parametrize("name", MODELS)
def test_gradients_match_the_oracle(name):
    """d(loss)/dA and d(loss)/dB on both paths equal autograd through W + scale * B @ A."""
    model = lora_model(name)
    tokens, mask = batch(model)
    params = list(model.lora.parameters())

    def grads(logits):
        loss = real(logits, mask).log_softmax(-1)[:, :7].sum()
        return torch.autograd.grad(loss, params)

    expected = grads(oracle_logits(model, tokens, mask))
    for fast_path in (False, True):
        got = grads(run_model(model, tokens, mask, fast_path)[0])
        for g, e in zip(got, expected):
            # float32 rounding scales with the largest entry (about 50 here): on an AVX512 CPU
            # an entry of 0.17 summed from larger terms differed by 3e-5 on both paths.
            torch.testing.assert_close(g, e, atol=1e-6 * e.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_merge_gives_the_same_model_without_hooks(name):
    model = lora_model(name)
    tokens, mask = batch(model)
    before = model(tokens, attention_mask=mask)
    lora.merge_lora(model)
    assert lora.get_adapters(model) is None
    assert not any(point.fwd_hooks for point in model.hook_dict.values())
    torch.testing.assert_close(model(tokens, attention_mask=mask), before, atol=2e-5, rtol=0)


def test_run_with_cache_shows_the_adapted_activations():
    """TransformerLens's cache holds what the LoRA model computes (the hooks run first)."""
    model = lora_model("gpt2", targets=["q"])
    tokens, mask = batch(model)
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    with lora.adapters_off(model):
        _, base_cache = model.run_with_cache(tokens, attention_mask=mask)
    x = model.blocks[0].ln1(cache["blocks.0.hook_resid_pre"])
    expected = base_cache["blocks.0.attn.hook_q"] + (
        x @ model.lora.get(0, "q").delta().T).reshape(base_cache["blocks.0.attn.hook_q"].shape)
    torch.testing.assert_close(cache["blocks.0.attn.hook_q"], expected, atol=1e-5, rtol=0)


def test_a_users_hook_still_sends_the_model_to_transformerlens():
    """LoRA's hooks keep the fast path; a user's hook does not (it would not run there)."""
    from minirlhf.runtime import fast_path as fast
    model = lora_model("gpt2")
    assert fast.unsupported_reason(model) is None
    model.add_hook("blocks.0.hook_resid_post", lambda x, hook: x)
    assert "hooks" in fast.unsupported_reason(model)


# ---------------------------------------------------------------- the reference model


@pytest.mark.parametrize("name", MODELS)
def test_reference_is_the_base_model_without_a_copy(name):
    model = MODELS[name]()
    tokens, mask = batch(model)
    base = model(tokens, attention_mask=mask)
    randomise(lora.add_lora(model, 3, 6.0, ALL))
    reference = ReferenceModel(model, fast_path=True)
    assert all(p.data_ptr() == q.data_ptr()
               for p, q in zip(reference.model.parameters(), model.parameters()))
    logits, _ = reference.forward_generated(tokens, mask, prefix_len=1)
    torch.testing.assert_close(real(logits, mask[:, :-1]), real(base[:, :-1], mask[:, :-1]),
                               atol=1e-5, rtol=0)
    assert lora.get_adapters(model).enabled  # the policy's adapters are back on


def test_reference_check_catches_adapters_left_on(monkeypatch):
    model = tiny_gpt2()
    tokens, mask = batch(model)
    base = model(tokens, attention_mask=mask)
    randomise(lora.add_lora(model, 3, 6.0, ALL))
    monkeypatch.setattr(lora, "adapters_off", lambda model: torch.no_grad())
    logits, _ = ReferenceModel(model).forward_generated(tokens, mask, prefix_len=1)
    assert not torch.allclose(real(logits, mask[:, :-1]), real(base[:, :-1], mask[:, :-1]),
                              atol=1e-3)


def test_frozen_trunk_reference_copies_only_the_top():
    model = tiny_llama()
    prepare_policy(model, trainable_layers=1)
    reference = ReferenceModel(model)
    shared = {p.data_ptr() for p in model.parameters()}
    copied = [n for n, p in reference.model.named_parameters() if p.data_ptr() not in shared]
    assert copied and all(n.startswith(("blocks.1.", "ln_final")) for n in copied)


# ---------------------------------------------------------------- the frozen trunk


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fast_path", [True, False])
def test_trunk_then_top_equals_the_whole_model(name, fast_path):
    """The residual entering block 1, then blocks 1.. from it: the whole forward's logits
    (oracle: TransformerLens's own forward on the tokens)."""
    model = lora_model(name)
    tokens, mask = batch(model)
    trunk = get_trunk(model, tokens, mask, 1, fast_path)
    assert isinstance(trunk, Trunk) and trunk.residual.shape == (*tokens.shape, model.cfg.d_model)
    logits, _ = run_model(model, tokens, mask, fast_path, trunk=trunk)
    expected = model(tokens, attention_mask=mask)
    torch.testing.assert_close(real(logits, mask), real(expected, mask), atol=2e-5, rtol=0)


# ---------------------------------------------------------------- what trains


def make_trainer(model, **overrides) -> RLHFTrainer:
    args = RLHFArgs(batch_size=6, num_minibatches=2, batches_per_learning_phase=1, gen_len=4,
                    total_phases=2, warmup_steps=0, base_lr=1e-2, head_lr=1e-2, prefix="A",
                    prepend_bos=False, advantage_estimator="gae", kl_coef=0.1, **overrides)
    return RLHFTrainer(args, reward_fn_char_count, model, console=Console(quiet=True))


@pytest.mark.parametrize("overrides, trains", [
    (dict(lora_rank=2), ("lora.", "value_head")),
    (dict(trainable_layers=1), ("blocks.1.", "ln_final", "value_head")),
    (dict(trainable_layers=1, lora_rank=2), ("lora.adapters.1_", "value_head")),
])
def test_one_step_changes_only_what_trains(overrides, trains, make_printable_model):
    trainer = make_trainer(make_printable_model(n_layers=2), **overrides)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_one_phase()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all(n.removeprefix("base_model.").startswith(trains) for n in changed), changed
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in held for n, p in trainer.model.named_parameters()
               if n.removeprefix("base_model.").startswith(trains))
    assert len(held) == sum(p.requires_grad for p in trainer.model.parameters())


def test_what_trains_check_catches_a_trainable_base(make_printable_model, monkeypatch):
    """If add_lora forgot to freeze the base weights, the check above would see them move."""
    monkeypatch.setattr(torch.nn.Parameter, "requires_grad_", lambda self, flag=True: self)
    trainer = make_trainer(make_printable_model(), lora_rank=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_one_phase()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("base_model.blocks") and "lora" not in n for n in changed)


@pytest.mark.parametrize("overrides", [dict(trainable_layers=1),
                                       dict(trainable_layers=1, lora_rank=2)])
def test_cached_trunk_gives_the_full_forwards_loss_and_gradients(overrides,
                                                                 make_printable_model):
    trainer = make_trainer(make_printable_model(n_layers=3), **overrides)
    assert trainer.model.frozen_layers == 2
    rollout = trainer.rollout_phase()
    mb = rollout.memory.get_minibatches(1, 1)[0]
    assert "trunk" in mb.kept
    without_trunk = {name: rows for name, rows in mb.kept.items() if name != "trunk"}
    results = []
    for kept in (mb.kept, without_trunk):
        trainer.optimizer.zero_grad()
        objective, _ = trainer.compute_rlhf_objective(type(mb)(**{**vars(mb), "kept": kept}))
        objective.backward()
        results.append((objective.detach(), [p.grad.clone() for p in trainer.model.parameters()
                                             if p.requires_grad]))
    (cached, cached_grads), (full, full_grads) = results
    torch.testing.assert_close(cached, full, atol=1e-6, rtol=1e-5)
    for g, e in zip(cached_grads, full_grads):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-4)


def test_bad_lora_settings_are_refused():
    with pytest.raises(ValueError, match="lora_targets"):
        RLHFArgs(lora_rank=4, lora_targets="q,mlp")
    with pytest.raises(ValueError, match="lora_rank"):
        RLHFArgs(lora_rank=-1)
    with pytest.raises(ValueError, match="at most 2"):
        prepare_policy(tiny_gpt2(), trainable_layers=5)


@pytest.mark.parametrize("overrides", [dict(lora_rank=2), dict(trainable_layers=1, lora_rank=2),
                                       dict(trainable_layers=1)])
def test_a_resumed_run_continues_the_same_curve(overrides, make_printable_model):
    """Two phases straight, or one phase, a checkpoint, a new trainer and one more phase."""
    straight = make_trainer(make_printable_model(n_layers=2), **overrides)
    straight.train_one_phase()
    straight.train_one_phase()
    first = make_trainer(make_printable_model(n_layers=2), **overrides)
    first.train_one_phase()
    resumed = make_trainer(make_printable_model(n_layers=2), **overrides)
    resumed.load_state_dict(first.state_dict())
    resumed.train_one_phase()
    for key in ("charts/reward_mean", "losses/objective", "charts/kl"):
        assert resumed.history[1][key] == pytest.approx(straight.history[1][key], abs=1e-6)


def test_checkpoints_hold_what_trains_not_the_base_model(make_printable_model):
    trainer = make_trainer(make_printable_model(n_layers=2), lora_rank=2)
    saved = trainer.state_dict()["model"]
    params = dict(trainer.model.named_parameters())
    assert {k for k in saved if k in params} == {n for n, p in params.items() if p.requires_grad}
    other = make_trainer(make_printable_model(n_layers=2), trainable_layers=1)  # not LoRA
    with pytest.raises(ValueError, match="run.json"):
        other.load_state_dict(trainer.state_dict())
