"""minirlhf.inspection and `minirlhf inspect`: each analysis against a naive computation, and
each shown to fail on a known-wrong version; planted changes found; a policy trained to count the
periods shows '.' through the activation-difference lens."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from minirlhf import cli, inspection
from minirlhf.args import RLHFArgs
from minirlhf.rewards import reward_fn_char_count
from minirlhf.trainer import RLHFTrainer

PERIOD = 13  # '.' in the printable vocabulary


def planted_copy(model, name: str, delta):
    """A copy of `model` with `delta` added to the weight `name`."""
    changed = copy.deepcopy(model)
    with torch.no_grad():
        dict(changed.named_parameters())[name].add_(delta)
    return changed


def test_a_planted_rank_one_change_is_found_as_that_matrix_and_nothing_else(printable_model):
    cfg = printable_model.cfg
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(cfg.d_model, generator=gen), torch.randn(cfg.n_heads * cfg.d_head,
                                                                  generator=gen)
    # rank 1 as the matrix W_Q applies: [d_model, head * d_head], stored [head, d_model, d_head]
    delta = torch.outer(u, v).reshape(cfg.d_model, cfg.n_heads, cfg.d_head).transpose(0, 1) * 0.1
    changed = planted_copy(printable_model, "blocks.0.attn.W_Q", delta)
    moved = [c for c in inspection.get_weight_changes(printable_model, changed) if c.frac_changed]
    assert [c.name for c in moved] == ["blocks.0.attn.W_Q"]
    assert moved[0].rank == 1 and moved[0].effective_rank == pytest.approx(1.0, abs=1e-3)
    assert moved[0].layer == 0 and moved[0].frac_changed == 1.0
    # The wrong layout (heads stacked on d_model) sees the same change at full rank.
    naive = (changed.blocks[0].attn.W_Q - printable_model.blocks[0].attn.W_Q).reshape(
        -1, cfg.d_head)
    assert np.linalg.matrix_rank(naive.detach().numpy()) > 1


def test_rank_and_effective_rank_against_an_svd():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(20, 3, generator=gen) @ torch.randn(3, 12, generator=gen)
    rank, effective = inspection.calc_rank(delta, torch.finfo(torch.float32).eps)
    assert rank == np.linalg.matrix_rank(delta.numpy()) == 3
    sigma = np.linalg.svd(delta.numpy().astype(np.float64), compute_uv=False)
    p = sigma / sigma.sum()
    p = p[p > 0]
    assert effective == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-5)
    wide = inspection.calc_rank(delta.T.contiguous(), torch.finfo(torch.float32).eps)
    assert wide == (3, pytest.approx(effective, rel=1e-6))  # the other Gram matrix
    assert inspection.calc_rank(torch.zeros(4, 4), 1e-7) == (0, 0.0)


def test_changes_below_bfloat16_resolution_vanish_in_bf16():
    before = torch.ones(1000)
    after = before + 1e-3  # bf16's step at 1.0 is 2 ** -7
    assert inspection.calc_changed_share(before, after).item() == 1.0
    assert inspection.calc_bf16_share(before, after).item() == 0.0
    assert inspection.calc_bf16_share(before, before + 0.05).item() == 1.0
    assert inspection.calc_changed_share(before, before - 1e-3).item() == 1.0  # falls count too


def test_lora_singular_values_against_the_full_product():
    gen = torch.Generator().manual_seed(2)
    A, B = torch.randn(4, 30, generator=gen), torch.randn(20, 4, generator=gen)
    got = inspection.calc_lora_singular_values(A, B, scale=2.0)
    expected = torch.linalg.svdvals(2.0 * B @ A)[:4]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    wrong = torch.linalg.svdvals(A) * torch.linalg.svdvals(B) * 2.0  # not the product's
    assert not torch.allclose(wrong, expected, rtol=1e-2)


def test_per_token_kl_against_torch_distributions():
    gen = torch.Generator().manual_seed(3)
    logits, ref_logits = torch.randn(3, 5, 11, generator=gen), torch.randn(3, 5, 11, generator=gen)
    got = inspection.calc_per_token_kl(logits, ref_logits)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Categorical(logits=ref_logits))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(inspection.calc_per_token_kl(ref_logits, logits), expected,
                              atol=1e-3)  # the other direction is another number


def test_token_changes_of_a_model_with_itself_are_zero(printable_model):
    from minirlhf.sampling import get_samples

    samples = get_samples(printable_model, "A", batch_size=4, gen_len=5, prepend_bos=False,
                          seed=0)
    same = inspection.get_token_changes(printable_model, printable_model, samples)
    assert same.kl.abs().max() < 1e-6 and same.logprob_shift.abs().max() < 1e-5
    assert same.gen_tokens.shape == (4, 5)


def test_rank_token_shifts_against_a_loop():
    tokens = torch.tensor([[5, 7, 5, 2], [7, 7, 9, 5]])
    shifts = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, -1.0, 4.0, 2.0]])
    got = inspection.rank_token_shifts(tokens, shifts, min_count=2)
    seen: dict[int, list[float]] = {}
    for token, shift in zip(tokens.flatten().tolist(), shifts.flatten().tolist()):
        seen.setdefault(token, []).append(shift)
    expected = sorted(((sum(v) / len(v), k, len(v)) for k, v in seen.items() if len(v) >= 2),
                      reverse=True)
    assert got.token_ids.tolist() == [k for _, k, _ in expected] == [5, 7]
    assert got.mean_shift.tolist() == pytest.approx([m for m, _, _ in expected])
    assert got.counts.tolist() == [n for _, _, n in expected]


def test_logit_lens_against_an_explicit_unembedding(printable_model):
    model = printable_model
    residual = torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(4)) * 5
    got = inspection.apply_logit_lens(model, residual)
    normalized = F.layer_norm(residual, (model.cfg.d_model,), model.ln_final.w.detach(),
                              model.ln_final.b.detach(), eps=model.cfg.eps)
    expected = normalized @ model.W_U.detach()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(residual @ model.W_U.detach(), expected, atol=1e-2)  # no norm


@pytest.mark.parametrize("wrong", [None, "scale_by_layer_order"])
def test_a_steering_grid_steers_each_copy_as_steering_does_alone(make_printable_model, wrong):
    """The oracle: each (layer, scale) setting run alone under `steering`, copy by copy."""
    model = make_printable_model(n_layers=3)
    tokens = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    directions = torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    grid = [(0, 1.0), (0, 3.0), (2, -2.0), (1, 0.5)]
    if wrong:  # a grid whose copies are paired with the settings in another order
        grid_used = sorted(grid)
    else:
        grid_used = grid
    with torch.no_grad():
        with inspection.steering_grid(model, directions, grid_used):
            got = model(tokens.repeat(len(grid), 1))
        expected = []
        for layer, scale in grid:
            with inspection.steering(model, layer, directions[layer], scale):
                expected.append(model(tokens))
    matches = torch.allclose(got, torch.cat(expected), atol=1e-5)
    assert matches == (wrong is None)


def test_steering_adds_the_direction_after_the_block_and_comes_off(make_printable_model):
    model = make_printable_model(n_layers=2)
    tokens = torch.tensor([[3, 4, 5, 6]])
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    plain = model(tokens)
    with inspection.steering(model, 0, direction, 2.0):
        steered = model(tokens)
    with torch.no_grad():  # the oracle: run block 0, add, run the rest from there
        residual = model(tokens, stop_at_layer=1) + 2.0 * direction
        expected = model(residual, start_at_layer=1)
        off_by_one = model(model(tokens, stop_at_layer=0) + 2.0 * direction, start_at_layer=0)
    torch.testing.assert_close(steered, expected)
    assert not torch.allclose(off_by_one, expected, atol=1e-3)
    torch.testing.assert_close(model(tokens), plain)  # the hook is gone


def tl_attribution(model, tokens, direction, mask) -> tuple[list[str], torch.Tensor]:
    """The oracle: TransformerLens's whole residual decomposition, normed, projected, averaged."""
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    parts, labels = cache.get_full_resid_decomposition(apply_ln=True, expand_neurons=False,
                                                       return_labels=True)
    weights = mask / mask.sum()
    return labels, ((parts @ direction) * weights).sum(dim=(1, 2))


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm_gqa_rotary", "wrong_uncentred"])
def test_logit_attribution_equals_transformer_lens_decomposition(printable_model, kind):
    from test_fast_path import tiny_llama
    model = tiny_llama(seed=3) if kind.startswith("rms") else printable_model
    tokens = torch.randint(0, 94, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(8))
    labels, expected = tl_attribution(model, tokens, direction, mask)
    if kind == "wrong_uncentred":  # a LayerNorm model read as if its norm did not centre
        model.cfg.normalization_type = "RMS"
    try:
        got = inspection.get_logit_attribution(model, tokens, direction, mask)
    finally:
        model.cfg.normalization_type = "LN" if kind != "rmsnorm_gqa_rotary" else "RMS"
    assert got.labels == labels
    assert torch.allclose(got.attribution, expected, atol=1e-4) == (kind != "wrong_uncentred")


