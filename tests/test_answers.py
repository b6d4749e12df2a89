"""Answers that end (issue 23): the masked math against oracles written here, row by row.

Every oracle is a plain Python loop over one answer at a time, reading its own length from a list
(never `response_mask` through the library's helpers), in float64. Each is also shown to tell a
known-wrong version apart: padding counted, the EOS dropped from the mask, the reward put at
gen_len - 1 instead of the answer's last real token, a per-sequence mean called token-level.
"""

import math

import pytest
import torch

from minirlhf.advantages import (
    compute_advantages,
    compute_gae,
    compute_one_step_advantages,
    compute_reinforce_pp_advantages,
    whiten,
)
from minirlhf.answers import (
    apply_answer_options,
    calc_overlong_penalty,
    get_loss_mask,
    get_zero_spread_rows,
)
from minirlhf.losses import (
    AGGREGATIONS,
    aggregate,
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl,
    calc_value_function_loss,
    get_gen_logprobs,
)
from minirlhf.sampling import find_answer_ends

GEN_LEN = 6
LENGTHS = [6, 2, 4, 1]  # a truncated answer, short ones, one that is all EOS
BATCH = len(LENGTHS)


def mask_of(lengths: list[int], gen_len: int = GEN_LEN) -> torch.Tensor:
    return torch.tensor([[int(t < n) for t in range(gen_len)] for n in lengths])


MASK = mask_of(LENGTHS)


