"""What a run was built from: its inputs, by SHA-256, in run.json, checked when it is used again.

Part of the run folder's machinery (`cli.run_folder`). A run's checkpoint holds only what
trained; the rest comes from files read again on `--resume`, `sample` and `export`: the base
model's folder (frozen weights, LoRA's base, the reference), the reward model, the prompt file.
A file changed in between would silently make another experiment (two exports of one run that
differ, a resume against a new reference), so `get_inputs` hashes them when the run starts and
`check_inputs` refuses a mismatch by name, unless told to accept it (`--accept-changed-inputs`).
"""

import hashlib
from pathlib import Path

from rich.console import Console

from minirlhf.prompts import resolve_prompt_file
from minirlhf.runtime import policy_folder
from minirlhf.runtime.hashing import update_with_file

ACCEPT_FLAG = "--accept-changed-inputs"


class ChangedInputError(Exception):
    """An input of a run that differs from the one it recorded; the message names it."""


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, or of a folder's files (names and contents, sorted); "missing"."""
    digest = hashlib.sha256()
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
            update_with_file(digest, file)
    except OSError:
        return "missing"
    return digest.hexdigest()


def get_inputs(run: dict) -> dict[str, str]:
    """name -> SHA-256 of each file a run reads besides its checkpoint (named models such as
    "tiny" or "smollm2" are code or a package's file, so only a folder is hashed)."""
    args, inputs = run["args"], {}
    base = Path(str(args["base_model"])).expanduser()
    if policy_folder.is_run_folder(base):  # an SFT run: its policy, not its checkpoints
        inputs["base_model"] = sha256_of(base / policy_folder.POLICY_NAME)
    elif base.is_dir():
        inputs["base_model"] = sha256_of(base)
    if run["reward"].get("kind") == "reward_model":
        inputs["reward_model"] = sha256_of(Path(run["reward"]["path"]) / "reward_model.pt")
    if args.get("prompts"):
        inputs["prompts"] = sha256_of(resolve_prompt_file(args["prompts"]))
    return inputs


def check_inputs(run: dict, accept: bool, console: Console | None = None):
    """Compare the run's inputs now with those run.json recorded.

    Raises:
        ChangedInputError: naming each changed input, unless `accept` (then a warning).
    """
    saved, now = run.get("inputs", {}), get_inputs(run)
    where = {"base_model": f"the base model folder {run['args']['base_model']}",
             "reward_model": f"the reward model {run['reward'].get('path')}",
             "prompts": f"the prompt file {run['args'].get('prompts')}"}
    changed = [where[name] + (" (now missing)" if now.get(name) == "missing" else "")
               for name in sorted(set(saved) | set(now)) if saved.get(name) != now.get(name)]
    if not changed:
        return
    message = (f"{'; '.join(changed)} changed since the run recorded it in run.json: its "
               "weights, rewards or prompts would not be those the run was trained with.")
    if accept:
        (console or Console(stderr=True)).print(f"[yellow]{ACCEPT_FLAG}: {message}",
                                                soft_wrap=True)
        return
    raise ChangedInputError(f"{message} Put it back, or add {ACCEPT_FLAG} to use it as it is.")


def add_accept_flag(parser):
    parser.add_argument(ACCEPT_FLAG, action="store_true", dest="accept_changed_inputs",
                        help="use the run's base model, reward model or prompt file even if it "
                        "changed since the run recorded its SHA-256 (a warning is printed)")
