"""`minirlhf sft` on tiny: its run folder, bit-exact --resume, `sample` and `export` on it, and
an SFT run folder as the base model of `train` (policy and reference), `dpo` and `reward-model`."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from minirlhf import cli, sft
from minirlhf.args import RLHFArgs
from minirlhf.cli.checkpoint import load_checkpoint
from minirlhf.cli.run_folder import load_run_policy
from minirlhf.rewards import reward_fn_char_count
from minirlhf.runtime import lora
from minirlhf.runtime.loading import load_policy
from minirlhf.trainer import RLHFTrainer

SFT = ["--base-model", "tiny", "--epochs", "2", "--batch-size", "2", "--eval-every", "3",
       "--base-lr", "1e-3", "--checkpoint-every", "3", "--held-out-fraction", "0.2"]
"""8 train demonstrations in steps of 2: 4 steps an epoch, 8 in all; checkpoints after 3, 6, 8."""


def write_demos(path: Path):
    lines = [{"prompt": f"x={a}", "response": f" {a} {a} {a}"} for a in range(10)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_sft(tmp_path_factory):
    """One uninterrupted SFT run, and its data file."""
    folder = tmp_path_factory.mktemp("sft")
    write_demos(folder / "demos.jsonl")
    cli.main(["sft", "--data", str(folder / "demos.jsonl"), "--out", str(folder / "run"), *SFT])
    return folder


def test_sft_writes_a_run_that_sample_and_export_read(straight_sft, tmp_path, capsys):
    out = straight_sft / "run"
    lines = read_jsonl(out / "metrics.jsonl")
    assert len(lines) == 8 and lines[-1]["held_out/loss"] > 0
    assert (out / "sft.png").read_bytes()[:4] == b"\x89PNG"
    run = json.loads((out / "run.json").read_text())
    assert run["sft"]["args"]["epochs"] == 2 and run["args"]["prefix"].startswith("x=")
    assert run["args"]["gen_len"] == 4  # " 3 3 3" is three tokens, and EOS
    page = (Path(__file__).resolve().parents[1] / "docs" / "sft.md").read_text()
    undocumented = [key for key in lines[-1] if f"`{key}`" not in page]
    assert not undocumented, f"metrics missing from docs/sft.md: {undocumented}"
    capsys.readouterr()
    cli.main(["sample", "--run", str(out), "-n", "2", "--gen-len", "4", "--compare"])
    assert "after 8" in capsys.readouterr().out
    cli.main(["export", "--run", str(out), "--out", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "config.json").is_file()
    assert "after 8 steps" in capsys.readouterr().out


def test_sft_guards_its_folder_and_its_input(straight_sft, tmp_path, capsys):
    command = ["sft", "--data", str(straight_sft / "demos.jsonl"), "--out",
               str(straight_sft / "run"), *SFT]
    with pytest.raises(SystemExit):
        cli.main(command)
    assert "minirlhf sft --out" in capsys.readouterr().err  # how to --resume or --force
    bad = {"empty.jsonl": ("", "holds no demonstrations"),
           "no_response.jsonl": ('{"prompt": "x=1"}\n', "no response to learn"),
           "chat.jsonl": ('{"messages": [{"role": "user", "content": "hi"}]}\n',
                          "no response to learn")}
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit):
            cli.main(["sft", "--data", str(tmp_path / name), "--out", str(tmp_path / "o")])
        assert message in capsys.readouterr().err, name


def interrupt_and_resume(straight_sft, out, monkeypatch, load_state_dict=None, flags=()):
    """Run the same command, stopped (as by Ctrl-C) in step 5, mid-epoch; then --resume it."""
    real_step, calls = sft.SFTTrainer.train_step, []

    def stop_in_fifth_step(self, rows):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(self, rows)

    with monkeypatch.context() as patch:
        patch.setattr(sft.SFTTrainer, "train_step", stop_in_fifth_step)
        with pytest.raises(SystemExit):  # Ctrl-C: one line and exit code 130
            cli.main(["sft", "--data", str(straight_sft / "demos.jsonl"), "--out", str(out),
                      *SFT, *flags])
    assert load_checkpoint(out).trainer["phase"] == 3  # steps 4 and 5 are run again
    assert not (out / "policy.pt").exists()  # not finished: not yet a base model
    with monkeypatch.context() as patch:
        if load_state_dict is not None:
            patch.setattr(sft.SFTTrainer, "load_state_dict", load_state_dict)
        cli.main(["sft", "--out", str(out), "--resume"])


def test_a_resumed_sft_run_equals_an_uninterrupted_one(straight_sft, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    interrupt_and_resume(straight_sft, out, monkeypatch)
    straight = straight_sft / "run"
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(straight / "metrics.jsonl")
    resumed, uninterrupted = load_checkpoint(out).trainer, load_checkpoint(straight).trainer
    assert resumed["phase"] == uninterrupted["phase"] == 8
    for name, weight in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], weight), name
    assert (out / "policy.pt").read_bytes() == (straight / "policy.pt").read_bytes()


def test_resuming_without_the_optimizer_state_would_diverge(straight_sft, tmp_path,
                                                            monkeypatch):
    """The check above can fail: a resume that restores the weights but not AdamW's moments."""
    def weights_only(self, saved):
        self.policy.load_state_dict({name.removeprefix("base_model."): value
                                     for name, value in saved["model"].items()}, strict=False)
        self.history = list(saved["history"])

    out = tmp_path / "resumed"
    interrupt_and_resume(straight_sft, out, monkeypatch, load_state_dict=weights_only)
    resumed, straight = read_jsonl(out / "metrics.jsonl"), read_jsonl(straight_sft / "run" /
                                                                      "metrics.jsonl")
    assert resumed[:3] == straight[:3] and resumed[3:] != straight[3:]


