"""`RLHFTrainer`: the whole PPO loop, composed from the stages of the pipeline.

Each phase: sample from the policy, score the samples, evaluate them under the policy (log-probs,
values) and the reference model, estimate advantages, and store it all in a `ReplayMemory`
(`rollout_phase`); then take PPO steps on shuffled minibatches of it (`learning_phase`). The
reference model is a frozen copy of the policy at the start. docs/trainer.md prints the same loop
as pseudocode, line for line.

Temperature convention ("The N Implementation Details of RLHF with PPO", Huang et al. 2024):
tokens are sampled from softmax(logits / T), so every log-prob in the PPO ratio and both sides of
the KL penalty use logits / T as well (`sampling.apply_temperature`, applied inside the models).
Top-k and top-p truncate sampling only; they are not part of the log-probs.
"""

import random
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from rich.console import Console
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.advantages import (
    compute_advantages,
    compute_critic_free_advantages,
    compute_gae,
    get_zero_std_fraction,
)
from minirlhf.args import RLHFArgs
from minirlhf.kl_control import get_kl_controller
from minirlhf.losses import (
    KL_ESTIMATORS,
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_exact_kl,
    calc_kl_penalty,
    calc_sampled_kl_penalty,
    calc_value_function_loss,
    get_gen_logprobs,
)
from minirlhf.memory import ReplayMemory, ReplayMinibatch
from minirlhf.models import (
    ReferenceModel,
    TransformerWithValueHead,
    Trunk,
    get_trained_state,
    get_trunk,
    load_trained_state,
    prepare_policy,
)
from minirlhf.optim import get_optimizer_and_scheduler
from minirlhf.prompts import get_phase_prompts, load_prompts, resolve_prompt_file, split_prompts
from minirlhf.rewards import RewardFn, get_rewards, normalize_reward
from minirlhf.runtime import distributed, loading
from minirlhf.runtime.device import autocast, pick_device, pick_precision
from minirlhf.sampling import Samples, SamplingConfig, get_samples
from minirlhf.tracking import PhaseLogger


class Evaluation(NamedTuple):
    """The samples seen by the policy and the reference model (rollout, no gradients)."""

    logprobs: Float[Tensor, "batch gen_len"]
    ref_logprobs: Float[Tensor, "batch gen_len"]
    values: Float[Tensor, "batch gen_len"]
    ref_outputs: Float[Tensor, "batch gen_len d_ref"]
    kl: Float[Tensor, "batch gen_len"]
    """The exact KL(policy || reference) at each generated position."""
    entropy: float
    trunk_residual: Float[Tensor, "batch seq d_model"] | None = None
    """The frozen trunk's output at every position (None: no frozen trunk)."""


class Rollout(NamedTuple):
    """What `rollout_phase` returns: the replay memory, the samples and rewards, the metrics."""

    memory: ReplayMemory
    samples: list[str]
    rewards: Float[Tensor, " batch"]
    metrics: dict[str, float]


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def explained_variance(
    values: Float[Tensor, "batch gen_len"], returns: Float[Tensor, "batch gen_len"]
) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect value head, <= 0 a useless one;
    NaN when the returns (almost) do not vary, where the ratio means nothing."""
    var_returns = returns.var(correction=0)
    if var_returns <= 1e-8 * max(1.0, returns.abs().max().item() ** 2):
        return float("nan")
    return (1 - (returns - values).var(correction=0) / var_returns).item()


@contextmanager
def timed(times: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block took to `times[key]`."""
    start = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - start


