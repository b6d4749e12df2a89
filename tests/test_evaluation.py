"""Tests for minirlhf.evaluation and `minirlhf eval`: reward, sequence-level KL, fluency on
held-out prompts.

Oracles: a policy that is its own reference has KL exactly 0; for a perturbed policy, each
answer's KL is a naive loop over its real tokens, one unpadded sequence at a time through
HookedTransformer's own forward, summing `torch.distributions.kl_divergence` of the two
categoricals (logits / temperature); a fake reward function whose value is known. The KL check
is shown failing on a version that counts the padding after an answer's end and on one that
forgets the temperature.
"""

import copy
import json

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from minirlhf import cli
from minirlhf.evaluation import EvalSettings, evaluate_policy, score_answers
from minirlhf.models import prepare_policy
from minirlhf.sampling import SamplingConfig, get_samples

PERIOD = 13  # '.' in the printable models' vocabulary
RECORDS = [{"prompt": "A"}, {"prompt": "x?"}, {"prompt": "Q:A"}]  # different lengths: padding


def count_letters(responses: list[str]) -> list[float]:
    """The fake reward: the number of characters of the answer alone."""
    return [float(len(response)) for response in responses]


def with_period_eos(model):
    """The model with '.' as EOS and pad token (a private tokenizer copy: GPT-2's 50256 is outside
    the 94-token vocabulary) and '.' made likelier, so that some answers end early and have
    padding after their end."""
    model.tokenizer = copy.deepcopy(model.tokenizer)
    model.tokenizer.eos_token = model.tokenizer.pad_token = "."
    with torch.no_grad():
        model.unembed.b_U[PERIOD] += 3.0
    return model


