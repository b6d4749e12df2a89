"""`RLHFTrainer`: the whole PPO loop, composed from the stages of the pipeline.

Each phase: sample, score, run the samples through the policy and the reference model, estimate
advantages, store it all in a `ReplayMemory` (`rollout_phase`); then PPO steps on shuffled
minibatches of it (`learning_phase`), as docs/trainer.md's pseudocode. The variants are not
branches here: the estimator is chosen in `advantages.compute_advantages`, the KL estimator in
`losses.calc_kl`, how the models run (fast path, frozen trunk, LoRA) inside `models`.
"""

import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float, Int
from rich.console import Console
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.advantages import ESTIMATORS, compute_advantages, whiten
from minirlhf.answers import apply_answer_options
from minirlhf.args import RLHFArgs
from minirlhf.kl_control import get_kl_coefs, get_kl_controller
from minirlhf.losses import (
    aggregate,
    calc_clipped_surrogate_objective,
    calc_value_function_loss,
    check_finite,
)
from minirlhf.memory import ReplayMemory, ReplayMinibatch
from minirlhf.metrics import get_ratio_metrics, get_rollout_metrics
from minirlhf.models import (
    GlobalBatch,
    ReferenceModel,
    build_policy,
    gather_rollout,
    get_rollout_outputs,
)
from minirlhf.optim import get_optimizer_and_scheduler
from minirlhf.pass_at_k import get_pass_metrics
from minirlhf.policy_outputs import get_policy_outputs
from minirlhf.prompts import (
    Prompt,
    check_prompts,
    get_phase_prompts,
    load_prompt_split,
    render_prompts,
)
from minirlhf.rewards import RewardFn, get_rewards, normalize_reward
from minirlhf.runtime import allocator, distributed, loading
from minirlhf.runtime.device import autocast, pick_device, pick_precision
from minirlhf.runtime.random_streams import RandomStreams, set_seed
from minirlhf.runtime.trained_state import get_trained_state, load_trained_state
from minirlhf.sampling import Samples, SamplingConfig, get_samples
from minirlhf.tracking import PhaseLogger, get_wandb_config, timed


class Rollout(NamedTuple):
    """What `rollout_phase` returns, for the global batch."""

    memory: ReplayMemory
    texts: list[str]
    rewards: Float[Tensor, " batch"]
    kl: float  # the mean exact KL per answer (summed over its tokens): the KL controller's input
    metrics: dict[str, float]