def seeded(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def close(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> bool:
    return torch.allclose(got.double(), expected.double(), atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- oracles (one row at a time)


def oracle_one_step(values, rewards, lengths, end_at=None):
    """A_t = V_{t+1} - V_t, and r - V_t at the answer's last token (or at `end_at`, the wrong
    place); 0 after it. values: one V(s_t) per generated token."""
    rows = []
    for v, r, n in zip(values.tolist(), rewards.tolist(), lengths):
        last = n - 1 if end_at is None else end_at
        rows.append([(r - v[t] if t == last else v[t + 1] - v[t]) if t <= last else 0.0
                     for t in range(len(v))])
    return torch.tensor(rows, dtype=torch.float64)


def oracle_gae(values, rewards, lengths, gamma, lam, end_at=None):
    rows = []
    for v, r, n in zip(values.tolist(), rewards.tolist(), lengths):
        last = n - 1 if end_at is None else end_at
        row, running = [0.0] * len(v), 0.0
        for t in range(last, -1, -1):
            following = 0.0 if t == last else gamma * v[t + 1]
            delta = (r if t == last else 0.0) + following - v[t]
            running = delta + gamma * lam * running
            row[t] = running
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def oracle_reinforce_pp(rewards, kl, kl_coef, gamma, lengths, eps=1e-8):
    returns = []
    for r, k, n in zip(rewards.tolist(), kl.tolist(), lengths):
        row, running = [], 0.0
        for t in range(n - 1, -1, -1):
            running = -kl_coef * k[t] + (r if t == n - 1 else 0.0) + gamma * running
            row.insert(0, running)
        returns.append(row)
    real = [x for row in returns for x in row]
    mean = sum(real) / len(real)
    std = math.sqrt(sum((x - mean) ** 2 for x in real) / len(real))
    return torch.tensor([[(row[t] - mean) / (std + eps) if t < len(row) else 0.0
                          for t in range(GEN_LEN)] for row in returns], dtype=torch.float64)


def oracle_aggregate(per_token, lengths, how, gen_len=GEN_LEN):
    """The three aggregations with the sums written out."""
    rows = [sum(row[:n]) for row, n in zip(per_token.tolist(), lengths)]
    if how == "token_mean":
        return sum(rows) / sum(lengths)
    if how == "sequence_mean":
        return sum(s / n for s, n in zip(rows, lengths)) / len(lengths)
    return sum(rows) / (len(lengths) * gen_len)


# ---------------------------------------------------------------- advantages


def test_one_step_advantages_over_ragged_answers():
    values, rewards = seeded(BATCH, GEN_LEN + 1, seed=0), seeded(BATCH, seed=1)
    got = compute_one_step_advantages(values, rewards, prefix_len=1, response_mask=MASK)
    expected = oracle_one_step(values[:, :-1], rewards, LENGTHS)
    assert close(got, expected)
    assert (got[MASK == 0] == 0).all()
    wrong_place = oracle_one_step(values[:, :-1], rewards, LENGTHS, end_at=GEN_LEN - 1)
    assert not close(wrong_place, expected)  # the reward at gen_len - 1 is told apart
    eos_dropped = oracle_one_step(values[:, :-1], rewards, [max(n - 1, 1) for n in LENGTHS])
    assert not close(eos_dropped, expected)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (1.0, 0.0)])
def test_gae_over_ragged_answers(gamma, lam):
    values, rewards = seeded(BATCH, GEN_LEN + 1, seed=2), seeded(BATCH, seed=3)
    got = compute_gae(values, rewards, 1, gamma, lam, response_mask=MASK)
    expected = oracle_gae(values[:, :-1], rewards, LENGTHS, gamma, lam)
    assert close(got, expected)
    assert (got[MASK == 0] == 0).all()
    assert not close(oracle_gae(values[:, :-1], rewards, LENGTHS, gamma, lam,
                                end_at=GEN_LEN - 1), expected)
    unmasked = compute_gae(values, rewards, 1, gamma, lam)  # padding counted as real steps
    assert not close(unmasked, expected)


def test_the_dispatcher_gives_the_same_ragged_advantages():
    values, rewards = seeded(BATCH, GEN_LEN, seed=4), seeded(BATCH, seed=5)
    kl = torch.zeros(BATCH, GEN_LEN)
    got = compute_advantages("gae", rewards, values, kl, 0.0, gamma=1.0, gae_lambda=0.9,
                             response_mask=MASK)
    assert close(got, oracle_gae(values, rewards, LENGTHS, 1.0, 0.9))
    got = compute_advantages("one_step", rewards, values, kl, 0.0, response_mask=MASK)
    assert close(got, oracle_one_step(values, rewards, LENGTHS))


def test_reinforce_pp_with_a_mask():
    rewards, kl = seeded(BATCH, seed=6), seeded(BATCH, GEN_LEN, seed=7).abs()
    kl[MASK == 0] = 50.0  # padding's KL must not reach any return or the whitening
    got = compute_reinforce_pp_advantages(rewards, kl, 0.3, 0.95, response_mask=MASK)
    assert close(got, oracle_reinforce_pp(rewards, kl, 0.3, 0.95, LENGTHS))
    unmasked = compute_reinforce_pp_advantages(rewards, kl, 0.3, 0.95) * MASK
    assert not close(unmasked, oracle_reinforce_pp(rewards, kl, 0.3, 0.95, LENGTHS))


def test_reinforce_pp_baseline_with_a_mask_through_the_dispatcher():
    """Pairs of answers (lengths 6, 2 and 4, 1): each reward less its pair's mean, then
    REINFORCE++'s masked returns and whitening."""
    rewards, kl = seeded(BATCH, seed=9), seeded(BATCH, GEN_LEN, seed=10).abs()
    kl[MASK == 0] = 50.0
    got = compute_advantages("reinforce_pp_baseline", rewards, None, kl, 0.3, group_size=2,
                             gamma=0.95, response_mask=MASK)
    r = rewards.tolist()
    centred = torch.tensor([r[0] - (r[0] + r[1]) / 2, r[1] - (r[0] + r[1]) / 2,
                            r[2] - (r[2] + r[3]) / 2, r[3] - (r[2] + r[3]) / 2])
    assert close(got, oracle_reinforce_pp(centred, kl, 0.3, 0.95, LENGTHS))
    assert not close(got, oracle_reinforce_pp(rewards, kl, 0.3, 0.95, LENGTHS))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_with_a_mask(estimator):
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0])
    got = compute_advantages(estimator, rewards, None, torch.zeros(BATCH, GEN_LEN), 0.0,
                             group_size=2, response_mask=MASK)
    per_answer = []
    for g in range(2):
        group = rewards[2 * g: 2 * g + 2].tolist()
        mean = sum(group) / 2
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 1)  # sample std, G - 1 = 1
        for r in group:
            per_answer.append({"grpo": (r - mean) / (std + 1e-6), "dr_grpo": r - mean,
                               "rloo": r - (sum(group) - r)}[estimator])
    expected = torch.tensor([[a if t < n else 0.0 for t in range(GEN_LEN)]
                             for a, n in zip(per_answer, LENGTHS)])
    assert close(got, expected)


