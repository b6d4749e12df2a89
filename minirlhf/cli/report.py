"""What a run leaves behind and shows at the end: metrics file, plots, summary tables.

Sits on top of the trainer, the reward-model training and DPO (it reads their metric dicts),
below the command line and the benchmarks. matplotlib is imported only when a plot is drawn.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from minirlhf.cli.safe_files import append_text, replacing, write_text


def append_metrics(path: str | Path, metrics: dict[str, float]):
    """Append one phase's metrics as a JSON line (never through a symbolic link)."""
    append_text(Path(path), json.dumps(metrics) + "\n")


def write_metrics(path: str | Path, history: list[dict[str, float]]):
    """Replace the metrics file with `history`, one JSON line each (atomically)."""
    write_text(Path(path), "".join(json.dumps(m) + "\n" for m in history))


@contextmanager
def two_panel_figure(
    path: str | Path, title: str = "", figsize: tuple[float, float] = (10, 4)
) -> Iterator[tuple[Any, Any]]:
    """Two side-by-side matplotlib Axes to draw on, saved to `path` as a PNG on leaving."""
    import matplotlib

    matplotlib.use("Agg")  # write files, open no window (also on machines without a display)
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=figsize)
    try:
        yield left, right
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        with replacing(Path(path)) as file:  # a symlinked plot is refused
            fig.savefig(file, dpi=100, format="png")
    finally:
        plt.close(fig)


def plot_metrics(history: list[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """A PNG with the mean reward (with its spread) and the KL to the reference, per phase."""
    phases = [m["charts/phase"] for m in history]
    mean = [m["charts/reward_mean"] for m in history]
    std = [m["charts/reward_std"] for m in history]
    with two_panel_figure(path, title) as (ax_reward, ax_kl):
        ax_reward.plot(phases, mean, marker="o", label="mean reward")
        ax_reward.fill_between(phases, [m - s for m, s in zip(mean, std)],
                               [m + s for m, s in zip(mean, std)], alpha=0.2, label="± 1 std")
        ax_reward.set(xlabel="phase", ylabel="reward", title="Reward of the policy's samples")
        ax_reward.legend()
        ax_kl.plot(phases, [m["charts/kl"] for m in history], marker="o", color="tab:red")
        ax_kl.set(xlabel="phase", ylabel="KL (nats / token)", title="KL(policy || reference)")
    return Path(path)


def plot_accuracy(ax, history: list[dict[str, float]], title: str) -> list[dict[str, float]]:
    """Preference accuracy against step on `ax` (train per step, held-out where evaluated);
    returns the held-out evaluations, for the other panel."""
    evals = [m for m in history if "held_out/accuracy" in m]
    ax.plot([m["charts/step"] for m in history], [m["train/accuracy"] for m in history],
            alpha=0.4, label="train (step)")
    ax.plot([m["charts/step"] for m in evals], [m["held_out/accuracy"] for m in evals],
            marker="o", label="held-out")
    ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title=title)
    return evals


def plot_reward_model_metrics(history: list[dict[str, float]], path: str | Path) -> Path:
    """A PNG: accuracy (train and held-out) and loss against step, from `train_reward_model`."""
    steps = [m["charts/step"] for m in history]
    with two_panel_figure(path) as (ax_acc, ax_loss):
        evals = plot_accuracy(ax_acc, history, "Chosen scored above rejected")
        eval_steps = [m["charts/step"] for m in evals]
        ax_loss.plot(steps, [m["train/loss"] for m in history], alpha=0.4, label="train (step)")
        ax_loss.plot(eval_steps, [m["held_out/loss"] for m in evals], marker="o", label="held-out")
        ax_loss.set(xlabel="step", ylabel="-log sigmoid(r_c - r_r - m)", title="Pairwise loss")
        ax_acc.legend()
        ax_loss.legend()
    return Path(path)


def plot_dpo_metrics(history: list[dict[str, float]], path: str | Path) -> Path:
    """A PNG: preference accuracy (train and held-out), and the held-out implicit rewards of the
    chosen and rejected responses, against step."""
    with two_panel_figure(path) as (ax_acc, ax_reward):
        evals = plot_accuracy(ax_acc, history, "Chosen's implicit reward above rejected's")
        eval_steps = [m["charts/step"] for m in evals]
        for key, label in [("chosen_reward", "chosen"), ("rejected_reward", "rejected"),
                           ("margin", "margin")]:
            ax_reward.plot(eval_steps, [m[f"held_out/{key}"] for m in evals], marker="o",
                           label=label)
        ax_reward.axhline(0.0, color="grey", linewidth=0.5)
        ax_reward.set(xlabel="step", ylabel="beta * (log pi - log pi_ref)",
                      title="Held-out implicit rewards")
        ax_acc.legend()
        ax_reward.legend()
    return Path(path)


def plot_sft_metrics(history: list[dict[str, float]], path: str | Path) -> Path:
    """A PNG: the loss per response token (train per step, held-out where evaluated), and the
    held-out token accuracy and exact match, against step (`minirlhf sft`)."""
    steps = [m["charts/step"] for m in history]
    evals = [m for m in history if "held_out/loss" in m]
    eval_steps = [m["charts/step"] for m in evals]
    with two_panel_figure(path) as (ax_loss, ax_acc):
        ax_loss.plot(steps, [m["train/loss"] for m in history], alpha=0.4, label="train (step)")
        ax_loss.plot(eval_steps, [m["held_out/loss"] for m in evals], marker="o", label="held-out")
        ax_loss.set(xlabel="step", ylabel="nats / response token", title="SFT loss")
        ax_acc.plot(steps, [m["train/accuracy"] for m in history], alpha=0.4,
                    label="token accuracy, train (step)")
        for key, label in [("accuracy", "token accuracy"), ("exact_match", "exact match")]:
            ax_acc.plot(eval_steps, [m[f"held_out/{key}"] for m in evals], marker="o",
                        label=f"{label}, held-out")
        ax_acc.set(xlabel="step", ylabel="share", ylim=(0, 1.02), title="Greedy answers")
        ax_loss.legend()
        ax_acc.legend()
    return Path(path)


def _mean(history: list[dict[str, float]], key: str) -> float:
    return sum(m[key] for m in history) / len(history)


def print_summary(
    console: Console,
    history: list[dict[str, float]],
    before: tuple[list[str], list[float]],
    after: tuple[list[str], list[float]],
    n_phases: int = 3,
    n_samples: int = 5,
):
    """Reward and KL of the first vs the last phases, then samples before and after."""
    first, last = history[:n_phases], history[-n_phases:]
    numbers = Table("", f"first {len(first)} phases", f"last {len(last)} phases",
                    title="Training summary")
    for label, key in [("mean reward", "charts/reward_mean"), ("KL to reference", "charts/kl"),
                       ("entropy", "charts/entropy")]:
        numbers.add_row(label, f"{_mean(first, key):+.3f}", f"{_mean(last, key):+.3f}")
    console.print(numbers)
    samples = Table("Before training", "After training", title="Samples", show_lines=True)
    for i in range(min(n_samples, len(before[0]), len(after[0]))):
        samples.add_row(Text(f"[{before[1][i]:+.2f}] {before[0][i]}"),
                        Text(f"[{after[1][i]:+.2f}] {after[0][i]}"))  # Text: no markup parsing
    console.print(samples)
