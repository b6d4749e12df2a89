"""Data-parallel training (minirlhf.runtime.distributed): two CPU processes over gloo give the
weights and metrics of one process trained on the same global batch.

The oracle is the one-process trainer, whose every stage the rest of the suite checks against
naive loops and hand-worked numbers. "The same global batch": each process of a data-parallel run
samples with its own random stream, so the processes here get their rows of one fixed batch in
place of sampling (process r: rows r * B / 2 ..), and the one-process run gets the whole of it.
With one minibatch per pass the global minibatch is the whole batch in both runs, so the runs
must agree to rounding; with several, the minibatches of one and of two processes are different
(each process shuffles its own rows), which docs/distributed.md describes.

Each check is also run against a known-wrong data-parallel trainer (gradients not averaged;
rewards normalised and advantages whitened per process; only process 0's random states in the
checkpoint) and must fail there.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
from rich.console import Console

from minirlhf import trainer as trainer_module
from minirlhf.advantages import whiten
from minirlhf.args import RLHFArgs
from minirlhf.exercises.core import load_char_model
from minirlhf.losses import calc_clipped_surrogate_objective
from minirlhf.models import GlobalBatch
from minirlhf.runtime import distributed
from minirlhf.sampling import Samples, get_samples
from minirlhf.trainer import RLHFTrainer

ARGS = dict(total_phases=3, batch_size=8, num_minibatches=1, batches_per_learning_phase=2,
            gen_len=6, warmup_steps=0, base_lr=3e-3, head_lr=3e-3, kl_coef=0.05, prefix="A",
            prepend_bos=False, device="cpu", advantage_estimator="gae")
"""Tiny and fast: 8 samples of 6 tokens, 2 optimiser steps a phase."""


def reward_fn_char_codes(samples: list[str]) -> list[float]:
    """A deterministic reward that varies a lot between random samples (the sum of the character
    codes modulo 7), so the normalised rewards and advantages are far from zero."""
    return [float(sum(map(ord, sample)) % 7) for sample in samples]


def get_fixed_batch(args: RLHFArgs) -> Samples:
    """The global batch every run of the equality test trains on (seeded, so every process makes
    the same one)."""
    return get_samples(load_char_model(), args.prefix, args.batch_size, args.gen_len,
                       prepend_bos=False, seed=0)


def serve_rows(batch: Samples):
    """A stand-in for `get_samples` that gives this process its rows of `batch`."""

    def sample(model, prompts, batch_size, *args, **kwargs) -> Samples:
        share = len(batch.texts) // distributed.get_world_size()
        assert len(prompts) == share, "the trainer asked for another share"
        rows = slice(distributed.get_rank() * share, (distributed.get_rank() + 1) * share)
        return Samples(batch.sample_ids[rows], batch.texts[rows], batch.attention_mask[rows],
                       batch.prefix_len)

    return sample


# ---- known-wrong data-parallel trainers ----

def patch_no_gradient_averaging() -> list:
    """Each process steps on its own share's gradient."""
    return [mock.patch.object(distributed, "average_gradients", lambda parameters: None)]


def patch_per_process_statistics() -> list:
    """Reward normalisation, advantages and metrics over this process's rows only: the rollout
    is never gathered into the global batch."""

    def own_rows_only(samples: Samples, rewards, outputs) -> GlobalBatch:
        return GlobalBatch(samples.texts, rewards, outputs._replace(kept={}),
                           samples.response_mask, samples.ended, samples.logprobs,
                           slice(0, len(rewards)))

    return [mock.patch.object(trainer_module, "gather_rollout", own_rows_only)]


def patch_per_process_whitening() -> list:
    """Each minibatch's advantages whitened with this process's share's mean and std."""
    return [mock.patch.object(distributed, "global_moments", lambda values, mask=None: None)]


def patch_main_process_rng_only() -> list:
    """Every process resumes process 0's random states, as if the checkpoint kept only those
    (as a one-process checkpoint does)."""
    return [mock.patch.object(distributed, "own_part", lambda saved: saved[0])]


WRONG = {None: list, "no_grad_average": patch_no_gradient_averaging,
         "per_process_stats": patch_per_process_statistics,
         "per_process_whitening": patch_per_process_whitening,
         "main_rng_only": patch_main_process_rng_only}


# ---- running processes ----

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_trainer(**overrides) -> RLHFTrainer:
    return RLHFTrainer(RLHFArgs(**{**ARGS, **overrides}), reward_fn_char_codes,
                       base_model=load_char_model(), console=Console(quiet=True), table_every=0)