def test_whiten_reads_only_the_real_tokens():
    advantages = seeded(BATCH, GEN_LEN, seed=8)
    advantages[MASK == 0] = 1e3  # padding far away: it would dominate the mean and std
    real = [x for row, n in zip(advantages.tolist(), LENGTHS) for x in row[:n]]
    mean = sum(real) / len(real)
    std = math.sqrt(sum((x - mean) ** 2 for x in real) / len(real))
    got = whiten(advantages, response_mask=MASK)
    expected = (advantages.double() - mean) / (std + 1e-8)
    assert close(got[MASK == 1], expected[MASK == 1])
    assert not close(whiten(advantages)[MASK == 1], expected[MASK == 1])  # padding counted


# ---------------------------------------------------------------- the aggregations and terms


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_aggregate_against_the_sums(how):
    per_token = seeded(BATCH, GEN_LEN, seed=9)
    got = aggregate(per_token, MASK, how)
    assert got.item() == pytest.approx(oracle_aggregate(per_token, LENGTHS, how), abs=1e-6)


def test_the_wrong_aggregations_disagree_with_the_oracle():
    per_token = seeded(BATCH, GEN_LEN, seed=10)
    token_mean = oracle_aggregate(per_token, LENGTHS, "token_mean")
    assert per_token.mean().item() != pytest.approx(token_mean, abs=1e-3)  # padding counted
    sequence = oracle_aggregate(per_token, LENGTHS, "sequence_mean")  # called token-level
    assert sequence != pytest.approx(token_mean, abs=1e-3)
    constant = oracle_aggregate(per_token, LENGTHS, "constant")
    assert constant != pytest.approx(token_mean, abs=1e-3)


def ragged_minibatch(seed: int, d_vocab: int = 7) -> dict[str, torch.Tensor]:
    """Logits, reference logits, tokens, old log-probs, advantages, values and returns of the
    hand-made ragged batch; the padding holds large values, to be seen if it leaks."""
    logits = seeded(BATCH, GEN_LEN, d_vocab, seed=seed, scale=2.0)
    logits[MASK == 0] = 25.0 * seeded(int((MASK == 0).sum()), d_vocab, seed=seed + 1)
    tokens = torch.randint(d_vocab, (BATCH, GEN_LEN), generator=torch.Generator().manual_seed(3))
    return {"logits": logits, "ref_logits": seeded(BATCH, GEN_LEN, d_vocab, seed=seed + 2),
            "tokens": tokens, "old": get_gen_logprobs(logits, tokens).detach()
            + 0.4 * seeded(BATCH, GEN_LEN, seed=seed + 3),
            "advantages": seeded(BATCH, GEN_LEN, seed=seed + 4),
            "values": seeded(BATCH, GEN_LEN, seed=seed + 5),
            "returns": seeded(BATCH, GEN_LEN, seed=seed + 6)}


