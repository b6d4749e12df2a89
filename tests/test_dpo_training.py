"""DPO training end to end on tiny models, and `minirlhf dpo` -> `minirlhf sample`."""

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from minirlhf import cli
from minirlhf.cli.checkpoint import load_checkpoint
from minirlhf.cli.run_folder import load_run_policy
from minirlhf.models import prepare_policy
from minirlhf.pairs import dpo_training
from minirlhf.pairs.dpo import calc_dpo_loss
from minirlhf.pairs.dpo_training import (
    DPOArgs,
    get_all_logprobs,
    get_response_kl,
    tokenize_responses,
    train_dpo,
)
from minirlhf.pairs.preferences import Preference, make_preferences, split_preferences
from minirlhf.rewards import reward_fn_char_count
from minirlhf.runtime import lora
from minirlhf.runtime.loading import load_policy
from minirlhf.runtime.trained_state import load_trained_state
from minirlhf.runtime.trunk import TrunkCache
from minirlhf.sampling import get_samples

PERIOD = 13  # '.' in the printable vocabulary


class CharTokenizer:
    """One token per printable character ('!' is 0, '.' is 13), so that sampled text turns back
    into the tokens it was sampled as (GPT-2's BPE would merge "ab" into a token outside the
    printable model's 94). Decoding is GPT-2's, which maps those 94 ids to the same characters."""

    def __init__(self, gpt2_tokenizer):
        self.gpt2 = gpt2_tokenizer
        self.bos_token_id, self.pad_token_id = None, 0
        self.padding_side = "right"  # read by HookedTransformer's forward on a token tensor
        self.eos_token_id = gpt2_tokenizer.eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        ids = [ord(c) - 33 for c in text]
        assert all(0 <= i < 94 for i in ids), f"{text!r} is not printable ASCII without spaces"
        return {"input_ids": ids}

    def decode(self, ids, **kwargs) -> str:
        return self.gpt2.decode(ids, **kwargs)


@pytest.fixture
def char_model(make_printable_model):
    model = make_printable_model(seed=0)
    model.tokenizer = CharTokenizer(model.tokenizer)
    return model


def period_rate(model) -> float:
    """The share of '.' among 256 x 12 sampled tokens (seeded)."""
    samples = get_samples(model, "A", batch_size=256, gen_len=12, prepend_bos=False,
                          seed=123).texts
    return sum(text[1:].count(".") for text in samples) / (256 * 12)