def run_task(task: dict) -> dict:
    """Train `task["phases"]` phases (after loading `task["load"]`, a state file, if given) and
    return the weights, the metrics and the samples; after the first phase save the state to
    `task["save"]` if given."""
    with ExitStack() as patches:
        for patch in WRONG[task.get("wrong")]():
            patches.enter_context(patch)
        if task.get("fixed_batch"):
            batch = get_fixed_batch(RLHFArgs(**ARGS))
            patches.enter_context(mock.patch("minirlhf.trainer.get_samples", serve_rows(batch)))
        trainer = make_trainer(**task.get("args", {}))
        if task.get("load"):
            trainer.load_state_dict(torch.load(task["load"], weights_only=False))
        samples = []
        for phase in range(task["phases"]):
            samples.append(trainer.train_one_phase().texts)
            if phase == 0 and task.get("save"):
                state = trainer.state_dict()  # every process: it gathers their random states
                if distributed.is_main():
                    torch.save(state, task["save"])
    return {"weights": trainer.model.state_dict(), "history": trainer.history, "samples": samples}


def worker(rank: int, world_size: int, port: int, task: dict, out: Path):
    """One process of a data-parallel run, as torchrun would start it (its environment)."""
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with mock.patch.dict("os.environ", env):
        try:
            torch.save(run_task(task), out / f"rank{rank}.pt")
        finally:
            distributed.shutdown()


def run_processes(task: dict, out: Path, world_size: int = 2) -> list[dict]:
    """Run `task` in `world_size` fresh processes over gloo; each process's result."""
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(worker, args=(world_size, free_port(), task, out), nprocs=world_size,
                       start_method="fork")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


# ---- comparisons ----

NOISE_ONLY = "attn.b_K"
"""The key bias, whose true gradient is exactly 0: it adds q . b_K to every score of a query's
row, which the softmax ignores. What backward computes for it is rounding noise (3e-9 here), and
AdamW's first step, g / (|g| + eps), turns that noise into steps of +-lr whose sign depends on
the order of the sums, so it differs between any two ways of summing; it is left out."""


def max_weight_difference(a: dict, b: dict) -> float:
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a
               if a[name].numel() and not name.endswith(NOISE_ONLY))


def metric_differences(a: dict, b: dict) -> dict[str, float]:
    """The metrics that differ by more than rounding (times are each process's own)."""
    assert a.keys() == b.keys()
    return {key: abs(a[key] - b[key]) for key in a
            if not key.endswith("_time") and abs(a[key] - b[key]) > 1e-5 * max(1, abs(a[key]))}


@pytest.fixture(scope="module")
def one_process_run() -> dict:
    """The oracle: one process, the whole fixed batch."""
    return run_task({"phases": 1, "fixed_batch": True})


@pytest.mark.parametrize("wrong", [None, "no_grad_average", "per_process_stats",
                                   "per_process_whitening"])
def test_two_processes_train_like_one(one_process_run: dict, wrong: str | None,
                                      tmp_path: Path):
    ranks = run_processes({"phases": 1, "fixed_batch": True, "wrong": wrong}, tmp_path)
    expected = one_process_run
    weight_gap = max_weight_difference(ranks[0]["weights"], expected["weights"])
    metric_gaps = metric_differences(ranks[0]["history"][0], expected["history"][0])
    reward_gaps = {k: v for k, v in metric_gaps.items() if k.startswith("charts/reward")}
    if wrong is None:
        assert weight_gap < 1e-5, weight_gap
        assert not metric_gaps, metric_gaps
        assert max_weight_difference(ranks[1]["weights"], ranks[0]["weights"]) == 0
        assert ranks[0]["samples"] == expected["samples"]  # both hold the global batch's texts
    elif wrong == "per_process_stats":
        assert weight_gap > 1e-4 and reward_gaps, "the check missed per-process statistics"
    else:
        assert weight_gap > 1e-4, f"the check missed the wrong trainer ({wrong})"


