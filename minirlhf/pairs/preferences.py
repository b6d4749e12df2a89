"""Preference data: (prompt, chosen, rejected) records, their JSONL files, and RLAIF pairs.

The input of the reward model. Each record says that, after `prompt`, the continuation `chosen`
is preferred to `rejected`; the reward model reads `prompt + chosen` and `prompt + rejected`
(concatenated as they are, so a continuation usually starts with a space). An optional `margin`
asks the reward model for a gap of at least that much (Llama 2's margin loss).

With no human labellers and no model hub, `make_preferences` builds such a set by RLAIF (Bai et
al. 2022, "Constitutional AI"; Lee et al. 2023): sample two continuations of a prompt from the
policy, let an AI judge (any reward function, e.g. VADER) score both, and prefer the higher one;
ties are dropped. The JSONL it writes has the same format a file of human labels would have.
"""

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from minirlhf.rewards import RewardFn, get_rewards
from minirlhf.sampling import PLAIN_SAMPLING, SamplingConfig, get_samples


@dataclass(frozen=True)
class Preference:
    """One labelled pair: after `prompt`, `chosen` is preferred to `rejected`."""

    prompt: str
    """The shared beginning (may be "" for whole texts)."""
    chosen: str
    """The preferred continuation."""
    rejected: str
    """The other continuation."""
    margin: float | None = None
    """How much higher the chosen reward should be (None: no margin)."""
    chosen_score: float | None = None
    """The judge's score of prompt + chosen, when an AI judge labelled the pair."""
    rejected_score: float | None = None
    """The judge's score of prompt + rejected."""

    def __post_init__(self):
        for key in _OPTIONAL:
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{key!r} must be a finite number or null, got {value}: a NaN "
                                 "or infinite margin or score would make the loss NaN.")

    @property
    def chosen_text(self) -> str:
        return self.prompt + self.chosen

    @property
    def rejected_text(self) -> str:
        return self.prompt + self.rejected


_REQUIRED = ("prompt", "chosen", "rejected")
_OPTIONAL = ("margin", "chosen_score", "rejected_score")


def parse_preference(record: object, where: str = "record") -> Preference:
    """A `Preference` from one decoded JSON object, with an error naming what is wrong.

    Unknown keys (an id, a labeller's name) are ignored.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        raise ValueError(f"{where}: missing {missing}; every record needs {list(_REQUIRED)} "
                         '(use "prompt": "" for whole texts).')
    for key in _REQUIRED:
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {record[key]!r}.")
    for key in _OPTIONAL:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{where}: {key!r} must be a number or null, got {value!r}.")
    if record["chosen"] == record["rejected"]:
        raise ValueError(f"{where}: chosen and rejected are the same text; nothing to learn.")
    values = {key: record[key] for key in _REQUIRED}
    values |= {key: float(record[key]) for key in _OPTIONAL if record.get(key) is not None}
    try:
        return Preference(**values)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def read_preferences(path: str | Path) -> list[Preference]:
    """Every record of a JSONL file (one JSON object per line; blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No preference file at {path}: make one with "
                                "`make_preferences` and `write_preferences` (on the command "
                                "line: `minirlhf preferences --out FILE.jsonl`).")
    preferences = []
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            where = f"{path}, line {number}"
            line = decode_line(raw, where, first=number == 1)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}): {line[:80]!r}") from None
            preferences.append(parse_preference(record, where))
    if not preferences:
        raise ValueError(f"{path} holds no preference records.")
    return preferences


