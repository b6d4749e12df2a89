"""`RLHFTrainer`: the whole PPO loop, composed from the stages of the pipeline.

Each phase: sample from the policy, score the samples, run them through the policy and the
reference model (log-probs, values, KL), estimate advantages, and store it all in a
`ReplayMemory` (`rollout_phase`); then take PPO steps on shuffled minibatches of it
(`learning_phase`). docs/trainer.md prints the same loop as pseudocode, line for line.

The algorithm's variants are not branches here: the advantage estimator is chosen in
`advantages.compute_advantages` (with `ESTIMATORS` saying whether it needs a value head and
whitened advantages), the KL estimator in `losses.calc_kl`, and how the models run (fast path,
frozen trunk, LoRA, the reference's cached outputs) inside `models`.

Temperature convention ("The N Implementation Details of RLHF with PPO", Huang et al. 2024):
tokens are sampled from softmax(logits / T), so every log-prob in the PPO ratio and both sides of
the KL penalty use logits / T as well (`sampling.apply_temperature`, applied inside the models).
Top-k and top-p truncate sampling only; they are not part of the log-probs.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from rich.console import Console
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.advantages import ESTIMATORS, compute_advantages, whiten
from minirlhf.args import RLHFArgs
from minirlhf.kl_control import get_kl_controller
from minirlhf.losses import (
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl,
    calc_value_function_loss,
    get_gen_logprobs,
)
from minirlhf.memory import ReplayMemory, ReplayMinibatch
from minirlhf.metrics import get_ratio_metrics, get_rollout_metrics
from minirlhf.models import (
    ReferenceModel,
    RolloutOutputs,
    build_policy,
    get_rollout_outputs,
    get_trained_state,
    load_trained_state,
)
from minirlhf.optim import get_optimizer_and_scheduler
from minirlhf.prompts import get_phase_prompts, load_prompts, resolve_prompt_file, split_prompts
from minirlhf.rewards import RewardFn, get_rewards, normalize_reward
from minirlhf.runtime import distributed, loading
from minirlhf.runtime.device import autocast, pick_device, pick_precision
from minirlhf.runtime.random_streams import RandomStreams, set_seed
from minirlhf.sampling import SamplingConfig, get_samples
from minirlhf.tracking import PhaseLogger


class Rollout(NamedTuple):
    """What `rollout_phase` returns: the replay memory, the samples and rewards of the global
    batch, its mean KL and the metrics."""

    memory: ReplayMemory
    texts: list[str]
    rewards: Float[Tensor, " batch"]
    kl: float
    """The mean exact KL(policy || reference) per generated token (the adaptive KL controller's
    input)."""
    metrics: dict[str, float]


class GlobalBatch(NamedTuple):
    """A rollout as batch-wide statistics see it: every data-parallel process's rows (one
    process: its own), and which of them are this process's."""

    texts: list[str]
    rewards: Float[Tensor, " batch"]
    outputs: RolloutOutputs
    """The per-token outputs of every row (`kept`, large and read only by this process's own
    minibatches, stays behind: empty)."""
    local: slice


class KLCoefs(NamedTuple):
    """The KL coefficient where it applies: in the objective, or in the per-token reward."""

    loss: float
    reward: float


