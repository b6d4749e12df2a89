"""What a run leaves behind and shows at the end: metrics file, plot, summary tables.

Sits on top of the trainer, below the command line.
"""

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text


def append_metrics(path: str | Path, metrics: dict[str, float]):
    """Append one phase's metrics as a JSON line."""
    with open(path, "a") as file:
        file.write(json.dumps(metrics) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def plot_metrics(history: list[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """A PNG with the mean reward (with its spread) and the KL to the reference, per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [m["charts/phase"] for m in history]
    mean = [m["charts/reward_mean"] for m in history]
    std = [m["charts/reward_std"] for m in history]
    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(10, 4))
    ax_reward.plot(phases, mean, marker="o", label="mean reward")
    ax_reward.fill_between(phases, [m - s for m, s in zip(mean, std)],
                           [m + s for m, s in zip(mean, std)], alpha=0.2, label="± 1 std")
    ax_reward.set(xlabel="phase", ylabel="reward", title="Reward of the policy's samples")
    ax_reward.legend()
    ax_kl.plot(phases, [m["charts/kl"] for m in history], marker="o", color="tab:red")
    ax_kl.set(xlabel="phase", ylabel="KL (nats / token)", title="KL(policy || reference)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
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