def perturbed(model, seed: int = 0, scale: float = 0.3):
    """A copy of the model with every weight moved by Gaussian noise: a 'trained' policy."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param += scale * torch.randn(param.shape, generator=generator)
    return other


SETTINGS = dict(gen_len=6, prepend_bos=False, stop_at_eos=True, samples_per_prompt=3,
                batch_size=4, sampling=SamplingConfig(temperature=0.7))


def naive_answer_kl(policy, reference, samples, temperature: float) -> list[float]:
    """Per answer: the sum over its real tokens of KL(policy || reference) at the state that
    chose each, by torch.distributions, one unpadded sequence at a time."""
    kls = []
    for row in range(len(samples.sample_ids)):
        real = samples.attention_mask[row].bool()
        ids = samples.sample_ids[row][real][None]
        prompt_len = int(real[: samples.prefix_len].sum())
        length = int(samples.response_mask[row].sum())
        with torch.no_grad():
            logits = [model(ids)[0] / temperature for model in (policy, reference)]
        kls.append(sum(kl_divergence(Categorical(logits=logits[0][prompt_len - 1 + t]),
                                     Categorical(logits=logits[1][prompt_len - 1 + t])).item()
                       for t in range(length)))
    return kls


@pytest.fixture(scope="module")
def models(make_printable_model):
    reference = with_period_eos(make_printable_model(seed=4))
    return perturbed(reference), reference


@pytest.fixture(scope="module")
def samples(models):
    texts = [r["prompt"] for r in RECORDS] * 2
    return get_samples(models[0], texts, None, 6, SamplingConfig(temperature=0.7),
                       prepend_bos=False, seed=0, stop_at_eos=True)


def test_the_samples_have_padding_after_some_ends(samples):
    lengths = samples.response_mask.sum(-1)
    assert (lengths < 6).any() and (lengths > 1).any()  # the KL check below means something


def test_answer_kl_is_the_naive_sum_over_real_tokens(models, samples):
    policy, reference = models
    got = score_answers(policy, reference, samples, 0.7)["kl"]
    expected = naive_answer_kl(policy, reference, samples, 0.7)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert min(expected) > 0


def test_the_kl_check_rejects_padding_and_a_lost_temperature(models, samples):
    policy, reference = models
    expected = naive_answer_kl(policy, reference, samples, 0.7)
    padded = score_answers(policy, reference, samples._replace(response_mask=None), 0.7)["kl"]
    assert padded != pytest.approx(expected, rel=1e-4, abs=1e-5)
    no_temperature = score_answers(policy, reference, samples, 1.0)["kl"]
    assert no_temperature != pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_reference_logprob_per_token_is_the_naive_mean(models, samples):
    policy, reference = models
    got = score_answers(policy, reference, samples, 0.7)["ref_logprob_per_token"]
    for row, value in enumerate(got):
        real = samples.attention_mask[row].bool()
        ids = samples.sample_ids[row][real]
        prompt_len, length = int(real[: samples.prefix_len].sum()), int(
            samples.response_mask[row].sum())
        with torch.no_grad():
            logits = reference(ids[None])[0] / 0.7
        states = slice(prompt_len - 1, prompt_len - 1 + length)
        naive = Categorical(logits=logits[states]).log_prob(ids[prompt_len : prompt_len + length])
        assert value == pytest.approx(naive.mean().item(), rel=1e-4)


def test_an_untrained_policy_has_kl_zero(models):
    _, reference = models
    result = evaluate_policy(reference, copy.deepcopy(reference), RECORDS, count_letters,
                             EvalSettings(**SETTINGS))
    assert result["metrics"]["kl_per_answer"] == pytest.approx(0.0, abs=1e-6)
    assert all(answer["kl"] == pytest.approx(0.0, abs=1e-6) for answer in result["answers"])


def test_evaluate_policy_reports_reward_kl_and_fluency(models):
    policy, reference = models
    result = evaluate_policy(policy, reference, RECORDS, count_letters, EvalSettings(**SETTINGS))
    answers, metrics = result["answers"], result["metrics"]
    assert [a["prompt"] for a in answers] == [r["prompt"] for r in RECORDS for _ in range(3)]
    rewards = [len(a["response"]) for a in answers]  # the fake reward, recomputed
    assert metrics["reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
    assert metrics["kl_per_answer"] == pytest.approx(sum(a["kl"] for a in answers) / 9)
    assert metrics["kl_per_answer"] > 0
    assert {"distinct_1", "distinct_2", "repeated_3gram", "ref_logprob_per_token",
            "response_length"} <= metrics.keys()
    again = evaluate_policy(policy, reference, RECORDS, count_letters, EvalSettings(**SETTINGS))
    assert again["answers"] == answers  # the seed fixes the answers
    json.dumps(result)  # JSON-ready


def test_a_lora_policy_passed_as_its_own_reference_turns_its_adapters_off(make_printable_model):
    """The KL of a LoRA policy against itself (adapters off for the reference) equals its KL
    against a separate copy of its base model."""
    base = with_period_eos(make_printable_model(seed=5))
    policy = copy.deepcopy(base)
    prepare_policy(policy, None, 2, 16.0, "q,v")
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if name.startswith("lora."):
                param.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    settings = EvalSettings(**SETTINGS | {"stop_at_eos": False})
    own = evaluate_policy(policy, policy, RECORDS, count_letters, settings)
    separate = evaluate_policy(policy, base, RECORDS, count_letters, settings)
    assert own["metrics"]["kl_per_answer"] > 0
    assert own["metrics"]["kl_per_answer"] == pytest.approx(separate["metrics"]["kl_per_answer"],
                                                            rel=1e-5)


def test_evaluate_policy_refuses_bad_input(models):
    with pytest.raises(ValueError, match="no prompt records"):
        evaluate_policy(*models, [], count_letters)
    with pytest.raises(ValueError, match="samples_per_prompt must be at least 1"):
        EvalSettings(samples_per_prompt=0)


# ---- the command ----

FAST = ["--preset", "tiny-smoke", "--table-every", "0", "--batch-size", "4", "--gen-len", "6",
        "--total-phases", "1", "--prompts", "reviews"]
EVAL = ["--max-prompts", "2", "--samples-per-prompt", "2", "--device", "cpu", "--show", "2"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    cli.main(["train", *FAST, "--lora-rank", "2", "--base-lr", "0.05", "--out", str(out)])
    return out


def test_eval_writes_its_file_into_the_run(lora_run, capsys):
    cli.main(["eval", "--run", str(lora_run), *EVAL])
    result = json.loads((lora_run / "eval.json").read_text())
    assert len(result["answers"]) == 4 and result["settings"]["num_prompts"] == 2
    assert result["metrics"]["kl_per_answer"] > 0
    assert result["prompts"] == "reviews"
    out = capsys.readouterr().out
    assert "kl_per_answer" in out and "eval.json" in out
    assert not (lora_run / "run.lock").exists()  # the lock is let go


def test_eval_base_has_kl_zero_and_a_tag_names_the_file(lora_run):
    cli.main(["eval", "--run", str(lora_run), "--base", *EVAL])
    base = json.loads((lora_run / "eval-base.json").read_text())
    assert base["metrics"]["kl_per_answer"] == 0.0
    cli.main(["eval", "--run", str(lora_run), "--tag", "vader-neg", "--reward", "vader",
              "--direction", "neg", *EVAL])
    tagged = json.loads((lora_run / "eval-vader-neg.json").read_text())
    assert tagged["reward"]["kind"] == "char_count"  # the run's; the judge was overridden
    assert all(-1 <= a["reward"] <= 1 for a in tagged["answers"])  # VADER's range


@pytest.mark.parametrize("flags, message", [
    (["--run", "{tmp}"], "is not a run folder"),
    (["--preset", "tiny-smoke"], "add --base and --out"),
    ([], "give --run DIR"),
    (["--run", "{tmp}", "--samples-per-prompt", "0"], "--samples-per-prompt must be at least 1"),
    (["--run", "{tmp}", "--tag", "../x"], "--tag '../x'"),
    (["--run", "{tmp}", "--out", "{tmp}"], "--out goes with --preset"),
])
def test_eval_refuses_bad_input_with_a_clear_error(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        cli.main(["eval", *[flag.format(tmp=tmp_path) for flag in flags]])
    assert message in capsys.readouterr().err


def test_eval_of_a_preset_base_model_without_a_run(tmp_path):
    cli.main(["eval", "--preset", "tiny-smoke", "--base", "--out", str(tmp_path / "base"),
              *EVAL])
    result = json.loads((tmp_path / "base" / "eval-base.json").read_text())
    assert result["settings"]["num_prompts"] == 1  # the preset's prefix: no prompt file
    assert result["answers"][0]["prompt"] == "This is"
    assert result["metrics"]["kl_per_answer"] == 0.0


def test_eval_reads_a_dpo_run_on_a_prompt_file(tmp_path):
    """A DPO run has no prompt file of its own: --prompts gives the held-out split; its reward
    is its judge (char_count here)."""
    rows = [{"prompt": "This is", "chosen": f" the{' e' * k}", "rejected": " a cat"}
            for k in range(1, 11)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "dpo"
    cli.main(["dpo", "--data", str(tmp_path / "prefs.jsonl"), "--out", str(out), "--base-model",
              "tiny", "--epochs", "1", "--batch-size", "4", "--judge", "char_count"])
    cli.main(["eval", "--run", str(out), "--prompts", "reviews", "--gen-len", "4", *EVAL])
    result = json.loads((out / "eval.json").read_text())
    assert result["reward"]["kind"] == "char_count" and len(result["answers"]) == 4
    assert result["metrics"]["kl_per_answer"] > 0


def test_eval_judges_a_penalised_run_by_its_judge_alone():
    """A run trained with `repeat_penalty` is judged without it; --reward and --direction still
    apply on top."""
    import argparse

    from minirlhf.cli.eval import get_reward_spec

    spec = {"kind": "vader", "direction": "neg", "repeat_penalty": 1.0}
    plain = argparse.Namespace(reward=None, direction=None)
    assert get_reward_spec(spec, plain) == {"kind": "vader", "direction": "neg"}
    assert get_reward_spec(spec, argparse.Namespace(reward=None, direction="pos")) == {
        "kind": "vader", "direction": "pos"}
    assert spec["repeat_penalty"] == 1.0  # the run's own spec is left as it was
