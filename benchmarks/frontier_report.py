"""The table and the plot of benchmarks/frontier.py (and the pure helpers they stand on): every
`frontier-*.json` point in a folder, one curve per method, one panel per direction.

"Reward" below is the direction's reward, the one the methods maximise: VADER for "pos", minus
VADER for "neg", so higher is better in both; the table and the plot show VADER itself.
"""

import json
import math
from collections import Counter
from pathlib import Path

from rich.console import Console

from minirlhf.cli.report import two_panel_figure

LABELS = {"base": "SmolLM2 (base)", "ppo_gae": "PPO-GAE", "grpo": "GRPO", "rloo": "RLOO",
          "reinforce_pp": "REINFORCE++", "reinforce_pp_baseline": "REINFORCE++-baseline",
          "dpo": "DPO", "trl_grpo": "TRL GRPOTrainer"}
REPEAT_SLACK = 0.10
"""A point is fluent when its share of repeated 3-grams is at most the base model's + this
(issue 25's bar)."""
SAMPLES_SHOWN = 4


def get_envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper envelope of (KL, reward) points: those that no other point matches or beats
    with a KL as small or smaller, sorted by KL (each one a higher reward than the last)."""
    front: list[tuple[float, float]] = []
    for kl, reward in sorted(points, key=lambda point: (point[0], -point[1])):
        if not front or reward > front[-1][1]:
            front.append((kl, reward))
    return front


def reward_at_kl(front: list[tuple[float, float]], kl: float) -> float | None:
    """The reward an envelope reaches at `kl`, linear between its points; None outside them
    (a KL the curve never reached, or below its first point)."""
    for (kl_0, reward_0), (kl_1, reward_1) in zip(front, front[1:]):
        if kl_0 <= kl <= kl_1:
            return reward_0 + (reward_1 - reward_0) * (kl - kl_0) / (kl_1 - kl_0)
    if front and kl == front[0][0]:
        return front[0][1]
    return None


def extend_flat(front: list[tuple[float, float]], max_kl: float) -> list[tuple[float, float]]:
    """The envelope carried flat to `max_kl`, the largest KL the curve measured: a point past the
    envelope's last one reached no more reward than it, but the curve was measured there."""
    if front and max_kl > front[-1][0]:
        return [*front, (max_kl, front[-1][1])]
    return front


def pick_best(points: list[dict], base_repeat: float, slack: float = REPEAT_SLACK) -> dict:
    """The point with the highest "reward" among those whose "repeated_3gram" share is at most
    `base_repeat + slack` (the fluent ones); if none is fluent, the highest reward of all.

    Returns:
        A copy of that point with "fluent" (bool) added.
    """
    if not points:
        raise ValueError("pick_best needs at least one point.")
    fluent = [p for p in points if p["repeated_3gram"] <= base_repeat + slack]
    best = max(fluent or points, key=lambda p: p["reward"])
    return {**best, "fluent": bool(fluent)}


def load_points(folder: Path) -> list[dict]:
    """Every point in `folder`, with its signed "reward" and "kl" (per answer) added."""
    points = []
    for path in sorted(folder.glob("frontier-*.json")):
        point = json.loads(path.read_text())
        sign = 1.0 if point["direction"] == "pos" else -1.0
        point["reward"] = sign * point["vader_mean"]
        point["kl"] = point["metrics"]["kl_per_answer"]
        point["repeated_3gram"] = nan_if_none(point["metrics"]["repeated_3gram"])
        points.append(point)
    return points


def nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def get_curves(points: list[dict], direction: str) -> dict[str, list[dict]]:
    """The direction's points by curve label (a method; its KL kind and phases where several
    of them were measured), each curve starting at the base point and sorted by KL."""
    mine = [p for p in points if p["direction"] == direction]
    base = [p for p in mine if p["method"] == "base"]
    phases = Counter(p["phases"] for p in mine if p["method"] not in ("base", "dpo"))
    curves: dict[str, list[dict]] = {}
    for point in sorted(mine, key=lambda p: list(LABELS).index(p["method"])):
        if point["method"] == "base":
            continue
        label = LABELS[point["method"]]
        if point["kind"] == "kl_target":
            label += " (kl_target)"
        if len(phases) > 1 and point["phases"] is not None:
            label += f", {point['phases']} phases"
        curves.setdefault(label, list(base)).append(point)
    return {label: sorted(curve, key=lambda p: p["kl"]) for label, curve in curves.items()}


def plot(points: list[dict], path: Path):
    """Held-out mean VADER against KL per answer, one curve per method, a panel per direction."""
    with two_panel_figure(path, figsize=(12, 4.5)) as panels:
        for axes, direction in zip(panels, ("pos", "neg")):
            for label, curve in get_curves(points, direction).items():
                style = "--" if label.startswith("TRL") else "-"
                axes.plot([p["kl"] for p in curve], [p["vader_mean"] for p in curve], style,
                          marker="o", ms=4, label=label)
            axes.set(xlabel="KL(policy || reference) per answer, nats",
                     ylabel="held-out mean VADER compound",
                     title=f"{direction}: {'higher' if direction == 'pos' else 'lower'} is better")
            if axes.get_legend_handles_labels()[0]:
                axes.legend(fontsize=8)