def test_logit_attribution_sums_to_the_logit_difference(printable_model):
    model = printable_model
    tokens = torch.randint(0, 94, (2, 6), generator=torch.Generator().manual_seed(6))
    direction = inspection.get_reward_direction(model, [PERIOD], [0, 1, 2])
    got = inspection.get_logit_attribution(model, tokens, direction)
    assert "L0H0" in got.labels and "0_mlp_out" in got.labels
    logits = model(tokens).detach()
    expected = (logits[..., PERIOD] - logits[..., [0, 1, 2]].mean(-1)).mean()
    assert got.attribution.sum().item() == pytest.approx(expected.item(), abs=1e-4)
    _, cache = model.run_with_cache(tokens)  # without the final norm's scale: not the logits
    parts = cache.get_full_resid_decomposition(apply_ln=False, expand_neurons=False)
    assert (parts @ direction).mean(dim=(1, 2)).sum().item() != pytest.approx(expected.item(),
                                                                              abs=1e-2)


def test_the_lens_of_a_period_counting_policy_promotes_the_period(make_printable_model):
    """8 phases of "count the periods" (about 6 s). Measured: '.' is the top promoted token at
    both blocks, its reward 0.09 -> 2.41 periods per sample."""
    model = make_printable_model(n_layers=2, seed=1)
    reference = copy.deepcopy(model)
    args = RLHFArgs(total_phases=8, batch_size=32, num_minibatches=4, gen_len=16,
                    warmup_steps=0, base_lr=3e-3, head_lr=3e-3, kl_coef=0.05, prefix="A",
                    prepend_bos=False, advantage_estimator="gae", gae_lambda=1.0, seed=1)
    RLHFTrainer(args, reward_fn_char_count, base_model=model, console=Console(quiet=True),
                table_every=0).train()
    neutral = torch.randint(0, 94, (8, 24), generator=torch.Generator().manual_seed(0))
    difference = inspection.get_mean_activation_difference(model, reference, neutral)
    for block in range(2):
        promoted, suppressed = inspection.top_tokens(
            reference, inspection.apply_logit_lens(reference, difference[block]), 5)
        assert "." in promoted[:3] and "." not in suppressed, (block, promoted)
    backwards = inspection.apply_logit_lens(reference, -difference[-1])  # models swapped
    assert "." in inspection.top_tokens(reference, backwards, 5)[1]
    assert inspection.get_moved_shares(inspection.get_weight_changes(reference, model))[0] > 0.5


