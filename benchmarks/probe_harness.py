"""The harness of `benchmarks/reliability_probes.py`: the real command line in subprocesses, the
outcome of each probe, and the run folders several probes start from.

Every command runs as `python -m minirlhf ...` from the repository root (so this checkout's
package is the one imported) with OMP_NUM_THREADS=1, its output kept in a log file.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1",
       "NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb"}
FAST = ["--preset", "tiny-smoke", "--table-every", "0", "--batch-size", "4", "--gen-len", "6"]
TWO_PHASES = [*FAST, "--total-phases", "2", "--checkpoint-every", "1"]
LONG_TRAIN = [*FAST, "--total-phases", "400", "--checkpoint-every", "1000"]


@dataclass
class Result:
    """What one command did: exit code, output, seconds and peak memory (MB, resident)."""
    command: list[str]
    rc: int
    out: str
    err: str
    seconds: float
    rss_mb: float

    @property
    def text(self) -> str:
        return self.out + self.err

    @property
    def line(self) -> str:
        """The command's last message: the last non-empty line of stderr, else of stdout."""
        for stream in (self.err, self.out):
            lines = [line.strip() for line in stream.splitlines() if line.strip()]
            if lines:
                return lines[-1][:400]
        return "(no output)"

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.text

    def has(self, *needles: str) -> bool:
        return all(needle in " ".join(self.text.split()) for needle in needles)

    def brief(self) -> str:
        return (f"exit {self.rc}, {self.seconds:.0f} s{', TRACEBACK' if self.traceback else ''}:"
                f" {self.line!r}")


class Process:
    """A command started in the background, its output going to log files."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None,
                 cwd: Path = REPO, module: str = "minirlhf"):
        self.command = [sys.executable, "-m", module, *args]
        self.log, self.start = log, time.monotonic()
        self.out_file, self.err_file = open(f"{log}.out", "w"), open(f"{log}.err", "w")
        self.popen = subprocess.Popen(self.command, stdout=self.out_file, stderr=self.err_file,
                                      env={**ENV, **(env or {})}, cwd=cwd)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, number: int):
        if self.alive():
            os.kill(self.pid, number)

    def output(self) -> str:
        return Path(f"{self.log}.out").read_text() + Path(f"{self.log}.err").read_text()

    def wait(self, timeout: float = 600) -> Result:
        """Wait for the command (killed after `timeout` s) and collect what it did."""
        rss = 0.0
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None and time.monotonic() < deadline:
            rss = max(rss, read_rss_mb(self.pid))
            time.sleep(0.05)
        if self.popen.poll() is None:
            kill_tree(self.pid)
            self.popen.wait()
        self.out_file.close()
        self.err_file.close()
        return Result(self.command, self.popen.returncode, Path(f"{self.log}.out").read_text(),
                      Path(f"{self.log}.err").read_text(), time.monotonic() - self.start, rss)


def read_rss_mb(pid: int) -> float:
    """Peak resident memory of `pid` so far (VmHWM), in MB; 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def kill_tree(pid: int):
    """SIGKILL `pid` and its children (torchrun's workers), by pid."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = children.read_text().split() if children.exists() else []
    for child in pids:
        kill_tree(int(child))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Outcome:
    item: str
    what: str
    observed: str
    verdict: str  # PASS, FAIL or NOTE (observed, no expectation in the issue)


@dataclass
class Lab:
    """The temporary folder, the outcomes so far, and shared run folders built once."""
    root: Path
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    built: dict = field(default_factory=dict)
    build_locks: dict = field(default_factory=dict)
    counter: int = 0

    def path(self, name: str) -> Path:
        """A fresh path under the lab's folder."""
        with self.lock:
            self.counter += 1
            return self.root / f"{self.counter:03d}-{name}"

    def start(self, *args: str, env: dict | None = None, cwd: Path = REPO,
              module: str = "minirlhf") -> Process:
        return Process(list(args), self.path("log"), env, cwd, module)

    def cli(self, *args: str, timeout: float = 600, **kwargs) -> Result:
        """Run a command to its end."""
        return self.start(*args, **kwargs).wait(timeout)

    def record(self, item: str, what: str, observed: str, ok: bool | None):
        verdict = "NOTE" if ok is None else ("PASS" if ok else "FAIL")
        with self.lock:
            self.outcomes.append(Outcome(item, what, observed, verdict))
        print(f"[{verdict}] {item}: {what}\n        {observed}", flush=True)

    def once(self, name: str, build) -> Path:
        """The shared folder or file `name`, built by `build(path)` the first time it is asked
        for (under a lock, so parallel probes wait for one build)."""
        with self.lock:
            build_lock = self.build_locks.setdefault(name, threading.Lock())
        with build_lock:
            if name not in self.built:
                path = self.root / f"shared-{name}"
                result = build(path)
                if result is not None and result.rc != 0:
                    raise RuntimeError(f"building {name} failed: {result.brief()}\n"
                                       f"{result.err[-3000:]}")
                self.built[name] = path
            return self.built[name]

    def copy(self, source: Path, name: str) -> Path:
        """A copy of a run folder (without its lock) to probe."""
        target = self.path(name)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("run.lock", "wandb"))
        return target