def strength_text(point: dict) -> str:
    return "-" if point["kind"] is None else f"{point['kind']} {point['strength']:g}"


def vs_trl(point: dict, trl_front: list[tuple[float, float]]) -> str:
    """This point's VADER minus TRL GRPO's envelope at the same measured KL, in the direction's
    favour (+: better than TRL)."""
    if point["method"] in ("base", "trl_grpo") or not trl_front:
        return ""
    theirs = reward_at_kl(trl_front, point["kl"])
    return "beyond TRL's KL range" if theirs is None else f"{point['reward'] - theirs:+.3f}"


def direction_table(points: list[dict], direction: str) -> list[str]:
    """The markdown table of one direction: every point, fluency beside reward."""
    curves = get_curves(points, direction)
    trl = [p for label, curve in curves.items() if label.startswith("TRL") for p in curve]
    trl_front = extend_flat(get_envelope([(p["kl"], p["reward"]) for p in trl]),
                            max((p["kl"] for p in trl), default=0.0))
    lines = ["| method | strength | held-out VADER | KL / answer | distinct-1 | distinct-2 | "
             "repeated 3-grams | ref log-lik / token | vs TRL at this KL | train |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [p for p in points if p["direction"] == direction]
    for p in sorted(rows, key=lambda p: (list(LABELS).index(p["method"]), p["kl"])):
        m = p["metrics"]
        lines.append(
            f"| {LABELS[p['method']]} | {strength_text(p)} | {p['vader_mean']:+.3f} | "
            f"{p['kl']:.2f} | {m['distinct_1']:.2f} | {m['distinct_2']:.2f} | "
            f"{p['repeated_3gram']:.3f} | {nan_if_none(m['ref_logprob_per_token']):.2f} | "
            f"{vs_trl(p, trl_front)} | {p['train_seconds'] / 60:.1f} min |")
    return lines


def best_samples(points: list[dict], direction: str) -> list[str]:
    """Each method's best point (`pick_best`) and a few of its answers."""
    mine = [p for p in points if p["direction"] == direction]
    base = [p for p in mine if p["method"] == "base"]
    base_repeat = base[0]["repeated_3gram"] if base else 0.0
    lines = []
    for label, curve in get_curves(points, direction).items():
        best = pick_best([p for p in curve if p["method"] != "base"], base_repeat)
        note = "" if best["fluent"] else " (no point of this method is fluent by the bar)"
        lines += ["", f"**{label}, {strength_text(best)}**: VADER {best['vader_mean']:+.3f}, "
                  f"KL {best['kl']:.2f}, repeated 3-grams {best['repeated_3gram']:.3f}{note}", ""]
        answers = best["answers"]
        for answer in answers[:: max(1, len(answers) // SAMPLES_SHOWN)][:SAMPLES_SHOWN]:
            text = (answer["prompt"] + answer["response"]).replace("\n", " ").replace("|", "/")
            lines.append(f"- [{answer['vader']:+.2f}] {text}")
    return lines


def get_markdown(points: list[dict]) -> str:
    """The whole report: the machine, then per direction the table and the best samples."""
    lines = ["# Reward vs KL on held-out review prompts", ""]
    machine = next((p["machine"] for p in points), None)
    if machine:
        lines += [f"Measured on {machine['cpu']}, {machine['cores']} cores (fast bf16: "
                  f"{machine['fast_bf16']}), torch {machine['torch']}, {machine['threads']} "
                  "threads.", ""]
    for direction, title in (("pos", "Positive"), ("neg", "Negative")):
        if any(p["direction"] == direction for p in points):
            lines += [f"## {title} (VADER {'up' if direction == 'pos' else 'down'})", "",
                      *direction_table(points, direction), "",
                      f"Samples of each method's best point (the highest reward whose repeated "
                      f"3-gram share is at most the base model's + {REPEAT_SLACK:.2f}):",
                      *best_samples(points, direction), ""]
    return "\n".join(lines)


def write_report(folder: Path, console: Console):
    """frontier.md and frontier.png in `folder`, from its points; the markdown printed too."""
    points = load_points(folder)
    if not points:
        console.print(f"No frontier-*.json points in {folder} yet.")
        return
    plot(points, folder / "frontier.png")
    markdown = get_markdown(points)
    (folder / "frontier.md").write_text(markdown + "\n")
    console.print(markdown, soft_wrap=True, markup=False, highlight=False)
    console.print(f"Table: {folder / 'frontier.md'}  Plot: {folder / 'frontier.png'}",
                  soft_wrap=True)