def test_tokenize_responses_masks_only_the_response(char_model, tiny_model):
    batch = tokenize_responses(char_model, ["AB", "C"], ["..x", "y"], prepend_bos=False)
    assert batch.tokens.tolist() == [[32, 33, 13, 13, 87], [34, 88, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    with_bos = tokenize_responses(tiny_model, ["This is"], [" good"])
    assert with_bos.tokens[0, 0] == tiny_model.tokenizer.bos_token_id
    assert with_bos.response_mask.tolist() == [[0, 0, 0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        tokenize_responses(char_model, [""], ["x"], prepend_bos=False)


def test_the_reference_is_the_starting_policy(char_model):
    """At the first step the policy is still the reference: every implicit reward is 0."""
    pairs = [Preference("A", "..", "xy"), Preference("B", "z.", "qq")]
    args = DPOArgs(prepend_bos=False, epochs=1, batch_size=2, base_lr=1e-3)
    history = train_dpo(char_model, pairs, pairs, args, console=Console(quiet=True))
    assert history[0]["train/chosen_reward"] == 0.0
    assert history[0]["train/rejected_reward"] == 0.0
    assert history[0]["train/loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert history[-1]["held_out/margin"] != 0.0  # and the step moved the policy


def train_on_period_pairs(model, swap: bool = False) -> tuple[float, float, float]:
    """Held-out accuracy, period rate before and after DPO on pairs of the model's own samples
    where the one with more '.' is chosen (with `swap`, the one with fewer: a wrong labelling)."""
    judge = lambda texts: reward_fn_char_count(texts, ".")  # noqa: E731
    prefs = make_preferences(model, judge, ["A", "B", "C", "D"], num_pairs=128, gen_len=12,
                             batch_size=64, prepend_bos=False, seed=0)
    if swap:
        prefs = [Preference(p.prompt, p.rejected, p.chosen) for p in prefs]
    train, held_out = split_preferences(prefs, 0.25, seed=0)
    before = period_rate(model)
    args = DPOArgs(prepend_bos=False, base_lr=1e-3, beta=0.1, epochs=4, batch_size=16,
                   eval_every=10)
    history = train_dpo(model, train, held_out, args, console=Console(quiet=True))
    return history[-1]["held_out/accuracy"], before, period_rate(model)


def test_dpo_learns_to_prefer_periods(char_model):
    """Measured (model seed 0): held-out accuracy 0.94 (0 before: all rewards 0), period rate
    0.005 -> 0.071. Model seeds 1 and 2 gave accuracy 0.88 and 0.75, rates x7.7 and x5.4.
    Required: accuracy >= 0.75 on 32 held-out pairs (chance 0.5; its std there 0.09) and the
    rate at least 3x (its noise: about 16 periods before, std 4)."""
    accuracy, before, after = train_on_period_pairs(char_model)
    assert accuracy >= 0.75
    assert after >= 3 * before
    assert before > 0.002  # the random policy does emit periods: the ratio means something


def test_the_period_check_fails_when_chosen_and_rejected_are_swapped(make_printable_model):
    model = make_printable_model(seed=0)
    model.tokenizer = CharTokenizer(model.tokenizer)
    accuracy, before, after = train_on_period_pairs(model, swap=True)
    assert after < 3 * before  # the rate falls instead (measured 0.0052 -> 0.0003)


def test_get_all_logprobs_batches_like_one_call(char_model):
    pairs = [Preference("A", ".x" * k, "yz"[: 1 + k % 2]) for k in range(1, 6)]
    one = get_all_logprobs(char_model, pairs, DPOArgs(prepend_bos=False, batch_size=8))
    many = get_all_logprobs(char_model, pairs, DPOArgs(prepend_bos=False, batch_size=2))
    torch.testing.assert_close(one, many)


def naive_response_kl(policy, reference, pairs, reverse=False, with_prompt=False,
                      per_sequence=False) -> float:
    """KL(policy || reference) per response token, one response at a time, each next-token KL
    from torch.distributions. The flags make the known-wrong variants: KL(reference || policy),
    prompt positions counted too, a mean of per-sequence means."""
    values = []
    for prompt, response in [(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)]:
        tokens = torch.tensor([[ord(c) - 33 for c in prompt + response]])
        with torch.no_grad():
            p, q = policy(tokens)[0, :-1], reference(tokens)[0, :-1]
        if reverse:
            p, q = q, p
        kls = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=p),
                                                torch.distributions.Categorical(logits=q))
        kls = kls if with_prompt else kls[len(prompt) - 1 :]  # positions predicting the response
        values.append(kls.mean().reshape(1) if per_sequence else kls)
    return torch.cat(values).mean().item()


def test_response_kl_is_the_exact_kl_per_response_token(char_model, make_printable_model):
    reference = make_printable_model(seed=0)
    with torch.no_grad():
        for param in char_model.parameters():
            param.add_(torch.randn_like(param) * 0.3)  # far enough for KL to be asymmetric
    pairs = [Preference("AB", ".x.", "y"), Preference("C", "zz", "q.q.q")]
    args = DPOArgs(prepend_bos=False, batch_size=1)
    kl = get_response_kl(char_model, reference, pairs, args)
    assert kl == pytest.approx(naive_response_kl(char_model, reference, pairs), rel=1e-4)
    for wrong in [dict(reverse=True), dict(with_prompt=True), dict(per_sequence=True)]:
        assert kl != pytest.approx(naive_response_kl(char_model, reference, pairs, **wrong),
                                   rel=1e-2), wrong
    assert get_response_kl(char_model, char_model, pairs, args) == 0.0


@pytest.mark.parametrize("bad, message", [({"beta": 0.0}, "beta"),
                                          ({"label_smoothing": 0.5}, "label_smoothing"),
                                          ({"loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid"),
                                          ({"held_out_fraction": 1.0}, "held_out_fraction")])
def test_bad_args_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        DPOArgs(**bad)


# ---- the command line ----

DPO = ["--base-model", "tiny", "--epochs", "1", "--batch-size", "4", "--eval-every", "2",
       "--base-lr", "1e-4", "--judge", "char_count", "--char", "e"]


def write_prefs(path):
    pairs = [Preference("This is", f" the{' e' * k}", " a cat") for k in range(1, 11)]
    path.write_text("".join(json.dumps(vars(p)) + "\n" for p in pairs))


def test_dpo_command_writes_a_run_that_sample_reads(tmp_path, capsys):
    write_prefs(tmp_path / "prefs.jsonl")
    out = tmp_path / "dpo"
    cli.main(["dpo", "--data", str(tmp_path / "prefs.jsonl"), "--out", str(out), *DPO])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # 8 train pairs / 4 per step
    assert "held_out/accuracy" in json.loads(lines[-1])
    assert (out / "dpo.png").read_bytes()[:4] == b"\x89PNG"
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["prefix"] == "This is" and run["dpo"]["args"]["epochs"] == 1
    assert run["args"]["gen_len"] == 11  # " the" and ten " e": one token each
    assert load_checkpoint(out).trainer["phase"] == 2
    page = (Path(__file__).resolve().parents[1] / "docs" / "dpo.md").read_text()
    undocumented = [key for key in json.loads(lines[-1]) if f"`{key}`" not in page
                    and f"`.../{key.split('/')[1]}`" not in page]
    assert not undocumented, f"metrics missing from docs/dpo.md: {undocumented}"
    capsys.readouterr()
    cli.main(["sample", "--run", str(out), "-n", "2", "--gen-len", "4", "--compare"])
    assert "after 2 phases" in capsys.readouterr().out


def test_dpo_command_guards_its_folder(tmp_path, capsys):
    write_prefs(tmp_path / "prefs.jsonl")
    out = tmp_path / "dpo"
    command = ["dpo", "--data", str(tmp_path / "prefs.jsonl"), "--out", str(out), *DPO]
    cli.main(command)
    with pytest.raises(SystemExit):
        cli.main(command)
    assert "--force" in capsys.readouterr().err
    cli.main([*command, "--force"])
    with pytest.raises(SystemExit):
        cli.main(["dpo", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)])


def test_the_loss_given_drives_the_training(make_printable_model):
    """`loss_fn` is what each step minimises (notebook 8 passes the learner's loss): the same run
    with chosen and rejected swapped in the loss learns the opposite preference."""
    pairs = [Preference(prompt, "." * k, "xyz"[:k]) for prompt in "ABCD" for k in (1, 2, 3)]
    args = DPOArgs(prepend_bos=False, epochs=3, batch_size=4, base_lr=3e-3, eval_every=3)
    margins = {}
    for swap in (False, True):
        model = make_printable_model(seed=0)
        model.tokenizer = CharTokenizer(model.tokenizer)
        loss_fn = (lambda pc, pr, rc, rr, beta: calc_dpo_loss(pr, pc, rr, rc, beta).loss) \
            if swap else (lambda pc, pr, rc, rr, beta: calc_dpo_loss(pc, pr, rc, rr, beta).loss)
        history = train_dpo(model, pairs, pairs, args, console=Console(quiet=True),
                            loss_fn=loss_fn)
        margins[swap] = history[-1]["held_out/margin"]
    assert margins[False] > 0 > margins[True], margins


RESUMABLE = ["--base-model", "tiny", "--epochs", "2", "--batch-size", "2", "--eval-every", "3",
             "--base-lr", "1e-3", "--checkpoint-every", "3", "--judge", "char_count"]
"""8 train pairs in steps of 2: 4 steps an epoch, 8 in all; checkpoints after steps 3, 6, 8."""


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_dpo(tmp_path_factory):
    """One uninterrupted DPO run, and its preference file."""
    folder = tmp_path_factory.mktemp("dpo")
    write_prefs(folder / "prefs.jsonl")
    cli.main(["dpo", "--data", str(folder / "prefs.jsonl"), "--out", str(folder / "run"),
              *RESUMABLE])
    return folder


def interrupt_and_resume(straight_dpo, out, monkeypatch, load_dpo_state=None, flags=()):
    """Run the same command, stopped (as by Ctrl-C) in step 5, mid-epoch; then --resume it."""
    real_step, calls = dpo_training.train_step, []

    def stop_in_fifth_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(dpo_training, "train_step", stop_in_fifth_step)
        with pytest.raises(SystemExit):  # Ctrl-C: one line and exit code 130
            cli.main(["dpo", "--data", str(straight_dpo / "prefs.jsonl"), "--out", str(out),
                      *RESUMABLE, *flags])
    assert load_checkpoint(out).trainer["phase"] == 3  # steps 4 and 5 are run again
    with monkeypatch.context() as patch:
        if load_dpo_state is not None:
            patch.setattr(dpo_training, "load_dpo_state", load_dpo_state)
        cli.main(["dpo", "--out", str(out), "--resume"])


def test_a_resumed_dpo_run_equals_an_uninterrupted_one(straight_dpo, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    interrupt_and_resume(straight_dpo, out, monkeypatch)
    straight = straight_dpo / "run"
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(straight / "metrics.jsonl")
    resumed, uninterrupted = load_checkpoint(out).trainer, load_checkpoint(straight).trainer
    assert resumed["phase"] == uninterrupted["phase"] == 8
    for name, weight in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], weight), name


def test_resuming_without_the_optimizer_state_would_diverge(straight_dpo, tmp_path,
                                                            monkeypatch):
    """The check above can fail: a resume that restores the weights but not AdamW's moments."""
    def weights_only(policy, optimizer, saved):
        policy.load_state_dict({name.removeprefix("base_model."): value
                                for name, value in saved["model"].items()}, strict=False)
        return list(saved["history"])

    out = tmp_path / "resumed"
    interrupt_and_resume(straight_dpo, out, monkeypatch, load_dpo_state=weights_only)
    resumed, straight = read_jsonl(out / "metrics.jsonl"), read_jsonl(straight_dpo / "run" /
                                                                      "metrics.jsonl")
    assert resumed[:3] == straight[:3] and resumed[3:] != straight[3:]


def test_dpo_resume_refuses_changed_flags_and_other_folders(straight_dpo, tmp_path, capsys):
    run = str(straight_dpo / "run")
    for command in (["--out", run, "--resume", "--base-lr", "1"],
                    ["--out", run, "--resume", "--force"],
                    ["--out", str(tmp_path), "--resume"]):
        with pytest.raises(SystemExit):
            cli.main(["dpo", *command])
    errors = capsys.readouterr().err
    assert "drop --base-lr" in errors and "give one of them" in errors
    assert "earlier `minirlhf dpo`" in errors
    cli.main(["dpo", "--out", run, "--resume"])  # a finished run: nothing to do
    assert "Nothing to do" in capsys.readouterr().out
    # A preference file edited since the run started is refused (its SHA-256 is in run.json).
    config = json.loads((straight_dpo / "run" / "run.json").read_text())
    edited = tmp_path / "prefs.jsonl"
    edited.write_text((straight_dpo / "prefs.jsonl").read_text().replace("cat", "dog"))
    config["dpo"]["data"] = str(edited)
    (tmp_path / "run.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        cli.main(["dpo", "--out", str(tmp_path), "--resume"])
    assert "has changed since the run started" in capsys.readouterr().err


# ---- what trains: a frozen trunk, LoRA ----

def naive_sequence_logprob(model, prompt: str, response: str) -> float:
    """log pi(response | prompt) summed token by token over one unpadded sequence."""
    tokens = torch.tensor([[ord(c) - 33 for c in prompt + response]])
    with torch.no_grad():
        logprobs = model(tokens)[0].log_softmax(-1)
    return sum(logprobs[s - 1, tokens[0, s]].item() for s in range(len(prompt), tokens.shape[1]))


class LengthKeyedTrunks(TrunkCache):
    """Known wrong: finds a cached output by the sequence's length alone, so texts of the same
    length (".x" and "yz" after one prompt) read each other's."""

    @staticmethod
    def key(tokens):
        return (len(tokens),)


@pytest.mark.parametrize("fast_path", [True, False])
def test_cached_trunks_give_the_full_forward_logprobs(make_printable_model, fast_path):
    """The trunk cache (filled in one batching, read in another) against a full forward pass per
    sequence; a cache that finds outputs by length alone fails the same check."""
    model = make_printable_model(n_layers=3, seed=0)
    model.tokenizer = CharTokenizer(model.tokenizer)
    pairs = [Preference("AB", ".x" * k, "yz."[: 1 + k % 3]) for k in range(1, 6)]
    args = DPOArgs(prepend_bos=False, batch_size=2, fast_path=fast_path)
    expected = torch.tensor([[naive_sequence_logprob(model, p.prompt, getattr(p, side))
                              for p in pairs] for side in ("chosen", "rejected")])
    trunks = TrunkCache(1, fast_path)
    get_all_logprobs(model, pairs[::-1], DPOArgs(prepend_bos=False, batch_size=5), trunks)
    cached = get_all_logprobs(model, pairs, args, trunks)
    torch.testing.assert_close(torch.stack(cached), expected, atol=1e-4, rtol=1e-4)
    texts = {p.prompt + text for p in pairs for text in (p.chosen, p.rejected)}
    assert len(trunks.residuals) == len(texts)  # one per distinct text, kept from the first fill
    wrong = get_all_logprobs(model, pairs, args, LengthKeyedTrunks(1, fast_path))
    assert not torch.allclose(torch.stack(wrong), expected, atol=1e-2)


def train_lora_on_period_pairs(model, args: DPOArgs) -> tuple[list[dict], float, float]:
    """`train_on_period_pairs` with `args` (what trains): history, period rate before, after."""
    judge = lambda texts: reward_fn_char_count(texts, ".")  # noqa: E731
    prefs = make_preferences(model, judge, ["A", "B", "C", "D"], num_pairs=128, gen_len=12,
                             batch_size=64, prepend_bos=False, seed=0)
    train, held_out = split_preferences(prefs, 0.25, seed=0)
    before = period_rate(model)
    history = train_dpo(model, train, held_out, args, console=Console(quiet=True))
    return history, before, period_rate(model)


@pytest.mark.parametrize("trainable_layers", [None, 1])
def test_lora_dpo_learns_with_the_base_weights_untouched(make_printable_model, trainable_layers,
                                                         monkeypatch):
    """LoRA adapters (on every block, or the top one above a cached trunk) learn the periods;
    every base weight stays as it was; the held-out KL is the exact KL to the base model (a copy
    kept before training: the oracle of "adapters off"); with the adapters left on for the
    reference (`adapters_off` a no-op) that KL reads 0 and the check fails. Measured (model
    seeds 0, 1): held-out accuracy 0.84, 0.81 (top block only: 0.84, 0.84), period rate x18,
    x12 (x40, x17); required as in `test_dpo_learns_to_prefer_periods`."""
    model = make_printable_model(n_layers=2, seed=0)
    model.tokenizer = CharTokenizer(model.tokenizer)
    base = copy.deepcopy(model)
    args = DPOArgs(prepend_bos=False, base_lr=1e-2, beta=0.1, epochs=4, batch_size=16,
                   eval_every=10,
                   lora_rank=4, lora_alpha=8.0, trainable_layers=trainable_layers)
    history, before, after = train_lora_on_period_pairs(model, args)
    assert history[-1]["held_out/accuracy"] >= 0.75 and after >= 3 * before, (history[-1], after)
    weights = dict(model.named_parameters())
    for name, original in base.named_parameters():
        assert torch.equal(weights[name], original), name
    assert any(name.startswith("lora.") for name in weights)
    pairs = [Preference("AB", ".x.", "y"), Preference("C", "zz", "q.q.q")]
    kl = get_response_kl(model, model, pairs, DPOArgs(prepend_bos=False))
    assert kl == pytest.approx(naive_response_kl(model, base, pairs), rel=1e-4) and kl > 1e-3
    monkeypatch.setattr(lora, "adapters_off", contextlib.nullcontext)
    assert get_response_kl(model, model, pairs, DPOArgs(prepend_bos=False)) == 0.0


LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--trainable-layers", "1"]


def test_a_lora_dpo_run_resumes_exactly_and_exports_its_adapters(straight_dpo, tmp_path,
                                                                  monkeypatch):
    """LoRA on the top block: the checkpoint holds the adapters only (the base model holds the
    rest), a resumed run equals an uninterrupted one, and the run's policy, read back for
    `sample` and `export` (adapters merged), gives the trained policy's logits."""
    straight = tmp_path / "straight"
    cli.main(["dpo", "--data", str(straight_dpo / "prefs.jsonl"), "--out", str(straight),
              *RESUMABLE, *LORA])
    resumed = tmp_path / "resumed"
    interrupt_and_resume(straight_dpo, resumed, monkeypatch, flags=LORA)
    assert read_jsonl(resumed / "metrics.jsonl") == read_jsonl(straight / "metrics.jsonl")
    saved = load_checkpoint(straight).trainer["model"]
    assert any(".lora." in name for name in saved)
    assert not any(name.endswith(("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_E", "W_U"))
                   for name in saved), sorted(saved)[:5]
    for name, value in load_checkpoint(resumed).trainer["model"].items():
        assert torch.equal(value, saved[name]), name
    merged = load_run_policy(straight).policy
    policy = load_policy("tiny")
    prepare_policy(policy, 1, 4, 8.0)
    load_trained_state(policy, {k.removeprefix("base_model."): v for k, v in saved.items()})
    tokens = torch.tensor([[50256, 1212, 318, 257, 3797]])
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), policy(tokens), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(policy(tokens), load_policy("tiny")(tokens), atol=1e-4)
