"""The command line: `minirlhf train`, `sample`, `export`, `preferences`, `reward-model`, `dpo`.

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
trains the policy on the preference file directly (minirlhf.cli.dpo). `export` writes a run's
trained policy as a Hugging Face model folder (minirlhf.runtime.export).
"""

import argparse
import sys

from minirlhf.cli import dpo, export, preferences, reward_model, sample, train
from minirlhf.cli.checkpoint import CheckpointError
from minirlhf.cli.provenance import ChangedInputError
from minirlhf.cli.run_folder import RunFolderError
from minirlhf.cli.safe_files import UnsafeFileError
from minirlhf.pairs.reward_model import RewardModelError
from minirlhf.runtime import distributed

COMMANDS = {"train": train.cmd_train, "sample": sample.cmd_sample,
            "preferences": preferences.cmd_preferences,
            "reward-model": reward_model.cmd_reward_model, "dpo": dpo.cmd_dpo,
            "export": export.cmd_export}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minirlhf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train.add_train_parser(commands)
    sample.add_sample_parser(commands)
    preferences.add_preferences_parser(commands)
    reward_model.add_reward_model_parser(commands)
    dpo.add_dpo_parser(commands)
    export.add_export_parser(commands)
    return parser


def main(argv: list[str] | None = None):
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        COMMANDS[ns.command](ns, parser)
    except (CheckpointError, RunFolderError, UnsafeFileError, RewardModelError,
            ChangedInputError, distributed.WorldSizeError) as error:
        parser.exit(1, f"minirlhf {ns.command}: error: {error}\n")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