# ---------------------------------------------------------------- an SFT run as a base model

LORA = ["--lora-rank", "4", "--lora-alpha", "8"]


@pytest.fixture(scope="module", params=["every weight", "lora"])
def sft_run(request, tmp_path_factory):
    """A finished SFT run that moved the weights well away from tiny's (lr 1e-2)."""
    folder = tmp_path_factory.mktemp("base")
    write_demos(folder / "demos.jsonl")
    flags = [*SFT, "--base-lr", "1e-2"] + (LORA if request.param == "lora" else [])
    cli.main(["sft", "--data", str(folder / "demos.jsonl"), "--out", str(folder / "run"), *flags])
    return folder / "run"


def get_logprobs(model, tokens):
    return model(tokens).log_softmax(-1)


@pytest.mark.parametrize("rl_lora", [0, 2])
def test_train_from_an_sft_run_has_the_sft_model_as_reference(sft_run, rl_lora):
    """`train --base-model <sft run>`: the policy starts as the SFT model and the reference is
    the SFT model (LoRA SFT: adapters merged), not the model SFT started from."""
    sft_model = load_run_policy(sft_run).policy  # what `sample --run` and `export` read
    args = RLHFArgs(base_model=str(sft_run), batch_size=4, num_minibatches=1, gen_len=4,
                    total_phases=2, warmup_steps=0, lora_rank=rl_lora, device="cpu")
    trainer = RLHFTrainer(args, reward_fn_char_count)
    reference = trainer.reference.model
    tokens = sft_model.to_tokens(["x=3 3 3 3", "This is a test of"], padding_side="right")
    with torch.no_grad(), lora.adapters_off(reference):
        ref_logprobs = get_logprobs(reference, tokens)
        sft_logprobs = get_logprobs(sft_model, tokens)
        base_logprobs = get_logprobs(load_policy("tiny"), tokens)
    torch.testing.assert_close(ref_logprobs, sft_logprobs, atol=1e-5, rtol=0)
    assert (ref_logprobs - base_logprobs).abs().max() > 1e-2  # the check can fail
    for name, value in sft_model.state_dict().items():  # the very weights, not a near copy
        assert torch.equal(reference.state_dict()[name], value), name


def test_an_lora_sft_policy_is_merged_and_trains_every_weight(sft_run):
    model = load_policy(str(sft_run))
    assert lora.get_adapters(model) is None
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "unembed.b_U")


@pytest.mark.slow  # about 30 s on a busy 2-core machine
def test_dpo_reward_model_and_train_start_from_an_sft_run(sft_run, tmp_path, capsys):
    prefs = [{"prompt": "x=1", "chosen": f" 1{' 1' * k}", "rejected": " a cat"}
             for k in range(1, 11)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    base = ["--base-model", str(sft_run), "--epochs", "1", "--batch-size", "4"]
    cli.main(["dpo", "--data", str(tmp_path / "prefs.jsonl"), "--out", str(tmp_path / "dpo"),
              *base, "--judge", "char_count"])
    cli.main(["reward-model", "--data", str(tmp_path / "prefs.jsonl"), "--out",
              str(tmp_path / "rm"), *base, "--normalize-samples", "4", "--normalize-prompt",
              "x=1", "--normalize-gen-len", "4"])
    cli.main(["train", "--preset", "tiny-smoke", "--base-model", str(sft_run), "--reward-model",
              str(tmp_path / "rm"), "--total-phases", "1", "--out", str(tmp_path / "ppo")])
    capsys.readouterr()
    cli.main(["sample", "--run", str(tmp_path / "ppo"), "-n", "2", "--compare"])
    assert "after 1 phases" in capsys.readouterr().out


def test_a_run_folder_that_is_not_a_finished_sft_run_says_so(sft_run, tmp_path):
    (tmp_path / "run.json").write_text("{}")  # a run folder, with no policy.pt
    with pytest.raises(ValueError, match="only a finished `minirlhf sft` run"):
        load_policy(str(tmp_path))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("policy.json", "policy.pt"):
        (damaged / name).write_bytes((sft_run / name).read_bytes())
    with open(damaged / "policy.pt", "r+b") as file:
        file.seek(1000)
        file.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="differs from the size and SHA-256"):
        load_policy(str(damaged))


def test_a_run_json_edit_is_refused_on_resume(straight_sft, tmp_path, capsys):
    """Each checkpoint keeps run.json's configuration: a hand edit since (the learning rate) is
    refused by name on --resume, as for train and dpo, instead of silently applied."""
    out = tmp_path / "run"
    shutil.copytree(straight_sft / "run", out)
    run = json.loads((out / "run.json").read_text())
    run["sft"]["args"]["base_lr"] = 0.5
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit) as stop:
        cli.main(["sft", "--out", str(out), "--resume"])
    assert stop.value.code == 1
    error = capsys.readouterr().err
    assert "run.json was edited since the last checkpoint" in error and "0.5" in error
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(straight_sft / "run" / "metrics.jsonl")
