"""The report of `minirlhf inspect`: report.md, inspect.json and four PNG figures, and the summary
printed at the end. Every file goes through `cli.safe_files` (a symlink in the folder is refused).
"""

import dataclasses
import json
import warnings
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from minirlhf.cli.report import two_panel_figure
from minirlhf.cli.safe_files import UnsafeFileError, describe_link, write_text
from minirlhf.inspection import LogitAttribution, TokenChanges, WeightChange, get_moved_shares

FIGURES = ("weights.png", "token_kl.png", "steering.png", "attribution.png")


@dataclasses.dataclass
class Findings:
    """What `minirlhf inspect` measured (`minirlhf.inspection`'s results, gathered)."""

    run: str
    base_model: str
    kind: str
    changes: list[WeightChange]
    lora: dict[str, list[float]]
    tokens: TokenChanges
    answers: list[list[str]]
    """Each sampled answer's tokens, as text."""
    lens: list[tuple[list[str], list[str]]]
    """Per block: the tokens the mean difference promotes most, and suppresses most."""
    difference_norms: list[float]
    layers: list[int]
    scales: list[float]
    token_shifts: tuple[list, list] = ([], [])
    reference_reward: float | None = None
    trained_reward: float | None = None
    steering: list[list[float]] | None = None
    reward_tokens: str = ""
    attribution: dict[str, LogitAttribution] | None = None
    value_shifts: tuple[list, list] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def best_steering(self) -> tuple[int, float, float] | None:
        """(layer, scale, share of the trained policy's reward gain) of the best steered run."""
        if not self.steering or self.trained_reward is None:
            return None
        i, j = max(((i, j) for i in range(len(self.layers)) for j in range(len(self.scales))),
                   key=lambda ij: self.steering[ij[0]][ij[1]])
        gain = self.trained_reward - self.reference_reward
        recovered = (self.steering[i][j] - self.reference_reward) / gain if gain else float("nan")
        return self.layers[i], self.scales[j], recovered


def write_report(out: Path, findings: Findings):
    """report.md, inspect.json and the figures, into `out` (created)."""
    if out.is_symlink():
        raise UnsafeFileError(describe_link(out))
    out.mkdir(parents=True, exist_ok=True)
    plot_weights(findings, out / FIGURES[0])
    plot_token_kl(findings, out / FIGURES[1])
    plot_steering(findings, out / FIGURES[2])
    if findings.attribution:
        plot_attribution(findings.attribution, out / FIGURES[3])
    write_text(out / "inspect.json", json.dumps(to_json(findings), indent=2))
    write_text(out / "report.md", render_markdown(findings))


def to_json(findings: Findings) -> dict:
    moved, moved_bf16 = get_moved_shares(findings.changes)
    return {"run": findings.run, "kind": findings.kind, "seconds": findings.seconds,
            "moved": moved, "moved_bf16": moved_bf16,
            "weights": [c._asdict() for c in findings.changes], "lora": findings.lora,
            "mean_kl": findings.tokens.kl.mean().item(), "lens": findings.lens,
            "token_shifts": findings.token_shifts, "reference_reward": findings.reference_reward,
            "trained_reward": findings.trained_reward, "steering_layers": findings.layers,
            "steering_scales": findings.scales, "steering": findings.steering,
            "best_steering": findings.best_steering(), "value_shifts": findings.value_shifts,
            "attribution": {k: dict(zip(a.labels, a.attribution.tolist()))
                            for k, a in (findings.attribution or {}).items()}}


def by_layer(changes: list[WeightChange]) -> dict[int, list[WeightChange]]:
    layers = defaultdict(list)
    for change in changes:
        if change.layer is not None:
            layers[change.layer].append(change)
    return dict(sorted(layers.items()))


def plot_weights(findings: Findings, path: Path):
    """Left: the relative change of each kind of matrix per block; right: the share of the
    block's entries that moved, beyond the threshold and in bf16."""
    layers = by_layer(findings.changes)
    with two_panel_figure(path, "Which weights moved") as (left, right):
        kinds = sorted({c.name.split(".", 2)[2] for cs in layers.values() for c in cs
                        if "W_" in c.name})
        for kind in kinds:
            left.plot(list(layers), [next((c.relative_change for c in cs
                                           if c.name.endswith(kind)), 0.0)
                                     for cs in layers.values()], marker="o", label=kind)
        left.set(xlabel="block", ylabel="||dW|| / ||W||", title="Relative change per matrix")
        left.legend(fontsize=7)
        for key, label in [("frac_changed", "|dW| > 1e-5"), ("frac_bf16", "changed in bf16")]:
            right.plot(list(layers), [sum(getattr(c, key) * c.n_entries for c in cs) /
                                      sum(c.n_entries for c in cs) for cs in layers.values()],
                       marker="o", label=label)
        right.set(xlabel="block", ylabel="share of entries", ylim=(0, 1.02),
                  title="Share of the block's weights that moved")
        right.legend()