def decode_line(raw: bytes, where: str, first: bool) -> str:
    """One line of a JSONL file as UTF-8 text (a byte-order mark on the first line is dropped)."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: byte {raw[error.start]:#04x} at column {error.start + 1} is "
                         "not UTF-8; save the file as UTF-8.") from None


def write_preferences(preferences: Iterable[Preference], path: str | Path) -> Path:
    """Write one JSON object per line (fields that are None are left out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for preference in preferences:
            record = {k: v for k, v in dataclasses.asdict(preference).items() if v is not None}
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def split_preferences(
    preferences: list[Preference], heldout_fraction: float, seed: int = 0
) -> tuple[list[Preference], list[Preference]]:
    """A seeded shuffle cut into (train, held-out); each side gets at least one record."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}.")
    if len(preferences) < 2:
        raise ValueError("A held-out split needs at least two preference records.")
    order = torch.randperm(len(preferences), generator=torch.Generator().manual_seed(seed))
    n_heldout = min(len(preferences) - 1, max(1, round(heldout_fraction * len(preferences))))
    shuffled = [preferences[i] for i in order.tolist()]
    return shuffled[n_heldout:], shuffled[:n_heldout]


# ---------------------------------------------------------------- RLAIF: an AI judge labels pairs


def label_pair(
    prompt: str, first: str, second: str, first_score: float, second_score: float,
    min_gap: float = 0.0, margin: bool = False,
) -> Preference | None:
    """The judge's preference between two continuations, or None when they are a tie.

    A pair is a tie when the scores differ by `min_gap` or less (always when they are equal).
    With `margin`, the record asks for a reward gap equal to the judge's score gap.
    """
    gap = abs(first_score - second_score)
    if gap <= min_gap or first == second:
        return None
    if first_score < second_score:
        first, second, first_score, second_score = second, first, second_score, first_score
    return Preference(prompt, first, second, gap if margin else None, first_score, second_score)


def make_preferences(
    policy: HookedTransformer,
    judge: RewardFn,
    prompts: list[str],
    num_pairs: int,
    gen_len: int = 20,
    batch_size: int = 64,
    min_gap: float = 0.0,
    margin: bool = False,
    seed: int = 0,
    max_batches: int | None = None,
    sampling: SamplingConfig = PLAIN_SAMPLING,
    prepend_bos: bool = True,
) -> list[Preference]:
    """RLAIF: sample pairs of continuations from the policy until `num_pairs` are not ties.

    Each batch samples `batch_size` continuations (two per prompt, prompts taken in turn), the
    judge scores every prompt + continuation, and each prompt's two samples form one pair.

    Args:
        judge: scores whole texts (prompt + continuation); higher is preferred.
        min_gap: pairs whose judge scores differ by this much or less are dropped as ties.
        margin: store the score gap as each record's margin.
        max_batches: give up after this many batches (default: 20 times what no ties would need).
        sampling, prepend_bos: how `get_samples` samples the continuations.
    """
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"batch_size must be even (two samples a pair), got {batch_size}.")
    generator = torch.Generator(device=policy.cfg.device).manual_seed(seed)
    max_batches = max_batches or 20 * -(-2 * num_pairs // batch_size)
    preferences: list[Preference] = []
    for batch in range(max_batches):
        pair_prompts = get_pair_prompts(prompts, batch, batch_size // 2)
        rollout = get_samples(policy, [p for p in pair_prompts for _ in (0, 1)], gen_len=gen_len,
                              sampling=sampling, prepend_bos=prepend_bos, generator=generator)
        preferences += judge_pairs(judge, pair_prompts, rollout.texts, min_gap, margin)
        if len(preferences) >= num_pairs:
            return preferences[:num_pairs]
    raise RuntimeError(f"Only {len(preferences)} of {num_pairs} pairs after {max_batches} "
                       f"batches: the judge calls most pairs ties (min_gap={min_gap}).")


def get_pair_prompts(prompts: list[str], batch: int, n_pairs: int) -> list[str]:
    """The prompts of batch number `batch`: the next `n_pairs`, taken in turn (wrapping round)."""
    return [prompts[(batch * n_pairs + i) % len(prompts)] for i in range(n_pairs)]


def judge_pairs(judge: RewardFn, pair_prompts: list[str], texts: list[str], min_gap: float,
                margin: bool) -> list[Preference]:
    """The pairs of a batch that are not ties: prompt i's two samples are texts 2i and 2i + 1
    (prompt + continuation), each scored whole by the judge."""
    scores = get_rewards(judge, texts).tolist()
    pairs = []
    for i, prompt in enumerate(pair_prompts):
        first, second = (texts[2 * i + k][len(prompt) :] for k in (0, 1))
        pair = label_pair(prompt, first, second, scores[2 * i], scores[2 * i + 1], min_gap,
                          margin)
        if pair is not None:
            pairs.append(pair)
    return pairs