def per_token_terms(mb: dict[str, torch.Tensor], logits: torch.Tensor, clip: float,
                    clip_high: float) -> dict[str, list[list[torch.Tensor]]]:
    """Each term's per-token quantity, one token at a time (torch scalars, so autograd gives the
    oracle's gradient too)."""
    terms = {"surrogate": [], "entropy": [], "exact": [], "k3": [], "value": []}
    for b in range(BATCH):
        for name in terms:
            terms[name].append([])
        for t in range(GEN_LEN):
            logp = torch.log_softmax(logits[b, t].double(), dim=0)
            ref = torch.log_softmax(mb["ref_logits"][b, t].double(), dim=0)
            x = int(mb["tokens"][b, t])
            ratio = torch.exp(logp[x] - mb["old"][b, t].double())
            adv = float(mb["advantages"][b, t])
            clipped = torch.clamp(ratio, 1 - clip, 1 + clip_high) * adv
            terms["surrogate"][b].append(torch.minimum(ratio * adv, clipped))
            terms["entropy"][b].append(-(logp.exp() * logp).sum())
            terms["exact"][b].append((logp.exp() * (logp - ref)).sum())
            log_r = ref[x] - logp[x]
            terms["k3"][b].append(torch.exp(log_r) - 1 - log_r)
            terms["value"][b].append((mb["values"][b, t].double() - mb["returns"][b, t]) ** 2)
    return terms


def oracle_reduce(rows: list[list[torch.Tensor]], how: str) -> torch.Tensor:
    sums = [sum(row[:n]) for row, n in zip(rows, LENGTHS)]
    if how == "token_mean":
        return sum(sums) / sum(LENGTHS)
    if how == "sequence_mean":
        return sum(s / n for s, n in zip(sums, LENGTHS)) / BATCH
    return sum(sums) / (BATCH * GEN_LEN)


def library_terms(mb, logits, how, clip, clip_high, values=None):
    """The library's four terms (and both KLs) on the same minibatch, with the mask."""
    values = mb["values"] if values is None else values
    logprobs = get_gen_logprobs(logits, mb["tokens"])
    return {
        "surrogate": calc_clipped_surrogate_objective(logprobs, mb["old"], mb["advantages"],
                                                      clip, clip_high, MASK, how),
        "entropy": calc_entropy_bonus(logits, 1.0, MASK, how),
        "exact": aggregate(calc_kl("exact", logprobs, logits, mb["ref_logits"], mb["tokens"]),
                           MASK, how),
        "k3": aggregate(calc_kl("k3", logprobs, logits, mb["ref_logits"], mb["tokens"]),
                        MASK, how),
        "value": calc_value_function_loss(values, mb["returns"], 2.0, MASK, how),
    }


@pytest.mark.parametrize("how", AGGREGATIONS)
@pytest.mark.parametrize("clip_high", [None, 0.28])
def test_each_term_under_each_aggregation(how, clip_high):
    mb = ragged_minibatch(seed=11)
    oracle = per_token_terms(mb, mb["logits"], 0.2, 0.2 if clip_high is None else clip_high)
    got = library_terms(mb, mb["logits"], how, 0.2, clip_high)
    for name, term in got.items():
        scale = 0.5 * 2.0 if name == "value" else 1.0  # 0.5 * vf_coef
        assert term.item() == pytest.approx(scale * oracle_reduce(oracle[name], how).item(),
                                            abs=1e-5), name