def plot_token_kl(findings: Findings, path: Path, rows: int = 8):
    """Left: KL(trained || reference) per position of a few answers, each token written in its
    cell; right: the mean KL at each position of the answer."""
    kl = findings.tokens.kl[:rows].cpu()
    with warnings.catch_warnings(), two_panel_figure(path, "Which tokens changed",
                                                     figsize=(14.0, 5.0)) as (left, right):
        warnings.filterwarnings("ignore", message="Glyph")  # tokens the font cannot draw
        image = left.imshow(kl.numpy(), aspect="auto", cmap="Reds")
        for i in range(kl.shape[0]):
            for t in range(kl.shape[1]):
                left.text(t, i, findings.answers[i][t][:6], ha="center", va="center", fontsize=6)
        left.figure.colorbar(image, ax=left, label="nats")
        left.set(xlabel="answer position", ylabel="answer", title="KL per token")
        right.plot(findings.tokens.kl.mean(dim=0).cpu().tolist(), marker="o")
        right.set(xlabel="answer position", ylabel="mean KL (nats)", title="KL by position")


def plot_steering(findings: Findings, path: Path):
    """Left: the reward of the steered reference against the scale, per block; right: the size
    of the mean difference per block."""
    with two_panel_figure(path, "Steering the reference with the mean difference") as (left,
                                                                                       right):
        if findings.steering:
            for layer, rewards in zip(findings.layers, findings.steering):
                left.plot([0.0, *findings.scales], [findings.reference_reward, *rewards],
                          marker="o", label=f"block {layer}")
            left.axhline(findings.trained_reward, color="black", linestyle="--",
                         label="trained policy")
            left.legend(fontsize=7)
        left.set(xlabel="scale of the difference", ylabel="mean reward", title="Steered reward")
        right.plot(findings.difference_norms, marker="o")
        right.set(xlabel="block", ylabel="||mean difference||", title="Size of the difference")


def head_grid(attribution: LogitAttribution) -> tuple[list[list[float]], list[float]]:
    """Heads as [layer][head] and the MLPs as [layer], from TransformerLens's labels."""
    values = dict(zip(attribution.labels, attribution.attribution.tolist()))
    heads = [label for label in attribution.labels if label.startswith("L")]
    n_layers = 1 + max(int(label[1:].split("H")[0]) for label in heads)
    n_heads = 1 + max(int(label.split("H")[1]) for label in heads)
    return ([[values[f"L{layer}H{head}"] for head in range(n_heads)] for layer in range(n_layers)],
            [values.get(f"{layer}_mlp_out", 0.0) for layer in range(n_layers)])