class RLHFTrainer:
    """PPO on a language model against a reward function.

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
        self.frozen_layers = prepare_policy(base_model, args.trainable_layers, args.lora_rank,
                                            args.lora_alpha, args.lora_targets)
        """Blocks at the bottom that do not train: their output is computed once per phase."""
        self.model = TransformerWithValueHead(base_model, args.temperature, args.fast_path)
        self.model.to(self.device)
        distributed.broadcast_module(self.model)  # every process starts from process 0's weights
        self.reference = ReferenceModel(base_model, args.temperature, args.fast_path,
                                        keep_residual=args.recompute_ref_logits)
        self.sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
        self.optimizer, self.scheduler = get_optimizer_and_scheduler(
            self.model, args.base_lr, args.head_lr, args.warmup_steps, args.total_phases,
            args.final_scale, value_head=not args.critic_free,
        )
        self.kl_controller = get_kl_controller(args.kl_coef, args.kl_target, args.kl_horizon)
        self.sample_generator = torch.Generator(device=self.device).manual_seed(
            distributed.process_seed(args.seed))  # each process its own stream
        self.shuffle_generator = torch.Generator().manual_seed(args.seed + 1)
        self.train_prompts, self.held_out_prompts = [], []
        if args.prompts is not None:
            self.train_prompts, self.held_out_prompts = split_prompts(
                load_prompts(resolve_prompt_file(args.prompts)), args.held_out_fraction, args.seed)
        self.prompt_generator = torch.Generator().manual_seed(args.seed + 2)
        # Held-out samples draw from their own generator, so evaluating changes no training curve.
        self.eval_generator = torch.Generator(device=self.device).manual_seed(args.seed + 3)
        self.phase = 0
        self.global_step = 0
        """Optimiser steps taken so far (a checkpoint is consistent while this does not move)."""
        self.history: list[dict[str, float]] = []
        self.console = (console or Console()) if distributed.is_main() else Console(quiet=True)
        self.table_every = table_every

    # ---- the rollout phase: sample -> score -> evaluate -> advantages -> memory ----

    @torch.no_grad()
    def rollout_phase(self) -> Rollout:
        """Sample from the policy, score and evaluate the samples, estimate advantages."""
        args, times = self.args, {}
        with timed(times, "charts/sample_time"), self.autocast():
            samples = get_samples(self.model.base_model, self.get_phase_prompts(),
                                  self.local_batch_size, args.gen_len, self.sampling,
                                  args.prepend_bos, seed=self.sample_generator,
                                  fast_path=args.fast_path, return_final_residual=True)
        with timed(times, "charts/reward_time"):
            rewards = get_rewards(self.reward_fn, samples.samples, device=self.device)
        with timed(times, "charts/forward_time"):
            evaluation = self.evaluate_samples(samples)
        # Statistics are over the global batch: every process's rows (one process: its own).
        rewards, everyone = distributed.gather_rows(rewards), gather_evaluation(evaluation)
        advantages = self.compute_advantages(everyone, rewards, samples.prefix_len)
        # Critic-free: no value head, so returns = advantages and no value is ever fitted.
        values = torch.zeros_like(advantages) if args.critic_free else everyone.values
        mine = distributed.local_rows(len(rewards))
        memory = ReplayMemory(samples.sample_ids, samples.attention_mask, evaluation.logprobs,
                              advantages[mine], values[mine], evaluation.ref_outputs,
                              evaluation.trunk_residual)
        metrics = {
            "charts/reward_mean": rewards.mean().item(),
            "charts/reward_std": rewards.std(correction=0).item(),
            "charts/kl": everyone.kl.mean().item(),
            **self.get_kl_estimate_metric(everyone),
            "charts/kl_coef": self.kl_controller.value,
            "charts/entropy": everyone.entropy,
            **times,
            "charts/rollout_time": sum(times.values()),
        }
        if args.group_size > 1:
            metrics["charts/frac_reward_zero_std"] = get_zero_std_fraction(rewards, args.group_size)
        if not args.critic_free:
            metrics["losses/explained_variance"] = explained_variance(
                everyone.values, advantages + everyone.values)
        return Rollout(memory, distributed.gather_objects(samples.samples), rewards, metrics)

    def get_kl_estimate_metric(self, evaluation: Evaluation) -> dict[str, float]:
        """The rollout's mean of the sampled KL estimator in use (none for the exact KL)."""
        estimator = self.args.kl_estimator
        if estimator == "exact":
            return {}
        estimates = KL_ESTIMATORS[estimator](evaluation.logprobs, evaluation.ref_logprobs)
        return {f"charts/kl_{estimator}": estimates.mean().item()}

    def get_phase_prompts(self) -> str | list[str]:
        """This process's rows of this phase's prompts: drawn from the training prompts of the
        `args.prompts` file (each repeated group_size times), else the prompts given to the
        trainer. Every process draws the same global list, then keeps its rows."""
        if not self.train_prompts:
            prompts = self.prompts
        else:
            prompts = get_phase_prompts(self.train_prompts, self.args.prompts_per_phase,
                                        self.args.group_size, self.prompt_generator)
        return prompts if isinstance(prompts, str) else prompts[
            distributed.local_rows(len(prompts))]

    @torch.no_grad()
    def evaluate_held_out(self) -> dict[str, float]:
        """The mean reward of one sample of every held-out prompt (the policy as it is now)."""
        args = self.args
        with self.autocast():
            samples = get_samples(self.model.base_model, self.held_out_prompts, None,
                                  args.gen_len, self.sampling, args.prepend_bos,
                                  seed=self.eval_generator, fast_path=args.fast_path)
        rewards = get_rewards(self.reward_fn, samples.samples, device=self.device)
        return {"eval/held_out_reward": rewards.mean().item()}

    @torch.no_grad()
    def evaluate_samples(self, samples: Samples) -> Evaluation:
        """The policy's log-probs and values, what the reference model keeps, and the mean KL
        and entropy: one minibatch of rows at a time, so no batch x gen_len x d_vocab logits
        are held at once. The sampler's final residual stream spares the policy's forward; a
        frozen trunk runs once, for the reference model and every learning step."""
        ids, mask, prefix_len = samples.sample_ids, samples.attention_mask, samples.prefix_len
        parts, trunks = [], []
        chunk = len(ids) // self.args.num_minibatches  # minibatch_size with one process
        for rows in torch.arange(len(ids), device=ids.device).split(chunk):
            residual = None if samples.final_residual is None else samples.final_residual[rows]
            with self.autocast():
                trunk = self.get_trunk(ids[rows], mask[rows])
                logits, values = self.model.evaluate(ids[rows], mask[rows], prefix_len, residual,
                                                     trunk)
                ref_logits, ref_outputs = self.reference.evaluate(ids[rows], mask[rows],
                                                                  prefix_len, trunk)
            trunks.append(None if trunk is None else trunk.residual)
            parts.append(Evaluation(
                get_gen_logprobs(logits, ids[rows, prefix_len:]),
                get_gen_logprobs(ref_logits, ids[rows, prefix_len:]), values, ref_outputs,
                calc_exact_kl(logits, ref_logits), calc_entropy_bonus(logits, ent_coef=1.0).item(),
            ))
        *tensors, entropy, _ = zip(*parts)
        return Evaluation(*(torch.cat(part) for part in tensors), float(np.mean(entropy)),
                          None if trunks[0] is None else torch.cat(trunks))

    def get_trunk(self, ids: Tensor, mask: Tensor) -> Trunk | None:
        """The frozen trunk's output on these samples (None when every block trains)."""
        if not self.frozen_layers:
            return None
        return get_trunk(self.model.base_model, ids, mask, self.frozen_layers, self.args.fast_path)

    def compute_advantages(
        self, evaluation: Evaluation, rewards: Float[Tensor, " batch"], prefix_len: int,
    ) -> Float[Tensor, "batch gen_len"]:
        """The advantages of `args.advantage_estimator`, from the (normalised) rewards."""
        args = self.args
        if args.normalize_reward:
            rewards = normalize_reward(rewards)
        if args.critic_free:
            kl = self.get_kl_per_token(evaluation) if args.kl_in == "reward" else \
                torch.zeros_like(evaluation.logprobs)
            return compute_critic_free_advantages(args.advantage_estimator, rewards, kl,
                                                  args.group_size, self.kl_controller.value,
                                                  args.gamma)
        # The estimators index values by position; only the generated states are read (NaN
        # elsewhere proves it).
        values = F.pad(evaluation.values, (prefix_len - 1, 1), value=float("nan"))
        if args.advantage_estimator == "gae":
            return compute_gae(values, rewards, prefix_len, args.gamma, args.gae_lambda)
        return compute_advantages(values, rewards, prefix_len)

    def get_kl_per_token(self, evaluation: Evaluation) -> Float[Tensor, "batch gen_len"]:
        """The KL of each generated token by `args.kl_estimator` (exact, or sampled)."""
        if self.args.kl_estimator == "exact":
            return evaluation.kl
        return KL_ESTIMATORS[self.args.kl_estimator](evaluation.logprobs, evaluation.ref_logprobs)

    # ---- the learning phase: PPO steps on minibatches of the memory ----

    def compute_rlhf_objective(
        self, mb: ReplayMinibatch
    ) -> tuple[Float[Tensor, ""], dict[str, float]]:
        """The objective to maximise on one minibatch, and diagnostics for logging."""
        args = self.args
        trunk = None if mb.trunk_residual is None else Trunk(self.frozen_layers, mb.trunk_residual)
        with self.autocast():
            logits, values = self.model.evaluate(mb.sample_ids, mb.attention_mask,
                                                 mb.prefix_len, trunk=trunk)
        logprobs = get_gen_logprobs(logits, mb.sample_ids[:, mb.prefix_len :])
        ref_logits = self.reference.get_logits(mb.ref_outputs)

        clipped_surrogate = calc_clipped_surrogate_objective(
            logprobs, mb.logprobs, mb.advantages, args.clip_coef, normalize=not args.critic_free,
            moments=distributed.global_moments(mb.advantages),  # the global minibatch's
        )
        # Critic-free: no value loss (0 leaves the objective exactly as it is).
        value_loss = (torch.zeros(()) if args.critic_free
                      else calc_value_function_loss(values, mb.returns, args.vf_coef))
        entropy_bonus = calc_entropy_bonus(logits, args.ent_coef)
        kl_penalty = self.calc_kl_penalty(logits, ref_logits, logprobs, mb)
        objective = clipped_surrogate - value_loss + entropy_bonus - kl_penalty

        with torch.no_grad():
            log_ratio = logprobs - mb.logprobs
            ratio = log_ratio.exp()
            stats = {
                "losses/clipped_surrogate": clipped_surrogate.item(),
                "losses/value_loss": value_loss.item(),
                "losses/entropy_bonus": entropy_bonus.item(),
                "losses/kl_penalty": kl_penalty.item(),
                "losses/objective": objective.item(),
                # Schulman's low-variance estimator of KL(old || new): (r - 1) - log r.
                "losses/approx_kl": ((ratio - 1) - log_ratio).mean().item(),
                "losses/clip_fraction": ((ratio - 1).abs() > args.clip_coef).float().mean().item(),
            }
            if args.critic_free:
                del stats["losses/value_loss"]
        return objective, stats

    def calc_kl_penalty(
        self, logits: Float[Tensor, "minibatch gen_len d_vocab"],
        ref_logits: Float[Tensor, "minibatch gen_len d_vocab"],
        logprobs: Float[Tensor, "minibatch gen_len"], mb: ReplayMinibatch,
    ) -> Float[Tensor, ""]:
        """The KL term of the objective: exact or sampled (`args.kl_estimator`), times the
        controller's coefficient; 0 when the KL is in the reward instead (`args.kl_in`)."""
        args, kl_coef = self.args, self.kl_controller.value
        if args.kl_in == "reward":
            return torch.zeros((), device=logits.device)
        if args.kl_estimator == "exact":
            return calc_kl_penalty(logits, ref_logits, kl_coef)
        ref_logprobs = get_gen_logprobs(ref_logits, mb.sample_ids[:, mb.prefix_len :])
        return calc_sampled_kl_penalty(logprobs, ref_logprobs, kl_coef, args.kl_estimator)

    def learning_phase(self, memory: ReplayMemory) -> dict[str, float]:
        """PPO steps over shuffled minibatches of the memory; returns the mean diagnostics."""
        args = self.args
        all_stats: list[dict[str, float]] = []
        minibatches = memory.get_minibatches(
            args.num_minibatches, args.batches_per_learning_phase, self.shuffle_generator
        )
        for mb in minibatches:
            self.optimizer.zero_grad()
            objective, stats = self.compute_rlhf_objective(mb)
            check_finite(objective, stats)
            objective.backward()
            distributed.average_gradients(self.model.parameters())  # no-op with one process
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
            stats["losses/grad_norm"] = grad_norm.item()
            self.optimizer.step()
            self.global_step += 1
            all_stats.append(stats)
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
        start, rng_state = time.perf_counter(), self.get_rng_state()
        try:
            rollout = self.rollout_phase()
            last = self.phase == self.args.total_phases - 1
            if self.held_out_prompts and (self.phase % self.args.eval_every == 0 or last):
                rollout.metrics.update(self.evaluate_held_out())
        except BaseException:
            self.set_rng_state(rng_state)
            raise
        learn_start = time.perf_counter()
        metrics = {**rollout.metrics, **self.learning_phase(rollout.memory)}
        metrics["charts/learning_time"] = time.perf_counter() - learn_start
        metrics["charts/phase_time"] = time.perf_counter() - start
        metrics["charts/phase"] = self.phase
        # Ziegler et al.'s KL is the whole continuation's: the per-token mean times gen_len.
        self.kl_controller.update(metrics["charts/kl"] * self.args.gen_len, self.args.batch_size)
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
                logger.log_phase(phase, rollout.metrics, rollout.samples, rollout.rewards.tolist())
                if on_phase_end is not None:
                    on_phase_end(self, rollout)
        finally:
            logger.close()
        return self.history

    # ---- precision, random states and checkpoints ----

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast for forward passes when the precision is "bf16" (else a no-op).
        The models return float32 logits and values, so every loss term is float32."""
        return autocast(self.device, self.precision)

    def get_rng_state(self) -> dict:
        """Every random state the run draws from, so a resumed run continues the same curve."""
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "sample_generator": self.sample_generator.get_state(),
            "shuffle_generator": self.shuffle_generator.get_state(),
            "prompt_generator": self.prompt_generator.get_state(),
            "eval_generator": self.eval_generator.get_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def set_rng_state(self, state: dict):
        """Restore `get_rng_state()`. States are byte tensors that torch wants on the CPU, even
        for a CUDA generator (a checkpoint loaded with map_location="cuda" has them on the GPU).
        A sampler state saved on another kind of device (CUDA vs CPU) cannot be restored: the
        sampler is then reseeded, so the run goes on, but not on the same curve."""
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"].cpu())
        self.shuffle_generator.set_state(state["shuffle_generator"].cpu())
        if "prompt_generator" in state:  # checkpoints from before prompt files have neither
            self.prompt_generator.set_state(state["prompt_generator"].cpu())
            eval_state = state["eval_generator"].cpu()  # on the device, like the sampler's
            if eval_state.numel() == self.eval_generator.get_state().numel():
                self.eval_generator.set_state(eval_state)
        sample_state = state["sample_generator"].cpu()
        if sample_state.numel() == self.sample_generator.get_state().numel():
            self.sample_generator.set_state(sample_state)
        else:
            self.sample_generator.manual_seed(self.args.seed + 1000 * (1 + len(self.history)))
            warnings.warn("The checkpoint's sampler state is from another kind of device: the "
                          "sampler was reseeded, so samples differ from an uninterrupted run.",
                          stacklevel=2)
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([cuda_state.cpu() for cuda_state in state["cuda"]])

    def state_dict(self, rng_state: dict | None = None) -> dict:
        """Policy, value head, optimiser, scheduler, random states (`rng_state`, default: now's;
        with several processes every process's, so every process must call this), phase, the KL
        coefficient, metrics so far and the number of processes."""
        return {
            "model": get_trained_state(self.model),  # frozen weights come from base_model
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": distributed.per_process(rng_state or self.get_rng_state()),
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
        distributed.check_world_size(state.get("world_size", 1))
        load_trained_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.set_rng_state(distributed.own_part(state["rng"]))
        self.phase = state["phase"]
        self.global_step = state.get("global_step", 0)
        if "kl_controller" in state:  # checkpoints from before the adaptive controller have none
            self.kl_controller.load_state_dict(state["kl_controller"])
        self.history = list(state["history"])


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


def gather_evaluation(evaluation: Evaluation) -> Evaluation:
    """The evaluation of the global batch: every process's rows of the per-token tensors and the
    mean entropy over the processes. `ref_outputs` (large, and read only by this process's own
    minibatches, like the frozen trunk's `trunk_residual`) is left out (None). One process:
    `evaluation` itself."""
    if distributed.get_world_size() == 1:
        return evaluation
    rows = {name: distributed.gather_rows(getattr(evaluation, name))
            for name in ["logprobs", "ref_logprobs", "values", "kl"]}
    entropy = distributed.mean_over_processes({"entropy": evaluation.entropy})["entropy"]
    return evaluation._replace(**rows, ref_outputs=None, entropy=entropy, trunk_residual=None)
