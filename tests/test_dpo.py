"""The pure math of DPO against independent oracles: a naive loop over tokens, numbers worked by
hand, `-F.logsigmoid`, IPO's formula. Every check is also fed a known-wrong version (the usual
mistakes) and must reject it."""

import math

import pytest
import torch
import torch.nn.functional as F

from minirlhf.models import run_model
from minirlhf.pairs.dpo import calc_dpo_loss, calc_preference_metrics, get_sequence_logprobs

# ---- sequence log-probs ----


def naive_sequence_logprobs(logits, tokens, attention_mask, response_mask):
    """One token at a time, in float64: log softmax(logits[i, s - 1])[tokens[i, s]]."""
    totals = []
    for i in range(tokens.shape[0]):
        total = 0.0
        for s in range(1, tokens.shape[1]):
            if response_mask[i, s] and attention_mask[i, s]:
                dist = torch.distributions.Categorical(logits=logits[i, s - 1].double())
                total += dist.log_prob(tokens[i, s]).item()
        totals.append(total)
    return torch.tensor(totals)


def make_padded_batch(padding_side: str, seed: int = 0):
    """Three rows of different lengths over a 94-token vocabulary: prompt lengths 2, 3, 1 and
    response lengths 3, 1, 4. The response mask is 1 from the response's first token to the end
    of the row (padding after it included), so only the attention mask keeps right padding out."""
    generator = torch.Generator().manual_seed(seed)
    prompt_lens, response_lens, seq = [2, 3, 1], [3, 1, 4], 6
    tokens = torch.randint(94, (3, seq), generator=generator)
    attention_mask = torch.zeros(3, seq, dtype=torch.long)
    response_mask = torch.zeros(3, seq, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        start = 0 if padding_side == "right" else seq - p - r
        attention_mask[i, start : start + p + r] = 1
        response_mask[i, start + p :] = 1
    logits = torch.randn(3, seq, 94, generator=generator) * 3
    logits[attention_mask == 0] = float("nan")  # what padding may hold: it must not leak
    return logits, tokens, attention_mask, response_mask


def check_sequence_logprobs(fn):
    for side in ("left", "right"):
        batch = make_padded_batch(side)
        expected = naive_sequence_logprobs(*batch).float()
        torch.testing.assert_close(fn(*batch), expected, atol=1e-4, rtol=1e-5,
                                   msg=f"{side} padding: not the naive loop's sum")


def test_sequence_logprobs_match_a_naive_loop():
    check_sequence_logprobs(get_sequence_logprobs)


def mean_not_sum(logits, tokens, attention_mask, response_mask):
    counted = (response_mask * attention_mask)[:, 1:].sum(-1)
    return get_sequence_logprobs(logits, tokens, attention_mask, response_mask) / counted


def padding_counted(logits, tokens, attention_mask, response_mask):
    return get_sequence_logprobs(logits, tokens, torch.ones_like(attention_mask), response_mask)


def prompt_counted(logits, tokens, attention_mask, response_mask):
    everything = attention_mask.clone()
    everything[:, 0] = 0
    return get_sequence_logprobs(logits, tokens, attention_mask, everything)


def same_position(logits, tokens, attention_mask, response_mask):  # logits[s] scoring token s
    logprobs = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    counted = (response_mask * attention_mask).bool()
    return torch.where(counted, logprobs, 0.0).sum(-1)


@pytest.mark.parametrize("wrong", [mean_not_sum, padding_counted, prompt_counted, same_position])
def test_the_sequence_check_rejects_common_mistakes(wrong):
    with pytest.raises(AssertionError):
        check_sequence_logprobs(wrong)


def test_a_response_at_token_zero_is_refused():
    logits, tokens, attention_mask, response_mask = make_padded_batch("right")
    response_mask[0, 0] = 1
    with pytest.raises(AssertionError, match="token 0"):
        get_sequence_logprobs(logits, tokens, attention_mask, response_mask)


def test_a_model_gives_the_same_logprob_with_left_right_or_no_padding(printable_model):
    """Through a real forward pass: the padded rows equal the same text run alone."""
    texts = [[5, 6, 7, 8, 9], [20, 21, 22]]  # prompt: the first two tokens
    alone = []
    for row in texts:
        tokens = torch.tensor([row])
        ones = torch.ones_like(tokens)
        response = ones.clone()
        response[:, :2] = 0
        logits, _ = run_model(printable_model, tokens, ones, fast_path=False)
        alone.append(get_sequence_logprobs(logits, tokens, ones, response))
    for side in ("left", "right"):
        tokens = torch.zeros(2, 5, dtype=torch.long)
        mask, response = torch.zeros_like(tokens), torch.zeros_like(tokens)
        for i, row in enumerate(texts):
            where = slice(0, len(row)) if side == "right" else slice(5 - len(row), 5)
            tokens[i, where], mask[i, where] = torch.tensor(row), 1
            response[i, where.start + 2 : where.stop] = 1
        logits, _ = run_model(printable_model, tokens, mask, fast_path=False)
        torch.testing.assert_close(get_sequence_logprobs(logits, tokens, mask, response),
                                   torch.cat(alone), atol=1e-4, rtol=1e-4)


# ---- the loss ----

# Worked by hand: policy chosen -10, rejected -12; reference chosen -10.5, rejected -11.5.
# Log-ratios +0.5 and -0.5, h = 1; beta = 0.1 gives rewards +0.05 and -0.05 and
# DPO: -log sigmoid(0.1) = log(1 + e^-0.1) = 0.6443966600
# conservative (eps 0.1): 0.9 * 0.6443966600 + 0.1 * log(1 + e^0.1) = 0.6543966600
# IPO: (1 - 1 / 0.2)^2 = 16
HAND = [torch.tensor([v]) for v in (-10.0, -12.0, -10.5, -11.5)]


def check_dpo_loss(fn):
    loss, chosen, rejected = fn(*HAND, beta=0.1)
    assert loss.item() == pytest.approx(0.6443966600, abs=1e-6), "DPO loss worked by hand"
    assert chosen.item() == pytest.approx(0.05, abs=1e-6), "chosen implicit reward"
    assert rejected.item() == pytest.approx(-0.05, abs=1e-6), "rejected implicit reward"
    logps = [torch.randn(8, generator=torch.Generator().manual_seed(i)) * 5 for i in range(4)]
    h = (logps[0] - logps[2]) - (logps[1] - logps[3])
    torch.testing.assert_close(fn(*logps, beta=0.3)[0], -F.logsigmoid(0.3 * h).mean())
    policy_chosen = logps[0].clone().requires_grad_(True)
    fn(policy_chosen, *logps[1:], beta=0.3)[0].backward()
    assert (policy_chosen.grad < 0).all(), "raising the chosen log-prob must lower the loss"


def test_the_dpo_loss_matches_hand_numbers_and_logsigmoid():
    check_dpo_loss(calc_dpo_loss)


def beta_outside(pc, pr, rc, rr, beta):
    return (-beta * F.logsigmoid((pc - rc) - (pr - rr)).mean(), beta * (pc - rc),
            beta * (pr - rr))


def reference_left_out(pc, pr, rc, rr, beta):
    return calc_dpo_loss(pc, pr, torch.zeros_like(rc), torch.zeros_like(rr), beta)


def swapped(pc, pr, rc, rr, beta):
    return calc_dpo_loss(pr, pc, rr, rc, beta)


@pytest.mark.parametrize("wrong", [beta_outside, reference_left_out, swapped])
def test_the_loss_check_rejects_common_mistakes(wrong):
    with pytest.raises(AssertionError):
        check_dpo_loss(wrong)


def test_conservative_dpo_and_ipo_match_their_formulas():
    smoothed = calc_dpo_loss(*HAND, beta=0.1, label_smoothing=0.1).loss
    assert smoothed.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.1))
                                            + 0.1 * math.log1p(math.exp(0.1)), abs=1e-6)
    assert smoothed.item() == pytest.approx(0.6543966600, abs=1e-6)
    ipo = calc_dpo_loss(*HAND, beta=0.1, loss_type="ipo")
    assert ipo.loss.item() == pytest.approx(16.0, abs=1e-5)
    assert ipo.chosen_rewards.item() == pytest.approx(0.05, abs=1e-6)
    wrong_ipo = calc_dpo_loss(*HAND, beta=0.2, loss_type="ipo").loss  # 1/(2 beta) matters
    assert wrong_ipo.item() != pytest.approx(16.0, abs=1e-3)


def test_ipo_pulls_the_log_ratio_gap_towards_one_over_two_beta():
    pc = torch.tensor([-10.0], requires_grad=True)
    calc_dpo_loss(pc, *HAND[1:], beta=0.1, loss_type="ipo").loss.backward()
    assert pc.grad.item() < 0  # h = 1 < 1 / (2 beta) = 5: raise the chosen
    pc = torch.tensor([-10.0], requires_grad=True)
    calc_dpo_loss(pc, *HAND[1:], beta=1.0, loss_type="ipo").loss.backward()
    assert pc.grad.item() > 0  # h = 1 > 0.5: IPO does not push the gap further (DPO would)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="loss_type"):
        calc_dpo_loss(*HAND, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        calc_dpo_loss(*HAND, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="IPO"):
        calc_dpo_loss(*HAND, beta=0.1, loss_type="ipo", label_smoothing=0.1)


def test_preference_metrics():
    metrics = calc_preference_metrics(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert metrics == pytest.approx({"accuracy": 1 / 3, "margin": 0.0, "chosen_reward": 1.0,
                                     "rejected_reward": 1.0})