def plot_attribution(attribution: dict[str, LogitAttribution], path: Path):
    """Left: each block's MLP and heads (summed), reference and trained; right: trained minus
    reference, per head."""
    import numpy as np

    (ref_heads, ref_mlp), (heads, mlp) = (head_grid(attribution[k]) for k in ("reference",
                                                                            "trained"))
    with two_panel_figure(path, "Direct logit attribution of the reward's tokens") as (left,
                                                                                       right):
        blocks = range(len(mlp))
        for values, label in [(ref_mlp, "MLP, reference"), (mlp, "MLP, trained"),
                              ([sum(h) for h in ref_heads], "heads, reference"),
                              ([sum(h) for h in heads], "heads, trained")]:
            left.plot(blocks, values, marker="o", label=label)
        left.set(xlabel="block", ylabel="logit difference", title="Per block")
        left.legend(fontsize=7)
        change = np.array(heads) - np.array(ref_heads)
        bound = max(abs(change).max(), 1e-9)
        image = right.imshow(change, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
        right.figure.colorbar(image, ax=right)
        right.set(xlabel="head", ylabel="block", title="Per head: trained - reference")


def render_markdown(f: Findings) -> str:
    moved, moved_bf16 = get_moved_shares(f.changes)
    top = sorted(f.changes, key=lambda c: -c.relative_change if c.frac_changed else 0)[:10]
    lines = [f"# What did training change? {f.run}", "",
             f"{f.kind}; reference: `{f.base_model}`. Measured in {f.seconds:.0f} s.", "",
             "## 1. Which weights moved", "",
             f"{moved:.1%} of the parameters moved by more than 1e-5; {moved_bf16:.1%} would "
             "show in a bfloat16 copy.", "", f"![weights]({FIGURES[0]})", "",
             "| weight | ||dW|| / ||W|| | moved | moved (bf16) | rank | effective rank |",
             "|---|---|---|---|---|---|"]
    lines += [f"| `{c.name}` | {c.relative_change:.3g} | {c.frac_changed:.1%} | "
              f"{c.frac_bf16:.1%} | {c.rank} | {c.effective_rank:.1f} |" for c in top]
    if f.lora:
        lines += ["", "LoRA adapters' singular values (largest first):", ""]
        lines += [f"- `{key}`: {', '.join(f'{s:.3g}' for s in values)}"
                  for key, values in f.lora.items()]
    lines += ["", "## 2. Which tokens changed", "",
              f"Mean KL(trained || reference): {f.tokens.kl.mean().item():.4f} nats per token.",
              "", f"![token KL]({FIGURES[1]})", ""]
    lines += token_table(f.token_shifts, "log-prob shift")
    lines += ["", "## 3. What direction was learnt", "",
              "The mean residual difference on neutral text, read with the logit lens:", "",
              "| block | promoted | suppressed |", "|---|---|---|"]
    lines += [f"| {layer} | {' '.join(map(repr, up))} | {' '.join(map(repr, down))} |"
              for layer, (up, down) in enumerate(f.lens)]
    lines += ["", f"![steering]({FIGURES[2]})", "", steering_sentence(f), "",
              "## 4. Where the reward comes from", ""]
    if f.attribution:
        lines += [f"Direct logit attribution of {f.reward_tokens}.", "",
                  f"![attribution]({FIGURES[3]})", ""]
    if f.value_shifts:
        lines += ["The value head: the tokens after which its estimate rose and fell most.", ""]
        lines += token_table(f.value_shifts, "value change")
    return "\n".join(lines + [f"\n> {note}" for note in f.notes]) + "\n"


def token_table(shifts: tuple[list, list], what: str) -> list[str]:
    rows = [f"| {token!r} | {mean:+.3f} | {count} |" for token, mean, count in shifts[0]]
    rows += ["| ... | | |"] + [f"| {token!r} | {mean:+.3f} | {count} |"
                               for token, mean, count in shifts[1]]
    return [f"| token | mean {what} | seen |", "|---|---|---|", *rows]


def steering_sentence(f: Findings) -> str:
    best = f.best_steering()
    if best is None:
        return "Steering not measured (no reward)."
    layer, scale, recovered = best
    return (f"Reward: reference {f.reference_reward:+.3f}, trained {f.trained_reward:+.3f}; the "
            f"reference steered at block {layer} with {scale:g} x the difference reaches "
            f"{max(max(r) for r in f.steering):+.3f}, {recovered:.0%} of the trained gain.")


def print_summary(f: Findings, out: Path, console: Console | None = None):
    console = console or Console()
    moved, moved_bf16 = get_moved_shares(f.changes)
    table = Table("", "", title=f"minirlhf inspect: {f.run} ({f.kind})", show_header=False)
    table.add_row("weights moved", f"{moved:.1%} (> 1e-5), {moved_bf16:.1%} in bf16")
    table.add_row("mean KL per token", f"{f.tokens.kl.mean().item():.4f} nats")
    table.add_row("rose most", " ".join(repr(t) for t, _, _ in f.token_shifts[0][:5]))
    table.add_row("fell most", " ".join(repr(t) for t, _, _ in f.token_shifts[1][:5]))
    table.add_row("lens, last block", " ".join(map(repr, f.lens[-1][0][:5])))
    table.add_row("steering", steering_sentence(f))
    console.print(table)
    for note in f.notes:
        console.print(f"[yellow]{note}", soft_wrap=True)
    console.print(f"Report: {out / 'report.md'} ({f.seconds:.1f} s)", soft_wrap=True)
