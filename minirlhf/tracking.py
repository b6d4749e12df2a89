"""Logging through one place: a rich progress bar over phases, sample tables, optional wandb.

Metric keys are namespaced like CleanRL's: `charts/...` for what a person watches (reward, KL,
entropy, LR, time) and `losses/...` for the optimisation's health (value loss, clip fraction,
approximate KL, explained variance). docs/metrics.md explains each one and its healthy range.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def make_sample_table(
    samples: list[str], rewards: list[float], title: str = "Samples", max_rows: int = 5
) -> Table:
    """A rich table of the first few samples with their rewards."""
    table = Table("Reward", "Sample", title=title, show_lines=True)
    for sample, reward in list(zip(samples, rewards))[:max_rows]:
        # Text, not a str: rich would read "[positive]" or "[/b]" in a sample as markup.
        table.add_row(f"{reward:+.3f}", Text(repr(sample)))
    return table


def make_progress(label: str, console: Console) -> Progress:
    """The progress bar of a training loop: label, bar, steps done of total, time, and a
    description the loop updates with its latest metrics."""
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.description}"), console=console)


ONLINE_INIT_TIMEOUT_S = 20
"""How long an online wandb start may wait for its server before the run logs offline."""


def start_wandb(config: dict[str, Any], console: Console):
    """`wandb.init(**config)`; if an online start fails (no network, no login), the run goes on
    logging offline into wandb's folder, to `wandb sync` later, instead of stopping training."""
    try:
        import wandb  # imported only when asked for: it is slow and optional
    except ImportError as error:
        raise ImportError("--wandb needs the wandb package: `.venv/bin/pip install wandb` "
                          "(or set up with `bash scripts/setup.sh --test`), or drop --wandb."
                          ) from error

    if config.get("mode") != "offline":  # no network: give up after 20 s, not wandb's 90
        config = {"settings": wandb.Settings(init_timeout=ONLINE_INIT_TIMEOUT_S), **config}
    try:
        return wandb.init(**config)
    except Exception as error:
        if config.get("mode") == "offline":
            raise
        console.print(f"[yellow]wandb could not start online ({type(error).__name__}: {error}); "
                      "logging offline instead: `wandb sync` the run's wandb folder later.",
                      soft_wrap=True)
        wandb.teardown()  # the failed start still holds the run's id: "run ID is in use"
        return wandb.init(**{**config, "mode": "offline"})


class PhaseLogger:
    """Shows training progress in the terminal and, when asked, sends metrics to wandb.

    Args:
        total_phases: length of the progress bar.
        table_every: print a sample table every this many phases (0: never).
        wandb_config: if given, `wandb.init(**wandb_config)` is called (wandb imported lazily).
        console: where to print (a quiet Console for tests).
    """

    def __init__(
        self,
        total_phases: int,
        table_every: int = 1,
        wandb_config: dict[str, Any] | None = None,
        console: Console | None = None,
    ):
        self.console = console or Console()
        self.table_every = table_every
        self.progress = make_progress("RLHF", self.console)
        self.task = self.progress.add_task("", total=total_phases)
        self.wandb_run = None
        if wandb_config is not None:
            self.wandb_run = start_wandb(wandb_config, self.console)

    def start(self, completed: int = 0):
        self.progress.update(self.task, completed=completed)
        self.progress.start()

    def log_phase(self, phase: int, metrics: dict[str, float], samples: list[str],
                  rewards: list[float]):
        """Advance the bar, show a sample table every `table_every` phases, send to wandb."""
        self.progress.update(
            self.task,
            advance=1,
            description=(
                f"reward {metrics['charts/reward_mean']:+.3f}  kl {metrics['charts/kl']:.3f}  "
                f"rep3 {metrics.get('fluency/repeated_3gram', float('nan')):.2f}  "
                f"{metrics['charts/phase_time']:.1f} s/phase"
            ),
        )
        if self.table_every and phase % self.table_every == 0:
            self.console.print(make_sample_table(samples, rewards, title=f"Phase {phase}"))
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=phase)

    def close(self):
        self.progress.stop()
        if self.wandb_run is not None:
            self.wandb_run.finish()


@contextmanager
def timed(times: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block took to `times[key]`."""
    start = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - start


def get_wandb_config(config: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """`wandb.init`'s arguments for a run with this config (`RLHFArgs.to_dict()`) and `extra`
    ones (mode, dir, id, ...)."""
    return {"project": config["wandb_project_name"], "entity": config["wandb_entity"],
            "config": config, **(extra or {})}