@contextmanager
def timed(times: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block took to `times[key]`."""
    start = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - start


class RLHFTrainer:
    """PPO (or a critic-free relative) on a language model against a reward function.

    Args:
        args: the hyperparameters.
        reward_fn: maps the decoded samples (prompt + continuation) to one reward each.
        base_model: the policy to train; None loads `args.base_model`.
        prompts: one prompt per sample (length batch_size), e.g. control-token prompts;
            None draws from the `args.prompts` file if there is one, else repeats `args.prefix`.
        console: where progress and tables go (a quiet `Console(quiet=True)` in tests; in
            data-parallel training only process 0 prints, the others get a quiet one).
        table_every: print a table of samples every this many phases (0: never).
    """

    def __init__(
        self,
        args: RLHFArgs,
        reward_fn: RewardFn,
        base_model: HookedTransformer | None = None,
        prompts: list[str] | None = None,
        console: Console | None = None,
        table_every: int = 1,
    ):
        check_prompts(args, prompts)
        self.args, self.reward_fn = args, reward_fn
        self.prompts = prompts if prompts is not None else args.prefix
        set_seed(args.seed)
        self.device = distributed.setup(pick_device(args.device))  # torchrun: join the others
        self.local_batch_size = get_local_batch_size(args, distributed.get_world_size())
        self.precision = pick_precision(args.precision, self.device)
        if base_model is None:
            base_model = loading.load_policy(args.base_model, self.device)
        base_model = base_model.to(self.device, print_details=False)
        self.model = build_policy(base_model, args).to(self.device)
        distributed.broadcast_module(self.model)  # every process starts from process 0's weights
        self.reference = ReferenceModel.of_policy(self.model, args.recompute_ref_logits)
        self.sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
        self.optimizer, self.scheduler = get_optimizer_and_scheduler(
            self.model, args.base_lr, args.head_lr, args.warmup_steps, args.total_phases,
            args.final_scale,
        )
        self.kl_controller = get_kl_controller(args.kl_coef, args.kl_target, args.kl_horizon)
        self.streams = RandomStreams(args.seed, distributed.process_seed(args.seed), self.device)
        self.train_prompts, self.held_out_prompts = [], []
        if args.prompts is not None:
            self.train_prompts, self.held_out_prompts = split_prompts(
                load_prompts(resolve_prompt_file(args.prompts)), args.held_out_fraction, args.seed)
        self.phase = 0
        self.global_step = 0
        """Optimiser steps taken so far (a checkpoint is consistent while this does not move)."""
        self.history: list[dict[str, float]] = []
        self.console = (console or Console()) if distributed.is_main() else Console(quiet=True)
        self.table_every = table_every

    # ---- the rollout phase: sample -> score -> evaluate -> advantages -> memory ----

    @torch.no_grad()
    def rollout_phase(self) -> Rollout:
        """Sample from the policy, score the samples, run them through the policy and the
        reference, estimate advantages."""
        args, times = self.args, {}
        with timed(times, "charts/sample_time"), self.autocast():
            samples = get_samples(self.model.base_model, self.get_phase_prompts(),
                                  self.local_batch_size, args.gen_len, self.sampling,
                                  args.prepend_bos, generator=self.streams.sample,
                                  fast_path=args.fast_path, return_final_residual=True)
        with timed(times, "charts/reward_time"):
            rewards = get_rewards(self.reward_fn, samples.texts, device=self.device)
        with timed(times, "charts/forward_time"), self.autocast():
            outputs = get_rollout_outputs(self.model, self.reference, samples, args.kl_estimator,
                                          self.local_batch_size // args.num_minibatches)
        batch = gather_global_batch(samples.texts, rewards, outputs)  # every process's rows
        advantages = self.compute_advantages(batch)
        memory = ReplayMemory(samples.sample_ids, samples.attention_mask, outputs.logprobs,
                              advantages[batch.local], outputs.values, outputs.kept)
        metrics = get_rollout_metrics(batch.rewards, batch.outputs, advantages,
                                      args.kl_estimator, args.group_size)
        metrics |= {"charts/kl_coef": self.kl_controller.value, **times,
                    "charts/rollout_time": sum(times.values())}
        return Rollout(memory, batch.texts, batch.rewards, metrics["charts/kl"], metrics)

    def compute_advantages(self, batch: GlobalBatch) -> Float[Tensor, "batch gen_len"]:
        """The advantages of `args.advantage_estimator`, from the batch's (normalised) rewards."""
        args = self.args
        rewards = normalize_reward(batch.rewards) if args.normalize_reward else batch.rewards
        return compute_advantages(args.advantage_estimator, rewards, batch.outputs.values,
                                  batch.outputs.kl, self.get_kl_coefs().reward, args.group_size,
                                  args.gamma, args.gae_lambda)

    def get_kl_coefs(self) -> KLCoefs:
        """The controller's KL coefficient where `args.kl_in` puts it, and 0 in the other place."""
        coef = self.kl_controller.value
        return KLCoefs(coef, 0.0) if self.args.kl_in == "loss" else KLCoefs(0.0, coef)

    def get_phase_prompts(self) -> str | list[str]:
        """This process's rows of this phase's prompts: drawn from the training prompts of the
        `args.prompts` file (each repeated group_size times), else the prompts given to the
        trainer. Every process draws the same global list, then keeps its rows."""
        if not self.train_prompts:
            prompts = self.prompts
        else:
            prompts = get_phase_prompts(self.train_prompts, self.args.prompts_per_phase,
                                        self.args.group_size, self.streams.prompt)
        return prompts if isinstance(prompts, str) else prompts[
            distributed.local_rows(len(prompts))]

    @torch.no_grad()
    def evaluate_held_out(self) -> dict[str, float]:
        """The mean reward of one sample of every held-out prompt (the policy as it is now)."""
        args = self.args
        with self.autocast():
            samples = get_samples(self.model.base_model, self.held_out_prompts, None,
                                  args.gen_len, self.sampling, args.prepend_bos,
                                  generator=self.streams.eval, fast_path=args.fast_path)
        rewards = get_rewards(self.reward_fn, samples.texts, device=self.device)
        return {"eval/held_out_reward": rewards.mean().item()}

    # ---- the learning phase: PPO steps on minibatches of the memory ----

    def compute_rlhf_objective(
        self, mb: ReplayMinibatch
    ) -> tuple[Float[Tensor, ""], dict[str, float]]:
        """The objective to maximise on one minibatch, and its terms for the logs."""
        args, gen_tokens = self.args, mb.sample_ids[:, mb.prefix_len :]
        with self.autocast():
            logits, values = self.model.forward_generated(mb.sample_ids, mb.attention_mask,
                                                          mb.prefix_len, mb.kept)
        logprobs = get_gen_logprobs(logits, gen_tokens)
        ref_logits = self.reference.get_logits(mb.kept)
        kl = calc_kl(args.kl_estimator, logprobs, logits, ref_logits, gen_tokens)
        terms = {
            "losses/clipped_surrogate": calc_clipped_surrogate_objective(
                logprobs, mb.logprobs, mb.advantages, args.clip_coef),
            "losses/entropy_bonus": calc_entropy_bonus(logits, args.ent_coef),
            "losses/kl_penalty": self.get_kl_coefs().loss * kl.mean(),
        }
        if values is not None:  # a critic-free policy has no value head, so no value term
            terms["losses/value_loss"] = calc_value_function_loss(values, mb.returns,
                                                                  args.vf_coef)
        objective = (terms["losses/clipped_surrogate"] - terms.get("losses/value_loss", 0.0)
                     + terms["losses/entropy_bonus"] - terms["losses/kl_penalty"])
        stats = {key: term.item() for key, term in terms.items()}
        return objective, {**stats, "losses/objective": objective.item(),
                           **get_ratio_metrics(logprobs, mb.logprobs, args.clip_coef)}

    def learning_phase(self, memory: ReplayMemory) -> dict[str, float]:
        """PPO steps over shuffled minibatches of the memory; returns the mean diagnostics."""
        args, all_stats = self.args, []
        whitened = ESTIMATORS[args.advantage_estimator].whitened
        for mb in memory.get_minibatches(args.num_minibatches, args.batches_per_learning_phase,
                                         self.streams.shuffle):
            if whitened:  # over the global minibatch under torchrun
                mb.advantages = whiten(mb.advantages, distributed.global_moments(mb.advantages))
            self.optimizer.zero_grad()
            objective, stats = self.compute_rlhf_objective(mb)
            check_finite(objective, stats)
            objective.backward()
            distributed.average_gradients(self.model.parameters())  # no-op with one process
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
            self.optimizer.step()
            self.global_step += 1
            all_stats.append({**stats, "losses/grad_norm": grad_norm.item()})
        lrs = dict(zip(["charts/lr_base", "charts/lr_head"],
                       [group["lr"] for group in self.optimizer.param_groups]))  # no head: one
        self.scheduler.step()
        means = {key: float(np.mean([s[key] for s in all_stats])) for key in all_stats[0]}
        return {**distributed.mean_over_processes(means), **lrs}

    # ---- the loop ----

    def train_one_phase(self) -> Rollout:
        """One rollout phase and one learning phase. Returns the rollout, its metrics completed
        with the learning phase's (also appended to `history`). If the rollout fails (a reward
        function raising, say), the random states are put back, so calling again repeats it."""
        start, random_state = time.perf_counter(), self.streams.state_dict()
        try:
            rollout = self.rollout_phase()
            last = self.phase == self.args.total_phases - 1
            if self.held_out_prompts and (self.phase % self.args.eval_every == 0 or last):
                rollout.metrics.update(self.evaluate_held_out())
        except BaseException:
            self.streams.load_state_dict(random_state)
            raise
        learn_start = time.perf_counter()
        metrics = {**rollout.metrics, **self.learning_phase(rollout.memory)}
        metrics["charts/learning_time"] = time.perf_counter() - learn_start
        metrics["charts/phase_time"] = time.perf_counter() - start
        metrics["charts/phase"] = self.phase
        # Ziegler et al.'s KL is the whole continuation's: the per-token mean times gen_len.
        self.kl_controller.update(rollout.kl * self.args.gen_len, self.args.batch_size)
        self.history.append(metrics)
        self.phase += 1
        return rollout._replace(metrics=metrics)

    def train(
        self,
        on_phase_end: Callable[["RLHFTrainer", Rollout], None] | None = None,
        wandb_kwargs: dict | None = None,
    ) -> list[dict[str, float]]:
        """Run phases until `args.total_phases` (continuing from `self.phase` after a resume).

        Args:
            on_phase_end: called after every phase with the trainer and the phase's `Rollout`
                (its samples, rewards and complete metrics).
            wandb_kwargs: extra arguments for `wandb.init` (e.g. mode, dir) when args.use_wandb.
        """
        args = self.args
        wandb_config = None
        if args.use_wandb and distributed.is_main():
            wandb_config = {"project": args.wandb_project_name, "entity": args.wandb_entity,
                            "config": args.to_dict(), **(wandb_kwargs or {})}
        logger = PhaseLogger(args.total_phases, self.table_every, wandb_config, self.console)
        logger.start(completed=self.phase)
        try:
            while self.phase < args.total_phases:
                phase = self.phase
                rollout = self.train_one_phase()
                logger.log_phase(phase, rollout.metrics, rollout.texts, rollout.rewards.tolist())
                if on_phase_end is not None:
                    on_phase_end(self, rollout)
        finally:
            logger.close()
        return self.history

    # ---- precision and checkpoints ----

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast for forward passes when the precision is "bf16" (else a no-op).
        The models return float32 logits and values, so every loss term is float32."""
        return autocast(self.device, self.precision)

    def state_dict(self, random_state: dict | None = None) -> dict:
        """Policy (and value head, if any), optimiser, scheduler, random states (`random_state`,
        default: now's; with several processes every process's, so every process must call
        this), phase, the KL coefficient, metrics so far and the number of processes."""
        return {
            "model": get_trained_state(self.model),  # frozen weights come from base_model
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": distributed.per_process(random_state or self.streams.state_dict()),
            "world_size": distributed.get_world_size(),
            "phase": self.phase,
            "global_step": self.global_step,
            "kl_controller": self.kl_controller.state_dict(),
            "history": self.history,
            "args": self.args.to_dict(),
        }

    def load_state_dict(self, state: dict):
        """Continue from `state_dict()`. The reference model is not in it: it is the base model
        as loaded at the start, so load the trainer from the same `args.base_model`. A state
        saved by another number of processes is refused (`distributed.WorldSizeError`)."""
        distributed.check_world_size(state["world_size"])
        load_trained_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.streams.load_state_dict(distributed.own_part(state["rng"]))
        self.phase = state["phase"]
        self.global_step = state["global_step"]
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.history = list(state["history"])


def gather_global_batch(
    texts: list[str], rewards: Float[Tensor, " batch"], outputs: RolloutOutputs
) -> GlobalBatch:
    """Every process's texts, rewards and per-token outputs, in process order (one process:
    its own, as they are); never logits."""
    rows = {name: None if value is None else distributed.gather_rows(value)
            for name, value in outputs._asdict().items() if name != "kept"}
    rewards = distributed.gather_rows(rewards)
    return GlobalBatch(distributed.gather_objects(texts), rewards,
                       RolloutOutputs(**rows, kept={}), distributed.local_rows(len(rewards)))


def check_finite(objective: Float[Tensor, ""], stats: dict[str, float]):
    """Stop before a non-finite objective reaches the weights, naming the term that broke."""
    if torch.isfinite(objective):
        return
    broken = [key for key, value in stats.items() if not np.isfinite(value)]
    raise FloatingPointError(
        f"The objective is {objective.item()} ({', '.join(broken)} not finite), so this step "
        "would put NaN into the weights. Usual causes: rewards far from order 1 without "
        "normalize_reward, or a learning rate too high for this model."
    )


def check_prompts(args: RLHFArgs, prompts: list[str] | None):
    """Prompts given to the trainer: one per sample, and not as well as a prompt file."""
    if prompts is not None and len(prompts) != args.batch_size:
        raise ValueError(f"Got {len(prompts)} prompts for batch_size {args.batch_size}.")
    if prompts is not None and args.prompts is not None:
        raise ValueError("RLHFTrainer got prompts= and a prompt file (--prompts): give one.")


def get_local_batch_size(args: RLHFArgs, world_size: int) -> int:
    """This process's share of the batch, batch_size / world_size, after checking that every
    process gets whole minibatches and whole groups of samples."""
    if args.batch_size % (world_size * args.num_minibatches):
        raise ValueError(
            f"batch_size ({args.batch_size}) must be divisible by the number of processes "
            f"({world_size}) times num_minibatches ({args.num_minibatches}), so every process "
            "holds an equal share of every minibatch.")
    if (args.batch_size // world_size) % args.group_size:
        raise ValueError(
            f"Each of the {world_size} processes samples batch_size / {world_size} = "
            f"{args.batch_size // world_size} rows, which must be whole groups of group_size "
            f"({args.group_size}): a prompt's samples stay in one process.")
    return args.batch_size // world_size