def test_clip_higher_by_hand():
    """Ratios 0.5, 1.5 | 1.25, 0.75 with advantages -1, 1 | 1, -1 (and a padding token each):
    clip_coef 0.2, clip_coef_high 0.28 gives -0.8, 1.28 | 1.25, -0.8, mean 0.2325."""
    ratios = torch.tensor([[0.5, 1.5, 9.0], [1.25, 0.75, 9.0]])
    advantages = torch.tensor([[-1.0, 1.0, 5.0], [1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    old = torch.zeros(2, 3)

    def surrogate(high):
        return calc_clipped_surrogate_objective(ratios.log(), old, advantages, 0.2, high, mask)

    assert surrogate(0.28).item() == pytest.approx(0.2325)
    assert surrogate(None).item() == pytest.approx(0.2)  # symmetric: 1.28 becomes 1.2
    wrong = calc_clipped_surrogate_objective(ratios.log(), old, advantages, 0.28, None, mask)
    assert wrong.item() == pytest.approx(0.265)  # both ends moved: -0.8 became -0.72, -0.75


# ---------------------------------------------------------------- gradients: padding gets none


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_padding_gets_exactly_zero_gradient(how):
    mb = ragged_minibatch(seed=13)
    logits = mb["logits"].clone().requires_grad_(True)
    values = mb["values"].clone().requires_grad_(True)
    oracle_logits = mb["logits"].clone().requires_grad_(True)
    oracle_values = mb["values"].clone().requires_grad_(True)
    got = library_terms(mb, logits, how, 0.2, 0.28, values=values)
    oracle = per_token_terms({**mb, "values": oracle_values}, oracle_logits, 0.2, 0.28)
    for name, term in got.items():
        leaf, oracle_leaf = (values, oracle_values) if name == "value" else (logits,
                                                                               oracle_logits)
        (grad,) = torch.autograd.grad(term, leaf, retain_graph=True)
        (expected,) = torch.autograd.grad(oracle_reduce(oracle[name], how), oracle_leaf,
                                          retain_graph=True)
        expected = expected * (2.0 * 0.5 if name == "value" else 1.0)
        assert (grad[MASK == 0] == 0).all(), f"{name}: padding got a gradient"
        assert close(grad, expected), name


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_padding_that_holds_inf_reaches_neither_value_nor_gradient(how):
    """Padding may hold anything (an inf log-ratio of a forced EOS, say). Multiplying by the mask
    would make it NaN (inf * 0); `aggregate` selects, so the value and the gradient stay finite."""
    per_token = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 0.0]],
                             requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    value = aggregate(per_token, mask, how)
    (grad,) = torch.autograd.grad(value, per_token)
    expected = {"token_mean": [[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]],
                "sequence_mean": [[1 / 4, 1 / 4, 0], [1 / 2, 0, 0]],
                "constant": [[1 / 6, 1 / 6, 0], [1 / 6, 0, 0]]}[how]
    assert torch.isfinite(value) and close(grad, torch.tensor(expected))
    multiplied = (per_token * mask).sum()
    assert not torch.isfinite(multiplied)  # the wrong way


# ---------------------------------------------------------------- answers.py by hand


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([3, 6, 7, 9, 10, 10])
    ended = torch.tensor([True, True, True, True, True, False])
    got = calc_overlong_penalty(lengths, ended, gen_len=10, buffer=4)
    # 0 up to 10 - 4 = 6 tokens, then -(L - 6) / 4; truncated: -1.
    assert got.tolist() == [0.0, 0.0, -0.25, -0.75, -1.0, -1.0]


def test_zero_spread_rows_by_hand():
    rewards = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0])
    assert get_zero_spread_rows(rewards, 3).tolist() == [False] * 3 + [True] * 6


def test_loss_mask_by_hand():
    left_out = torch.tensor([False, True, False, False])
    assert get_loss_mask(None, torch.zeros(4, dtype=torch.bool), GEN_LEN) is None
    assert get_loss_mask(None, left_out, 3).tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 1],
                                                          [1, 1, 1]]
    assert get_loss_mask(MASK, left_out, GEN_LEN).tolist() == (MASK * torch.tensor(
        [[1], [0], [1], [1]])).tolist()


