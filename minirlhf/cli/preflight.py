"""Checks of a new `minirlhf train` run before its folder is written (issue 29 item 11).

A mistake in the configuration (a gen_len past the model's context, an empty prompt with no BOS,
a prompt file that does not load or holds a prompt too long to continue) used to surface at the
first rollout, after run.json was written, with a traceback and a folder to clean up. Here the
policy is loaded once (the trainer is handed it) and every prompt the run could sample from is
rendered and tokenized as the sampler will, so each mistake is one line naming the prompt.
"""

from pathlib import Path

from transformer_lens import HookedTransformer

from minirlhf.args import RLHFArgs
from minirlhf.cli.presets import make_prompt_split, make_prompts
from minirlhf.pairs.reward_model import RewardModelError, load_reward_model
from minirlhf.prompts import Prompt, load_prompts, render_prompt, resolve_prompt_file
from minirlhf.runtime import loading
from minirlhf.runtime.device import pick_device
from minirlhf.runtime.random_streams import set_seed
from minirlhf.runtime.tokens import get_token_rows
from minirlhf.sampling import check_context
from minirlhf.tasks import SPLITS


class ConfigError(Exception):
    """A new run's configuration that cannot run; the message says what to change."""


def check_new_run(run: dict) -> HookedTransformer:
    """Load the run's policy and check every prompt against it; returns the policy.

    Raises:
        ConfigError: the prompt file does not load, the model does not, or a prompt does not
            fit (naming the file and line, or the --prefix).
    """
    args = RLHFArgs.from_dict(run["args"])
    split = make_prompt_split(run["reward"])
    if args.prompts is not None:
        prompts = load_prompt_lines(args.prompts)
    elif split is not None:
        prompts = [(f"--task {run['reward']['task']} ({name} prompt {index})", record)
                   for name, records in zip(SPLITS, split) for index, record in enumerate(records)]
    else:
        prompts = [(f"--prefix {text!r}", {"prompt": text})
                   for text in dict.fromkeys(make_prompts(run["reward"], args) or [args.prefix])]
    set_seed(args.seed)  # a random model (tiny) gets the weights a resumed run rebuilds
    try:
        policy = loading.load_policy(args.base_model, pick_device(args.device))
    except (ValueError, OSError) as error:
        raise ConfigError(f"--base-model {args.base_model}: {error}") from None
    if args.gen_len >= policy.cfg.n_ctx:
        raise ConfigError(f"--gen-len {args.gen_len} leaves no room for a prompt in the model's "
                          f"context of {policy.cfg.n_ctx} tokens: use a smaller --gen-len.")
    for where, record in prompts:
        check_prompt(policy, where, record, args)
    check_reward_model(run["reward"])
    return policy


def check_reward_model(reward: dict):
    """A `--reward-model` folder that fails its record or its weights, refused before the run
    folder is written (loaded once here on the CPU, and again by the trainer).

    Raises:
        ConfigError: naming the file and what is wrong with it.
    """
    if reward.get("kind") != "reward_model":
        return
    try:
        load_reward_model(reward["path"], "cpu")
    except (RewardModelError, OSError) as error:
        raise ConfigError(f"--reward-model {reward['path']}: {error}") from None


def load_prompt_lines(name: str) -> list[tuple[str, Prompt]]:
    """The records of a prompt file, each with its "file:line"."""
    path = resolve_prompt_file(name)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
        records = load_prompts(path)
    except FileNotFoundError:
        raise ConfigError(f"--prompts {path}: no such file.") from None
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        raise ConfigError(f"--prompts {path} is not UTF-8 text (byte {byte:#04x} at offset "
                          f"{error.start}): save it as UTF-8.") from None
    except OSError as error:
        raise ConfigError(f"--prompts {path}: {error.strerror}.") from None
    except ValueError as error:  # load_prompts names the file and line
        raise ConfigError(f"--prompts: {error}") from None
    if "\x00" in text:
        raise ConfigError(f"--prompts {path} holds NUL bytes: it is not a text file of prompts.")
    numbers = [number for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return [(f"{path}:{number}", record) for number, record in zip(numbers, records, strict=True)]


def check_prompt(policy: HookedTransformer, where: str, record: Prompt, args: RLHFArgs):
    """Render and tokenize one prompt as the sampler does; refuse it if it is empty or its
    tokens plus gen_len do not fit the model's context."""
    try:
        text = render_prompt(record, args.prompt_template, args.chat_template, policy.tokenizer)
        tokens = get_token_rows(policy.tokenizer, [text], args.prepend_bos, None)[0]
        check_context(len(tokens), args.gen_len, policy.cfg.n_ctx)
    except ValueError as error:
        if not args.prepend_bos and "empty" in str(error):
            raise ConfigError(f"{where}: the prompt is empty and --no-prepend-bos puts nothing "
                              "before it, so there is no token to continue: give a prompt, or "
                              "drop --no-prepend-bos.") from None
        raise ConfigError(f"{where}: {error}") from None