class RLHFTrainer:
    """PPO (or a critic-free relative) on a language model against a reward function.

    Args:
        reward_fn: one reward per sample (`rewards.get_rewards` says what it may ask for).
        base_model: the policy to train; None loads `args.base_model`.
        prompts: one prompt per sample, e.g. control-token prompts; None draws from the
            `args.prompts` file if there is one, else repeats `args.prefix`.
        prompt_split: the training and held-out prompt records (a task's, `minirlhf.tasks`),
            instead of splitting the `args.prompts` file.
        console, table_every: where progress goes (process 0's), a sample table every N phases.
    """

    def __init__(
        self,
        args: RLHFArgs,
        reward_fn: RewardFn,
        base_model: HookedTransformer | None = None,
        prompts: list[str] | None = None,
        console: Console | None = None,
        table_every: int = 1,
        prompt_split: tuple[list[Prompt], list[Prompt]] | None = None,
    ):
        check_prompts(prompts, args.batch_size, args.prompts)
        self.args, self.reward_fn = args, reward_fn
        self.prompts = [{"prompt": p} for p in prompts or [args.prefix] * args.batch_size]
        set_seed(args.seed)
        self.device = distributed.setup(pick_device(args.device))  # torchrun: join the others
        self.local_batch_size = distributed.get_local_batch_size(
            args.batch_size, args.num_minibatches, args.group_size, distributed.get_world_size())
        self.precision = pick_precision(args.precision, self.device)
        # Before any weights are loaded: return freed memory (lean), keep it (fast), or neither.
        allocator.set_freed_memory(args.return_freed_memory, args.keep_freed_memory)
        base_model = (loading.load_policy(args.base_model, self.device) if base_model is None
                      else base_model.to(self.device, print_details=False))
        set_seed(args.seed)  # what trains starts the same however the policy was loaded
        self.model = build_policy(base_model, args).to(self.device)
        distributed.broadcast_module(self.model)  # every process starts from process 0's weights
        self.reference = ReferenceModel.of_policy(self.model, args.recompute_ref_logits)
        self.sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
        self.optimizer, self.scheduler = get_optimizer_and_scheduler(
            self.model, args.base_lr, args.head_lr, args.warmup_steps, args.total_phases,
            args.final_scale)
        self.kl_controller = get_kl_controller(args.kl_coef, args.kl_target, args.kl_horizon)
        self.streams = RandomStreams(args.seed, distributed.process_seed(args.seed), self.device)
        self.train_prompts, self.held_out_prompts = prompt_split or load_prompt_split(
            args.prompts, args.held_out_fraction, args.seed)
        self.phase, self.global_step = 0, 0  # phases done, optimiser steps taken
        self.history: list[dict[str, float]] = []
        self.console = (console or Console()) if distributed.is_main() else Console(quiet=True)
        self.table_every = table_every

    # ---- the rollout phase: sample -> score -> evaluate -> advantages -> memory ----

    @torch.no_grad()
    def rollout_phase(self) -> Rollout:
        """Sample, score, run the samples through the policy and the reference, estimate
        advantages: the phase's memory and metrics."""
        args, times, prompts = self.args, {}, self.get_phase_prompts()
        with timed(times, "charts/sample_time"):
            samples = self.sample(prompts, self.streams.sample, for_training=True)
        with timed(times, "charts/reward_time"):
            rewards, loss_mask = self.score(samples, prompts)
        with timed(times, "charts/forward_time"), self.autocast():
            outputs = get_rollout_outputs(self.model, self.reference, samples, args.kl_estimator,
                                          self.local_batch_size // args.num_minibatches)
        batch = gather_rollout(samples, rewards, outputs)  # every process's rows
        advantages = self.compute_advantages(batch)
        memory = ReplayMemory(samples.sample_ids, samples.attention_mask, outputs.logprobs,
                              advantages[batch.local], outputs.values, outputs.kept, loss_mask)
        metrics = get_rollout_metrics(batch, advantages, args.kl_estimator, args.group_size,
                                      self.kl_controller.value)
        times["charts/rollout_time"] = sum(times.values())
        return Rollout(memory, batch.texts, batch.rewards, metrics["charts/kl_per_answer"],
                       metrics | times)

    def score(
        self, samples: Samples, prompts: list[Prompt]
    ) -> tuple[Float[Tensor, " batch"], Int[Tensor, "batch gen_len"] | None]:
        """The rewards and the loss mask, once the options of answers that end apply."""
        args = self.args
        rewards = get_rewards(self.reward_fn, samples.texts, self.device, samples.prompts,
                              samples.responses, prompts)
        return apply_answer_options(rewards, samples.response_mask, samples.ended, args.gen_len,
                                    args.truncation, args.overlong_buffer, args.drop_zero_spread,
                                    args.group_size)

    def compute_advantages(self, batch: GlobalBatch) -> Float[Tensor, "batch gen_len"]:
        """The advantages of `args.advantage_estimator` from the (normalised) rewards."""
        args, outputs = self.args, batch.outputs
        rewards = normalize_reward(batch.rewards) if args.normalize_reward else batch.rewards
        kl_coef = get_kl_coefs(self.kl_controller.value, args.kl_in).reward
        return compute_advantages(args.advantage_estimator, rewards, outputs.values, outputs.kl,
                                  kl_coef, args.group_size, args.gamma, args.gae_lambda,
                                  batch.response_mask)

    def get_phase_prompts(self) -> list[Prompt]:
        """This process's rows of this phase's prompt records (every process draws the same):
        training prompts of the file, each group_size times, else the prompts given."""
        args, train = self.args, self.train_prompts
        prompts = get_phase_prompts(train, args.prompts_per_phase, args.group_size,
                                    self.streams.prompt) if train else self.prompts
        return prompts[distributed.local_rows(len(prompts))]

    @torch.no_grad()
    def sample(
        self, prompts: list[Prompt], generator: torch.Generator, for_training: bool = False,
        sampling: SamplingConfig | None = None,
    ) -> Samples:
        """The policy's answers to the prompt records (rendered by the run's template), with the
        run's settings (or `sampling`'s); `for_training` also keeps the sampler's final
        residuals and log-probs."""
        args, sampling = self.args, sampling or self.sampling
        texts = render_prompts(prompts, args.prompt_template, args.chat_template,
                               self.model.base_model.tokenizer)
        with self.autocast():
            return get_samples(self.model.base_model, texts, None, args.gen_len, sampling,
                               args.prepend_bos, generator=generator, stop_at_eos=args.stop_at_eos,
                               fast_path=args.fast_path, return_final_residual=for_training,
                               stop_string=args.stop_string, return_logprobs=for_training)

    @torch.no_grad()
    def evaluate_held_out(self) -> dict[str, float]:
        """The mean reward of an answer to each of the first `held_out_max` held-out prompts;
        with `eval_pass_k`, pass@1 (greedy) and pass@k too (`pass_at_k.get_pass_metrics`)."""
        prompts, k = self.held_out_prompts[: self.args.held_out_max], self.args.eval_pass_k
        metrics = {"eval/held_out_reward": self.score_held_out(prompts).mean().item()}
        if k > 0:
            greedy = self.score_held_out(prompts, SamplingConfig(top_k=1))
            sampled = self.score_held_out([p for p in prompts for _ in range(k)])
            metrics |= get_pass_metrics(greedy, rearrange(sampled, "(group k) -> group k", k=k),
                                        k)
        return metrics

    @torch.no_grad()
    def score_held_out(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None
    ) -> Float[Tensor, " batch"]:
        """The reward of one answer to each prompt (in batches of batch_size), sampled with the
        run's settings or `sampling` (top_k=1: greedy) from the evaluation's random stream."""
        rewards = []
        for start in range(0, len(prompts), self.args.batch_size):
            chunk = prompts[start : start + self.args.batch_size]
            samples = self.sample(chunk, self.streams.eval, sampling=sampling)
            rewards.append(get_rewards(self.reward_fn, samples.texts, self.device,
                                       samples.prompts, samples.responses, chunk))
        return torch.cat(rewards)

    # ---- the learning phase: PPO steps on minibatches of the memory ----

    def compute_rlhf_objective(self, mb: ReplayMinibatch) -> tuple[Float[Tensor, ""], dict]:
        """The objective to maximise on one minibatch, and its terms for the logs."""
        args, mask = self.args, mb.response_mask  # the tokens the loss reads
        how = args.loss_aggregation
        with self.autocast():  # log-probs, KL, entropy: never the minibatch's whole logits
            logprobs, values, kl, entropy = get_policy_outputs(
                self.model, self.reference, mb.sample_ids, mb.attention_mask, mb.prefix_len,
                mb.kept, args.kl_estimator, mb.logprobs)  # the rollout's: k3_is's sampler
        kl_coef = get_kl_coefs(self.kl_controller.value, args.kl_in).loss
        terms = {"losses/clipped_surrogate": calc_clipped_surrogate_objective(
                     logprobs, mb.logprobs, mb.advantages, args.clip_coef, args.clip_coef_high,
                     mask, how),
                 "losses/entropy_bonus": args.ent_coef * aggregate(entropy, mask, how),
                 "losses/kl_penalty": kl_coef * aggregate(kl, mask, how)}
        if values is not None:  # a critic-free policy has no value head, so no value term
            terms["losses/value_loss"] = calc_value_function_loss(values, mb.returns,
                                                                  args.vf_coef, mask, how)
        objective = (terms["losses/clipped_surrogate"] - terms.get("losses/value_loss", 0.0)
                     + terms["losses/entropy_bonus"] - terms["losses/kl_penalty"])
        stats = {key: term.item() for key, term in terms.items()}
        stats["losses/objective"] = objective.item()
        return objective, stats | get_ratio_metrics(logprobs, mb.logprobs, args.clip_coef, mask)

    def learning_phase(self, memory: ReplayMemory) -> dict[str, float]:
        """PPO steps over shuffled minibatches of the memory; returns the mean diagnostics."""
        args, all_stats = self.args, []
        whitened = ESTIMATORS[args.advantage_estimator].whitened
        for mb in memory.get_minibatches(args.num_minibatches, args.batches_per_learning_phase,
                                         self.streams.shuffle):
            if whitened:  # over the real tokens of the global minibatch under torchrun
                moments = distributed.global_moments(mb.advantages, mb.response_mask)
                mb.advantages = whiten(mb.advantages, moments, response_mask=mb.response_mask)
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

    def train_one_phase(self) -> Rollout:
        """One rollout phase and one learning phase: the rollout, its metrics completed (and in
        `history`). A failed rollout puts the random states back, so a new call repeats it."""
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
        metrics |= {"charts/learning_time": time.perf_counter() - learn_start,
                    "charts/phase_time": time.perf_counter() - start, "charts/phase": self.phase}
        # Ziegler et al.'s KL is the whole answer's: summed over its tokens.
        self.kl_controller.update(rollout.kl, self.args.batch_size)
        self.history.append(metrics)
        self.phase += 1
        return rollout._replace(metrics=metrics)

    def train(
        self,
        on_phase_end: Callable[["RLHFTrainer", Rollout], None] | None = None,
        wandb_kwargs: dict | None = None,
    ) -> list[dict[str, float]]:
        """Run phases until `args.total_phases` (from `self.phase` after a resume), calling
        `on_phase_end(trainer, rollout)` after each; `wandb_kwargs` go to `wandb.init`."""
        args = self.args
        wandb = args.use_wandb and distributed.is_main()
        wandb_config = get_wandb_config(args.to_dict(), wandb_kwargs) if wandb else None
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
        """bfloat16 autocast for forward passes under "bf16" (the models return float32)."""
        return autocast(self.device, self.precision)

    def state_dict(self, random_state: dict | None = None) -> dict:
        """What trained (frozen weights come from base_model), the optimiser and schedule, the
        random states (`random_state`, default now's; every process's, so every process calls
        this), phase and step, the KL coefficient, the metrics, the args, the process count."""
        return {"model": get_trained_state(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": distributed.per_process(random_state or self.streams.state_dict()),
                "world_size": distributed.get_world_size(), "phase": self.phase,
                "global_step": self.global_step, "kl_controller": self.kl_controller.state_dict(),
                "history": self.history, "args": self.args.to_dict()}

    def load_state_dict(self, state: dict):
        """Continue from `state_dict()` (the reference is the base model as loaded: build the
        trainer from the same one). Another process count is refused (`WorldSizeError`)."""
        distributed.check_world_size(state["world_size"])
        load_trained_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.streams.load_state_dict(distributed.own_part(state["rng"]))
        self.phase = state["phase"]
        self.global_step = state["global_step"]
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.history = list(state["history"])