@pytest.mark.parametrize("wrong", [None, "no_grad_average"])
def test_two_processes_train_lora_adapters_like_one(wrong: str | None, tmp_path: Path):
    """The same with LoRA adapters (most weights frozen, without gradients)."""
    task = {"phases": 1, "fixed_batch": True, "args": {"lora_rank": 4}}
    expected, ranks = run_task(task), run_processes({**task, "wrong": wrong}, tmp_path)
    weight_gap = max_weight_difference(ranks[0]["weights"], expected["weights"])
    if wrong is None:
        assert weight_gap < 1e-5
        assert not metric_differences(ranks[0]["history"][0], expected["history"][0])
    else:
        assert weight_gap > 1e-4, "the check missed gradients that were not averaged"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[list[dict], Path]:
    """Two processes, two phases; the state after the first saved to a file."""
    out = tmp_path_factory.mktemp("straight")
    return run_processes({"phases": 2, "save": out / "state.pt"}, out), out / "state.pt"


@pytest.mark.parametrize("wrong", [None, "main_rng_only"])
def test_a_resumed_two_process_run_continues_the_same_curve(straight_run, wrong: str | None,
                                                             tmp_path: Path):
    straight, state = straight_run
    resumed = run_processes({"phases": 1, "load": state, "wrong": wrong}, tmp_path)
    weight_gap = max(max_weight_difference(resumed[rank]["weights"], straight[rank]["weights"])
                     for rank in range(2))
    metric_gaps = metric_differences(resumed[0]["history"][1], straight[0]["history"][1])
    if wrong is None:
        assert weight_gap == 0 and not metric_gaps, (weight_gap, metric_gaps)
        texts = straight[0]["samples"][1]  # each process sampled its own rows: they differ
        assert resumed[0]["samples"][0] == texts and texts[:4] != texts[4:]
    else:
        assert weight_gap > 1e-4 and metric_gaps, "the check missed the wrong random states"


def test_a_checkpoint_of_two_processes_is_refused_by_one(straight_run):
    trainer = make_trainer()
    with pytest.raises(distributed.WorldSizeError, match="2 process.*--nproc-per-node 2"):
        trainer.load_state_dict(torch.load(straight_run[1], weights_only=False))


# ---- the command line under torchrun ----

def torchrun_train(*flags: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "minirlhf", "train", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow  # three launches of two processes (about 40 s on two cores)
def test_torchrun_trains_resumes_and_refuses_another_process_count(tmp_path: Path):
    out = tmp_path / "run"
    flags = ["--preset", "tiny-smoke", "--table-every", "0", "--batch-size", "4",
             "--num-minibatches", "1", "--gen-len", "6", "--device", "cpu", "--out", str(out)]
    first = torchrun_train(*flags, "--total-phases", "2", "--checkpoint-every", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("minirlhf train") == 1, "only process 0 prints"
    assert "2 processes, 2 of the 4 samples" in first.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["charts/phase"] for m in metrics] == [0, 1], "only process 0 writes the metrics"
    resumed = torchrun_train("--out", str(out), "--resume", "--total-phases", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["charts/phase"] for m in metrics] == [0, 1, 2]
    alone = torchrun_train("--out", str(out), "--resume", "--total-phases", "4", nproc=1)
    assert alone.returncode == 1
    assert "saved by a run of 2 process(es), and this run has 1" in alone.stderr


def test_whitening_with_the_global_moments_splits_the_objective_exactly():
    """Two halves of a minibatch whitened with the whole's mean and std give, averaged, the
    objective of the whole (the oracle: one call on all of it); with their own, they do not."""
    generator = torch.Generator().manual_seed(0)
    logprobs, old_logprobs = torch.randn(2, 8, 5, generator=generator) * 0.3
    advantages = torch.randn(8, 5, generator=generator) * 2 + 1
    whole = calc_clipped_surrogate_objective(logprobs, old_logprobs, whiten(advantages), 0.2)
    moments = (advantages.mean(), advantages.std(correction=0))
    halves = [calc_clipped_surrogate_objective(logprobs[rows], old_logprobs[rows],
                                               whiten(advantages[rows], moments), 0.2)
              for rows in (slice(0, 4), slice(4, 8))]
    assert torch.allclose((halves[0] + halves[1]) / 2, whole, atol=1e-6)
    own = [calc_clipped_surrogate_objective(logprobs[rows], old_logprobs[rows],
                                            whiten(advantages[rows]), 0.2)
           for rows in (slice(0, 4), slice(4, 8))]
    assert not torch.allclose((own[0] + own[1]) / 2, whole, atol=1e-3)


# ---- one process, and bad settings ----

def test_one_process_creates_no_process_group(one_process_run):
    assert not torch.distributed.is_initialized()
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("device, backend, message", [
    ("cpu", "nccl", "NCCL moves CUDA tensors only"),
    ("cpu", "mpi", "Unknown backend 'mpi'"),
    ("meta", None, "CPU \\(gloo\\) or CUDA GPUs \\(NCCL\\), not on meta"),
])
def test_a_backend_that_cannot_work_is_refused(monkeypatch, device, backend, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=message):
        distributed.setup(torch.device(device), backend)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=6, num_minibatches=2), "divisible by the number of processes \\(2\\) times"),
    (dict(batch_size=12, num_minibatches=2, group_size=4, advantage_estimator="grpo"),
     "6 rows, which must be whole groups of group_size \\(4\\)"),
])
def test_a_batch_that_does_not_split_says_why(overrides, message):
    def local_batch_size(args: RLHFArgs, world_size: int) -> int:
        return distributed.get_local_batch_size(args.batch_size, args.num_minibatches,
                                                args.group_size, world_size)

    with pytest.raises(ValueError, match=message):
        local_batch_size(RLHFArgs(**{**ARGS, **overrides}), world_size=2)
    assert local_batch_size(RLHFArgs(**{**ARGS, **overrides}), world_size=1) > 0


