"""The command line: `minirlhf train`, `sample`, `eval`, `export`, `inspect`, `preferences`,
`reward-model`, `dpo`, `sft`.

The top layer (also `python -m minirlhf`): it turns a preset plus flags into `RLHFArgs` and a
reward function, runs the trainer with checkpoints, and writes the run's folder:

    run.json         the config (RLHFArgs and the reward), and what each --resume changed
    metrics.jsonl    one line of metrics per phase
    reward_kl.png    mean reward and KL against phase
    checkpoint.pt    the latest checkpoint (`--resume` continues from it), checkpoint.json its
                     size and SHA-256; checkpoint.prev.pt/.json the one before
    run.lock         held while a command writes the folder

The step before PPO: `preferences` writes RLAIF preference pairs (JSONL), `reward-model` trains a
reward model on such a file, and `train --reward-model FOLDER` runs PPO against it. `dpo`
trains the policy on the preference file directly (minirlhf.cli.dpo). `sft` fine-tunes a policy
on demonstrations (minirlhf.cli.sft); a finished SFT run folder is a `--base-model`. `export`
writes a run's trained policy as a Hugging Face model folder (minirlhf.runtime.export);
`inspect` writes a report of what training changed inside the policy (minirlhf.inspection);
`eval` judges a run on held-out prompts: reward, KL to the reference, fluency
(minirlhf.evaluation).
"""

import argparse
import errno
import re
import sys

from minirlhf.cli import dpo, export, inspect, preferences, reward_model, sample, sft, train
from minirlhf.cli import eval as eval_command  # not `eval`: the builtin keeps its name
from minirlhf.cli.checkpoint import CheckpointError
from minirlhf.cli.provenance import ChangedInputError
from minirlhf.cli.run_folder import RunFolderError
from minirlhf.cli.safe_files import UnsafeFileError
from minirlhf.pairs.reward_model import RewardModelError
from minirlhf.runtime import distributed

COMMANDS = {"train": train.cmd_train, "sample": sample.cmd_sample,
            "preferences": preferences.cmd_preferences,
            "reward-model": reward_model.cmd_reward_model, "dpo": dpo.cmd_dpo,
            "export": export.cmd_export, "inspect": inspect.cmd_inspect, "sft": sft.cmd_sft,
            "eval": eval_command.cmd_eval}


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
"""What argparse takes for a negative number, not an option: its own pattern misses scientific
notation, so `--base-lr -1e-3` failed with "expected one argument"."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minirlhf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train.add_train_parser(commands)
    sample.add_sample_parser(commands)
    preferences.add_preferences_parser(commands)
    reward_model.add_reward_model_parser(commands)
    dpo.add_dpo_parser(commands)
    sft.add_sft_parser(commands)
    export.add_export_parser(commands)
    inspect.add_inspect_parser(commands)
    eval_command.add_eval_parser(commands)
    for each in [parser, *commands.choices.values()]:
        each._negative_number_matcher = NEGATIVE_NUMBER
    return parser


def main(argv: list[str] | None = None):
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        COMMANDS[ns.command](ns, parser)
    except (CheckpointError, RunFolderError, UnsafeFileError, RewardModelError,
            ChangedInputError, distributed.WorldSizeError,
            distributed.StalledProcessError) as error:
        parser.exit(1, f"minirlhf {ns.command}: error: {error}\n")
    except OSError as error:  # a read-only or full disk, a missing file: what and where
        parser.exit(1, f"minirlhf {ns.command}: error: {describe_os_error(error)}\n")
    except KeyboardInterrupt:  # before a command's own stop handling (loading a model, ...)
        parser.exit(130, f"minirlhf {ns.command}: interrupted (Ctrl-C).\n")
    finally:
        distributed.shutdown()


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: the file, the system's words, and what to do for the common
    ones (the disk-full save already printed its own line: CheckpointError)."""
    where = f"{error.filename}: " if error.filename else ""
    text = f"{where}{error.strerror or error}"
    hints = {errno.EROFS: "the disk is read-only: pick another --out",
             errno.EACCES: "no permission to write there: pick another --out",
             errno.ENOSPC: "the disk is full: free space or pick another --out",
             errno.ENOENT: "check the path"}
    return f"{text} ({hints[error.errno]})." if error.errno in hints else f"{text}."


if __name__ == "__main__":
    main(sys.argv[1:])
