"""The command line on the tiny preset: outputs, checkpoints, resume, flags, sampling."""

import json
import subprocess
import sys
import types

import pytest
import torch
from rich.console import Console

from minirlhf import cli
from minirlhf.cli import train as train_command
from minirlhf.runtime.random_streams import RandomStreams
from minirlhf.tracking import ONLINE_INIT_TIMEOUT_S, start_wandb
from minirlhf.trainer import RLHFTrainer

FAST = ["--preset", "tiny-smoke", "--table-every", "0", "--batch-size", "4", "--gen-len", "6"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """One uninterrupted 3-phase run, shared by the tests below."""
    out = tmp_path_factory.mktemp("straight") / "run"
    cli.main(["train", *FAST, "--checkpoint-every", "10", "--out", str(out)])
    return out


def test_train_writes_config_metrics_plot_and_checkpoint(straight_run):
    out = straight_run
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["batch_size"] == 4 and run["reward"]["kind"] == "char_count"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["charts/phase"] for m in metrics] == [0, 1, 2]
    assert (out / train_command.PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["trainer"]["phase"] == 3
    assert len(checkpoint["extra"]["before"][0]) == 4  # phase-0 samples for the summary


def test_an_interrupted_run_resumes_on_the_same_curve(straight_run, tmp_path, monkeypatch, capsys):
    straight = read_jsonl(straight_run / "metrics.jsonl")
    real_phase = RLHFTrainer.train_one_phase

    def crash_in_second_rollout(self):
        if self.phase == 1:
            self.rollout_phase()  # the crash comes after the sampler drew random numbers
            raise KeyboardInterrupt
        return real_phase(self)

    monkeypatch.setattr(RLHFTrainer, "train_one_phase", crash_in_second_rollout)
    out = tmp_path / "resumed"
    with pytest.raises(SystemExit):  # Ctrl-C: one line, exit code 130, no traceback
        cli.main(["train", *FAST, "--checkpoint-every", "10", "--out", str(out)])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]["phase"] == 1
    assert "--resume" in capsys.readouterr().out
    monkeypatch.setattr(RLHFTrainer, "train_one_phase", real_phase)
    cli.main(["train", "--out", str(out), "--resume", "--table-every", "0"])
    resumed = read_jsonl(out / "metrics.jsonl")
    for key in ["charts/reward_mean", "charts/kl", "losses/value_loss", "charts/lr_base"]:
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in straight], abs=1e-6)
    printed = capsys.readouterr().out
    assert "Training summary" in printed and str(out / "checkpoint.pt") in printed


def test_resume_without_restoring_random_state_would_diverge(straight_run, tmp_path,
                                                             monkeypatch):
    """The resume check above can fail: drop the random states and the curve changes."""
    straight = read_jsonl(straight_run / "metrics.jsonl")
    out = tmp_path / "b"
    cli.main(["train", *FAST, "--total-phases", "2", "--out", str(out)])
    run = json.loads((out / "run.json").read_text())
    run["args"]["total_phases"] = 3
    (out / "run.json").write_text(json.dumps(run))
    monkeypatch.setattr(RandomStreams, "load_state_dict", lambda self, state: None)
    cli.main(["train", "--out", str(out), "--resume", "--table-every", "0"])
    resumed = read_jsonl(out / "metrics.jsonl")
    assert resumed[1]["charts/kl"] == pytest.approx(straight[1]["charts/kl"], abs=1e-6)
    assert resumed[2]["charts/kl"] != pytest.approx(straight[2]["charts/kl"], abs=1e-6)


def test_every_rlhfargs_field_has_a_flag():
    parser = cli.build_parser()
    ns = parser.parse_args(["train", "--top-k", "none", "--top-p", "0.9", "--no-prepend-bos",
                            "--advantage-estimator", "one_step", "--kl-coef", "0.5"])
    assert ns.top_k is None and ns.top_p == 0.9 and ns.prepend_bos is False
    assert ns.advantage_estimator == "one_step" and ns.kl_coef == 0.5
    import dataclasses

    from minirlhf.args import RLHFArgs

    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for field in dataclasses.fields(RLHFArgs):
        if field.init:
            assert "--" + field.name.replace("_", "-") in help_text, field.name


