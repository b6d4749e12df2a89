"""`--resume`: which flags a resumed run may change, and the trainer loaded from its checkpoint.

Part of the run folder's machinery (`cli.run_folder`), used by `minirlhf train`. A resumed run
keeps its saved configuration except where a change is safe (`RESUMABLE`: how long it runs,
where it logs, how it computes): `resume_changes` sorts the flags typed with `--resume` into
those applied and those refused, `resumed_config` applies them or names every refused one, and
`resume_trainer` loads the checkpoint and records the changes in run.json.
"""

import json
from pathlib import Path

from rich.console import Console

from minirlhf.args import RLHFArgs
from minirlhf.cli.checkpoint import has_checkpoint, load_checkpoint
from minirlhf.cli.report import write_metrics
from minirlhf.cli.run_folder import RunFolderError, write_json
from minirlhf.optim import get_lr_scale
from minirlhf.runtime import distributed

# RLHFArgs fields a resumed run may change: how long it runs, where it logs, how it computes.
# Every other field would make the phases before and after the resume different experiments.
RESUMABLE = ("total_phases", "use_wandb", "wandb_project_name", "wandb_entity", "precision",
             "fast_path", "recompute_ref_logits", "activation_checkpointing",
             "return_freed_memory", "keep_freed_memory")


def resume_changes(run: dict, given: dict[str, object]) -> tuple[dict, list[str]]:
    """Sort the flags given with `--resume` against the run's saved configuration.

    Args:
        run: the run.json of the run: "preset", "args" (RLHFArgs values), "reward" (its spec).
        given: dest -> value of every RLHFArgs, preset or reward flag typed on the command line
            (`reward_model` as a resolved path, as run.json stores it).

    Returns:
        the changes to apply (field -> (saved, new)), and one line for each refused flag.
    """
    changes, refused = {}, []
    for name, value in given.items():
        saved = saved_value(run, name)
        if value == saved:
            continue
        if name in RESUMABLE:
            changes[name] = (saved, value)
        else:
            refused.append(f"--{name.replace('_', '-')} {value} (the run has {saved})")
    return changes, refused


def saved_value(run: dict, name: str):
    """What run.json holds for the flag `name`."""
    if name in run["args"]:
        return run["args"][name]
    saved = {"preset": run["preset"], "reward": run["reward"]["kind"],
             "reward_model": run["reward"].get("path")}
    return saved[name] if name in saved else run["reward"].get(name)


def resumed_config(run: dict, given: dict[str, object]) -> tuple[dict, dict]:
    """The saved run.json with the flags a resumed run may change applied, and those changes.

    Raises:
        RunFolderError: naming every flag that would change the run's configuration, or the
            value a changed field may not take.
    """
    changes, refused = resume_changes(run, given)
    if refused:
        raise RunFolderError(refused_message(refused))
    try:
        args = RLHFArgs.from_dict({**run["args"], **{k: new for k, (_, new) in changes.items()}})
    except ValueError as error:
        raise RunFolderError(f"--resume: {error}") from None
    return {**run, "args": args.to_dict()}, changes


def refused_message(refused: list[str]) -> str:
    allowed = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE)
    return ("--resume continues a run with its saved configuration; these flags would change "
            f"it: {'; '.join(refused)}. Drop them, or start a new run with another --out. "
            f"Flags a resumed run may change: {allowed}, --checkpoint-every, --table-every, "
            "--wandb-mode.")


def check_run_json(run: dict, saved_args: dict, saved_reward: dict | None):
    """Refuse a run.json edited by hand since the checkpoint: every field a resume may not
    change (all but `RESUMABLE`) must equal the args saved in the checkpoint, and the reward its
    spec saved beside them.

    Raises:
        RunFolderError: naming each edited field with both values.
    """
    plain = json.loads(json.dumps({"args": saved_args, "reward": saved_reward}))
    edited = [f"{name} is {plain['args'].get(name)!r} in the checkpoint, {value!r} in run.json"
              for name, value in json.loads(json.dumps(run["args"])).items()
              if name not in RESUMABLE and plain["args"].get(name) != value]
    if saved_reward is not None and plain["reward"] != run["reward"]:
        edited.append(f"reward is {plain['reward']} in the checkpoint, {run['reward']} in run.json")
    if edited:
        raise RunFolderError(f"run.json was edited since the last checkpoint ({'; '.join(edited)})"
                             ": put those values back (flags a resume may change are given on "
                             "the command line), or start a new run with another --out.")


def describe_lr_change(args, old_total: int, phase: int) -> str:
    """What stretching the learning-rate schedule to a new total_phases does at `phase`."""
    old = get_lr_scale(phase, args.warmup_steps, old_total, args.final_scale)
    new = get_lr_scale(phase, args.warmup_steps, args.total_phases, args.final_scale)
    return (f"The LR schedule now decays to final_scale over {args.total_phases} phases "
            f"instead of {old_total}: from phase {phase} its multiplier is {new:.3g} "
            f"(it would have been {old:.3g}).")


def resume_trainer(trainer, out: Path, run: dict, changes: dict,
                   console: Console) -> tuple[dict, int | None]:
    """Load the run's checkpoint into the trainer (none yet: it starts again from phase 0),
    rewrite metrics.jsonl to match, and record the changes in run.json.

    Returns:
        the `extra` saved beside the trainer state, and the phase loaded (None: none was).
    """
    extra, saved_phase = {}, None
    if has_checkpoint(out):
        checkpoint = load_checkpoint(out, map_location=trainer.device,
                                     set_aside_damaged=distributed.is_main())
        if checkpoint.note:
            console.print(f"[yellow]{checkpoint.note}", soft_wrap=True)
        check_run_json(run, checkpoint.trainer["args"], checkpoint.extra.get("reward"))
        trainer.load_state_dict(checkpoint.trainer)
        extra, saved_phase = checkpoint.extra, trainer.phase
    else:
        console.print("[yellow]No checkpoint yet: the run starts again from phase 0 with its "
                      "saved config (the same seed gives the same curve).")
    if trainer.phase > trainer.args.total_phases:
        raise RunFolderError(f"--total-phases {trainer.args.total_phases} is below the "
                             f"{trainer.phase} phases this run has done: give at least that.")
    if not distributed.is_main():  # process 0 alone writes the folder
        return extra, saved_phase
    # Phases after the checkpoint are re-run, so their old metric lines go.
    write_metrics(out / "metrics.jsonl", trainer.history)
    console.print(f"Resumed at phase {trainer.phase} of {trainer.args.total_phases}.")
    for name, (saved, new) in changes.items():
        console.print(f"[yellow]--resume applies {name}: {saved} -> {new}.", soft_wrap=True)
    if "total_phases" in changes:
        console.print(describe_lr_change(trainer.args, changes["total_phases"][0],
                                         trainer.phase + 1), soft_wrap=True)
    if changes:
        resumes = run.get("resumes", []) + [{"phase": trainer.phase, "changed": changes}]
        write_json(out / "run.json", {**run, "resumes": resumes})
    return extra, saved_phase