FAST = ["--preset", "tiny-smoke", "--table-every", "0", "--batch-size", "4", "--gen-len", "6",
        "--total-phases", "2"]


def test_inspect_writes_the_report_of_a_lora_run(tmp_path, capsys):
    run = tmp_path / "run"
    cli.main(["train", *FAST, "--lora-rank", "2", "--out", str(run)])
    cli.main(["inspect", "--run", str(run), "--prompts", "4", "--layers", "0,1", "--scales",
              "1,2", "--device", "cpu"])
    out = run / "inspect"
    for name in ("weights.png", "token_kl.png", "steering.png", "attribution.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    report = (out / "report.md").read_text()
    assert "## 1. Which weights moved" in report and "## 4. Where the reward comes from" in report
    found = json.loads((out / "inspect.json").read_text())
    assert found["lora"] and all(len(s) == 2 for s in found["lora"].values())
    moved = [w["name"] for w in found["weights"] if w["frac_changed"] > 0]
    assert moved and all(".attn.W_" in n or ".mlp.W_" in n for n in moved)  # adapted only
    assert all(w["rank"] <= 2 for w in found["weights"])
    assert len(found["steering"]) == 2 and found["value_shifts"] is not None
    assert "minirlhf inspect" in capsys.readouterr().out
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SystemExit):  # a planted link is refused, not written through
        cli.main(["inspect", "--run", str(run), "--prompts", "2", "--layers", "0", "--scales",
                  "1", "--device", "cpu"])
    assert not (tmp_path / "elsewhere").exists()


def test_a_per_head_bias_is_a_vector_not_a_matrix(printable_model):
    """b_Q is stored [head, d_head]: a change to it is reported as a vector (rank 1), however
    many of its heads moved; read as a matrix it would show rank up to n_heads."""
    cfg = printable_model.cfg
    delta = torch.randn(cfg.n_heads, cfg.d_head, generator=torch.Generator().manual_seed(4))
    changed = planted_copy(printable_model, "blocks.0.attn.b_Q", delta)
    moved = [c for c in inspection.get_weight_changes(printable_model, changed) if c.frac_changed]
    assert [(c.name, c.rank) for c in moved] == [("blocks.0.attn.b_Q", 1)]
    assert np.linalg.matrix_rank(delta.numpy()) == min(cfg.n_heads, cfg.d_head) > 1


def test_the_default_steering_blocks_sit_where_the_output_moved():
    """Below a LoRA run's first adapted block the difference is exactly zero: the default grid
    spreads over blocks 3-6 here, not over the whole model (that would give [0, 3, 6])."""
    from minirlhf.cli.inspect import steering_layers
    assert steering_layers([0.0, 0.0, 0.0, 0.5, 0.7, 0.9, 1.0]) == [3, 5, 6]
    assert steering_layers([0.0] * 7) == [0, 3, 6]  # nothing moved: spread over every block
    assert steering_layers([0.0, 0.0, 2.0]) == [2]