def test_bad_flags_get_a_message_that_says_what_to_change(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", *FAST, "--batch-size", "5", "--out", str(tmp_path / "x")])
    assert "divisible by num_minibatches" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume", "--out", str(tmp_path / "missing")])
    assert "--resume needs --out" in capsys.readouterr().err


def test_an_existing_run_is_not_overwritten(straight_run, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", *FAST, "--out", str(straight_run)])
    assert "--resume" in capsys.readouterr().err


def test_sample_loads_the_checkpoint_and_prints_before_and_after(straight_run, capsys):
    cli.main(["sample", "--run", str(straight_run), "-n", "2", "--compare", "--prompt",
              "Once upon"])
    printed = capsys.readouterr().out
    assert "before training" in printed and "after 3 phases" in printed
    assert printed.count("Once upon") >= 4


def test_wandb_logs_offline_into_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cli.main(["train", *FAST, "--total-phases", "1", "--wandb", "--out", str(out)])
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run was written"


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "minirlhf", "train", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--base-lr" in result.stdout


def test_sample_tables_print_model_text_literally():
    """Model output is not rich markup: "[positive]" must show, "[/b]" must not crash."""
    from rich.console import Console

    from minirlhf.cli.report import print_summary
    from minirlhf.tracking import make_sample_table

    console = Console(record=True, width=200)
    samples = ["[positive] This movie was great", "a stray closing tag [/b] here"]
    console.print(make_sample_table(samples, [1.0, 0.0]))
    history = [{"charts/reward_mean": 0.1, "charts/kl": 0.0, "charts/entropy": 3.0}]
    print_summary(console, history, (samples, [1.0, 0.0]), (samples, [0.5, 0.2]))
    text = console.export_text()
    assert text.count("[positive] This movie") == 3 and text.count("[/b]") == 3


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cli.main(["train", *FAST, "--total-phases", "1", "--wandb", "--out", str(out)])
    cli.main(["train", "--out", str(out), "--resume", "--total-phases", "2", "--table-every", "0"])
    wandb_id = json.loads((out / "run.json").read_text())["wandb_id"]
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(wandb_id) for name in runs), (runs, wandb_id)


def test_wandb_falls_back_to_offline_when_online_fails(monkeypatch):
    """No network: wandb.init online raises; the run logs offline instead of stopping."""
    calls = []

    def init(**config):
        calls.append(config["mode"])
        if config["mode"] == "online":  # it gave up after the timeout asked for
            assert config["settings"] == {"init_timeout": ONLINE_INIT_TIMEOUT_S}
            raise ConnectionError("no network")
        return "offline run"

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=init, Settings=dict, teardown=lambda: calls.append("teardown")))
    console = Console(record=True, width=200)
    assert start_wandb({"mode": "online", "project": "p"}, console) == "offline run"
    assert calls == ["online", "teardown", "offline"]  # the id the online start held is freed
    assert "logging offline instead" in console.export_text()
    with pytest.raises(ConnectionError):  # offline itself failing is not hidden
        monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
            Settings=dict, init=lambda **config: (_ for _ in ()).throw(ConnectionError("disk"))))
        start_wandb({"mode": "offline"}, console)


def test_a_lora_run_with_a_frozen_trunk_trains_and_samples(tmp_path, capsys):
    out = tmp_path / "lora"
    cli.main(["train", *FAST, "--total-phases", "2", "--lora-rank", "2",
              "--trainable-layers", "1", "--out", str(out)])
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]["model"]
    assert any(".lora." in key for key in saved)
    cli.main(["sample", "--run", str(out), "-n", "2", "--prompt", "Once upon"])
    assert "after 2 phases" in capsys.readouterr().out
