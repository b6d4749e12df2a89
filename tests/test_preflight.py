"""A new `minirlhf train` run checks its configuration before writing its folder (issue 29
item 11): one line saying what to change, exit code 2, no folder left behind, no --resume hint.

The oracle is the file system (no folder at --out) and the printed line; the known-wrong
variant is the old order (the checks left to the first rollout), which left run.json and a
traceback behind.
"""

from pathlib import Path

import pytest

from minirlhf import cli
from minirlhf.cli import train as train_command
from minirlhf.runtime import loading

FAST = ["--preset", "tiny-smoke", "--table-every", "0", "--batch-size", "4", "--gen-len", "6",
        "--total-phases", "1"]


def write_bytes(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


CASES = {
    "gen_len past the context": (lambda tmp: ["--gen-len", "500"],
                                 "--gen-len 500 leaves no room"),
    "gen_len + prefix past the context": (lambda tmp: ["--gen-len", "127"],
                                          "--prefix 'This is': The prompt takes"),
    "empty prefix without BOS": (lambda tmp: ["--prefix", "", "--no-prepend-bos"],
                                 "drop --no-prepend-bos"),
    "missing prompt file": (lambda tmp: ["--prompts", str(tmp / "nope.txt")], "no such file"),
    "latin-1 prompt file": (lambda tmp: ["--prompts",
                                         write_bytes(tmp, "p.txt", b"ok\n\xe9t\xe9\n")],
                            "is not UTF-8 text (byte 0xe9 at offset 3)"),
    "binary prompt file": (lambda tmp: ["--prompts", write_bytes(tmp, "p.bin", b"a\x00b\n")],
                           "holds NUL bytes"),
    "broken JSONL": (lambda tmp: ["--prompts", write_bytes(tmp, "p.jsonl",
                                                           b'{"prompt": "a"}\n\n{"prompt": \n')],
                     "p.jsonl:3: invalid JSON"),
    "a prompt too long, named by line": (
        lambda tmp: ["--prompts", write_bytes(tmp, "p.txt", b"short\n\n" + b"word " * 200 + b"\n")],
        "p.txt:3: The prompt takes"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_config_mistake_exits_with_one_line_and_no_folder(tmp_path, capsys, case):
    flags, expected = CASES[case]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as caught:
        cli.main(["train", *FAST, *flags(tmp_path), "--out", str(out)])
    printed = capsys.readouterr()
    assert caught.value.code == 2
    assert expected in printed.err and printed.err.count("\n") == 1, printed.err
    assert printed.err.startswith("minirlhf train: error: ")
    assert "--resume" not in printed.out + printed.err and not out.exists()


def test_the_old_order_left_a_folder_and_a_traceback(tmp_path, monkeypatch):
    """The known-wrong variant: with the checks skipped, the mistake surfaces in the first
    rollout, after run.json was written."""
    monkeypatch.setattr(train_command, "check_before_writing", lambda run, parser: None)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="the model reads at most"):
        cli.main(["train", *FAST, "--gen-len", "127", "--out", str(out)])
    assert (out / "run.json").exists()


def test_a_good_run_loads_its_policy_once(tmp_path, monkeypatch):
    """The check loads the policy and hands it to the trainer: no second load."""
    calls, real_load = [], loading.load_policy

    def counted(*args, **kwargs):
        calls.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loading, "load_policy", counted)
    prompts = write_bytes(tmp_path, "p.jsonl", b'{"prompt": "This is"}\n\n{"prompt": "A"}\n')
    cli.main(["train", *FAST, "--prompts", prompts, "--out", str(tmp_path / "run")])
    assert len(calls) == 1 and (tmp_path / "run" / "checkpoint.pt").exists()