def test_apply_answer_options_by_hand():
    rewards = torch.tensor([1.0, 1.0, 0.5, 2.0])
    ended = torch.tensor([False, True, True, True])  # LENGTHS 6, 2, 4, 1 of gen_len 6
    same, mask = apply_answer_options(rewards, MASK, ended, GEN_LEN)
    assert same.tolist() == rewards.tolist() and mask.tolist() == MASK.tolist()
    penalised, mask = apply_answer_options(rewards, MASK, ended, GEN_LEN, "penalty", 3)
    # buffer 3: lengths above 3 lose (L - 3) / 3; the truncated one loses 1.
    assert penalised.tolist() == pytest.approx([0.0, 1.0, 0.5 - 1 / 3, 2.0])
    _, mask = apply_answer_options(rewards, MASK, ended, GEN_LEN, "mask")
    assert mask.sum(dim=1).tolist() == [0, 2, 4, 1]
    _, mask = apply_answer_options(rewards, MASK, ended, GEN_LEN, drop_zero_spread=True,
                                   group_size=2)
    assert mask.sum(dim=1).tolist() == [0, 0, 4, 1]  # group 0 scored 1 and 1
    # The penalty comes first: it gives group 0 a spread, so nothing is dropped.
    _, mask = apply_answer_options(rewards, MASK, ended, GEN_LEN, "penalty", 3, True, 2)
    assert mask.sum(dim=1).tolist() == LENGTHS
    _, mask = apply_answer_options(rewards, None, None, GEN_LEN)
    assert mask is None  # fixed-length: no mask at all


# ---------------------------------------------------------------- where answers end


def encode(model, text: str) -> list[int]:
    return model.tokenizer.encode(text, add_special_tokens=False)  # no BOS (50256, also EOS)


def test_find_answer_ends_with_eos_and_a_stop_string(tiny_model):
    eos = tiny_model.tokenizer.eos_token_id
    rows = [encode(tiny_model, " one two") + [eos] + encode(tiny_model, " three four five"),
            encode(tiny_model, " a b") + [628] + encode(tiny_model, "c d e f g"),  # "\n\n"
            encode(tiny_model, " x\n") + encode(tiny_model, "\ny z w v u"),  # split "\n\n"
            encode(tiny_model, " never ends at all here ok")]
    gen_len = min(len(r) for r in rows)
    tokens = torch.tensor([r[:gen_len] for r in rows])
    lengths, ended = find_answer_ends(tiny_model, tokens, eos, "\n\n")
    by_hand = [rows[0].index(eos) + 1, rows[1].index(628) + 1,
               len(encode(tiny_model, " x\n")) + 1, gen_len]
    assert lengths.tolist() == by_hand
    assert ended.tolist() == [True, True, True, False]
    eos_dropped = rows[0].index(eos)  # the wrong length: the EOS left out of the answer
    assert lengths[0] != eos_dropped
    lengths, ended = find_answer_ends(tiny_model, tokens, eos)  # EOS only
    assert lengths.tolist() == [by_hand[0], gen_len, gen_len, gen_len]
    assert ended.tolist() == [True, False, False, False]


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_per_token_weight_of_a_long_and_a_short_answer(how):
    """docs/answers.md's formulas: d(loss)/d(token) is 1 / N_total (token_mean), 1 / (B L_i)
    (sequence_mean), 1 / (B gen_len) (constant), for B answers, N_total real tokens in all."""
    gen_len, lengths = 8, [8, 2]  # a long answer and a short one
    per_token = torch.zeros(2, gen_len, requires_grad=True)
    (grad,) = torch.autograd.grad(aggregate(per_token, mask_of(lengths, gen_len), how), per_token)
    for row, length in enumerate(lengths):
        weight = {"token_mean": 1 / sum(lengths), "sequence_mean": 1 / (2 * length),
                  "constant": 1 / (2 * gen_len)}[how]
        assert grad[row, :length].tolist() == pytest.approx([weight] * length)
        assert grad[row, length:].eq(0).all()
    short_over_long = grad[1, 0] / grad[0, 0]
    assert short_over_long.item() == pytest.approx(4.0 if how == "sequence_mean" else 1.0)