# ---- stopping and stalling under torchrun ----

def start_torchrun(*flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "minirlhf", "train", *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_phases(out: Path, phases: int, process: subprocess.Popen, limit_s: float = 240):
    """Wait until the run in `out` has logged `phases` phases."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and process.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= phases:
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not log {phases} phases: {process.communicate()}")


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (from its environment)."""
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker of rank {rank}")


TORCHRUN_FLAGS = ["--preset", "tiny-smoke", "--table-every", "0", "--batch-size", "4",
                  "--num-minibatches", "1", "--gen-len", "6", "--device", "cpu",
                  "--total-phases", "400", "--checkpoint-every", "1000"]


@pytest.mark.slow  # two launches of two processes
def test_sigterm_under_torchrun_saves_the_phase_in_progress_and_resumes(tmp_path: Path):
    out = tmp_path / "run"
    run = start_torchrun(*TORCHRUN_FLAGS, "--out", str(out))
    wait_for_phases(out, 2, run)
    run.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode != 0
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]["phase"]
    logged = len((out / "metrics.jsonl").read_text().splitlines())
    assert saved == logged >= 2, f"every logged phase is saved ({saved} of {logged}): {stderr}"
    assert "torchrun --standalone --nproc-per-node 2 -m minirlhf train" in stdout + stderr
    resumed = torchrun_train("--out", str(out), "--resume", "--total-phases", str(saved + 1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["charts/phase"] for m in metrics] == list(range(saved + 1))


@pytest.mark.slow
def test_a_stalled_process_is_named_after_the_collective_timeout(tmp_path: Path):
    out = tmp_path / "run"
    run = start_torchrun(*TORCHRUN_FLAGS, "--out", str(out), "--collective-timeout", "5")
    wait_for_phases(out, 1, run)
    stalled = worker_pid(run, rank=1)
    os.kill(stalled, signal.SIGSTOP)
    try:
        _, stderr = run.communicate(timeout=120)
    finally:
        os.kill(stalled, signal.SIGKILL) if Path(f"/proc/{stalled}").exists() else None
    assert run.returncode != 0
    assert "process 1 did not reach" in stderr, stderr[-3000:]
    assert "--collective-timeout" in stderr


@pytest.mark.parametrize("world_size, rank, who", [(2, 0, "process 1 did not reach"),
                                                   (3, 1, "one of processes 0, 2 did not")])
def test_a_collective_that_times_out_names_the_missing_process(monkeypatch, world_size, rank,
                                                               who):
    """gloo's timeout inside a collective (not only at a barrier) becomes the named error; any
    other RuntimeError passes through unchanged."""
    monkeypatch.setattr(distributed, "get_world_size", lambda: world_size)
    monkeypatch.setattr(distributed, "get_rank", lambda: rank)

    @distributed.names_a_stall("the gradient average")
    def timed_out():
        raise RuntimeError("[gloo/unbound_buffer.cc:78] Timed out waiting 5000ms for recv")

    with pytest.raises(distributed.StalledProcessError, match=f"{who}.*the gradient average"):
        timed_out()

    @distributed.names_a_stall("the gradient average")
    def another_error():
        raise RuntimeError("Tensors must be contiguous")

    with pytest.raises(RuntimeError, match="contiguous") as raised:
        another_error()
    assert not isinstance(raised.value, distributed.StalledProcessError)