def notes_file(lab: Lab) -> Path:
    """A user's file that a symbolic link in a run folder will point to."""
    notes = lab.path("notes.txt")
    notes.write_text("my notes: must stay as they are\n")
    return notes


def untouched(notes: Path) -> bool:
    return notes.read_text() == "my notes: must stay as they are\n"


def replace_file(path: Path, data: bytes):
    """Write a file anew (not in place: a copied run may share nothing, but be safe)."""
    tmp = path.with_name(path.name + ".probe")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def edit_json(path: Path, edit):
    data = json.loads(path.read_text())
    edit(data)
    replace_file(path, json.dumps(data, indent=2).encode())


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_times(rows: list[dict]) -> list[dict]:
    """Metric rows without the wall-clock ones (which differ between any two runs)."""
    return [{k: v for k, v in row.items() if "time" not in k} for row in rows]


def wait_for(condition, process: Process, limit_s: float = 300, every_s: float = 0.05) -> bool:
    """Poll `condition()` until it holds (True), the process ends or `limit_s` passes."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if not process.alive():
            return condition()
        time.sleep(every_s)
    return False


def metric_lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except (FileNotFoundError, IsADirectoryError):
        return 0


def write_table(outcomes: list[Outcome], seconds: float, header: str) -> str:
    """The outcome table, sorted by item, as plain text."""
    def key(outcome: Outcome):
        number = "".join(ch for ch in outcome.item if ch.isdigit())
        return int(number or 0), outcome.item
    lines = [header, ""]
    for outcome in sorted(outcomes, key=key):
        lines += [f"[{outcome.verdict}] item {outcome.item}: {outcome.what}",
                  f"    observed: {outcome.observed}", ""]
    counts = {v: sum(o.verdict == v for o in outcomes) for v in ("PASS", "FAIL", "NOTE")}
    lines.append(f"{len(outcomes)} probes: {counts['PASS']} PASS, {counts['FAIL']} FAIL, "
                 f"{counts['NOTE']} NOTE; {seconds:.0f} s wall clock.")
    return "\n".join(lines) + "\n"


# ---- shared inputs: built once, copied by the probes that change them ----

PREFS = ["--base-model", "tiny", "--prompt", "This is", "--num-pairs", "24", "--gen-len", "6",
         "--batch-size", "16", "--judge", "char_count", "--char", "e", "--min-gap", "0.5"]
RM = ["--base-model", "tiny", "--epochs", "1", "--batch-size", "8", "--eval-every", "2",
      "--normalize-samples", "8", "--normalize-prompt", "This is", "--normalize-gen-len", "6"]


def shared_run(lab: Lab) -> Path:
    """A finished 2-phase tiny PPO run with a checkpoint after each phase (latest and prev)."""
    return lab.once("run", lambda path: lab.cli("train", *TWO_PHASES, "--out", str(path)))


def shared_prefs(lab: Lab) -> Path:
    """24 preference pairs sampled from the tiny model, judged by counting 'e'."""
    return lab.once("prefs.jsonl", lambda path: lab.cli("preferences", *PREFS, "--out",
                                                         str(path)))


def shared_reward_model(lab: Lab) -> Path:
    prefs = shared_prefs(lab)
    return lab.once("rm", lambda path: lab.cli("reward-model", "--data", str(prefs), "--out",
                                               str(path), *RM))


def write_demos(path: Path) -> Path:
    """10 SFT demonstrations ({"prompt", "response"})."""
    lines = [{"prompt": f"x={a}", "response": f" {a} {a} {a}"} for a in range(10)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two checkpoint files hold the same tensors, bit for bit (read weights-only)."""
    import torch

    def flat(value, prefix=""):
        if isinstance(value, torch.Tensor):
            yield prefix, value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from flat(item, f"{prefix}/{key}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                yield from flat(item, f"{prefix}/{i}")

    left = dict(flat(torch.load(a, weights_only=True)))
    right = dict(flat(torch.load(b, weights_only=True)))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def rerecord_checkpoint(path: Path):
    """Rewrite `checkpoint.json` to match the bytes now in `path` (what a user copying files
    about, or an attacker, can do: the record is a checksum, not a signature)."""
    import hashlib

    data = path.read_bytes()
    edit_json(path.with_suffix(".json"), lambda record: record.update(
        bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
