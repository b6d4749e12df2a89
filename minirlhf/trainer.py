"""`RLHFTrainer`: the whole PPO loop, composed from the stages of the pipeline.

Each phase: sample from the policy (`rollout_phase`), score the samples, estimate advantages,
store everything in a `ReplayMemory`; then take PPO steps on shuffled minibatches of it
(`learning_phase`). The reference model is a frozen copy of the policy at the start.

Temperature convention ("The N Implementation Details of RLHF with PPO", Huang et al. 2024):
tokens are sampled from softmax(logits / T), so every log-prob in the PPO ratio and both sides of
the KL penalty use logits / T as well, in the rollout and in the learning phase alike. Top-k and
top-p truncate sampling only; they are not part of the log-probs (use them with care: a token
the truncation forbade can never be sampled, whatever its log-prob says).
"""

import random
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from rich.console import Console
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf import fast_forward, loading
from minirlhf.advantages import compute_advantages, compute_gae
from minirlhf.args import RLHFArgs
from minirlhf.losses import (
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_function_loss,
    get_logprobs,
)
from minirlhf.memory import ReplayMemory, ReplayMinibatch
from minirlhf.models import TransformerWithValueHead, get_reference_model
from minirlhf.optim import get_optimizer_and_scheduler
from minirlhf.rewards import RewardFn, get_rewards, normalize_reward
from minirlhf.sampling import get_samples
from minirlhf.tracking import PhaseLogger


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mask_or_none(attention_mask: Int[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"] | None:
    """The mask only when there is padding: unpadded batches take TransformerLens's faster path."""
    return None if bool(attention_mask.all()) else attention_mask


def explained_variance(
    values: Float[Tensor, "batch gen_len"], returns: Float[Tensor, "batch gen_len"]
) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect value head, <= 0 a useless one."""
    var_returns = returns.var(correction=0)
    if var_returns == 0:
        return float("nan")
    return (1 - (returns - values).var(correction=0) / var_returns).item()


class RLHFTrainer:
    """PPO on a language model against a reward function.

    Args:
        args: the hyperparameters.
        reward_fn: maps the decoded samples (prompt + continuation) to one reward each.
        base_model: the policy to train; None loads `args.base_model`.
        prompts: one prompt per sample (length batch_size), e.g. control-token prompts;
            None repeats `args.prefix`.
        console: where progress and tables go (a quiet `Console(quiet=True)` in tests).
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
        self.args = args
        self.reward_fn = reward_fn
        if prompts is not None and len(prompts) != args.batch_size:
            raise ValueError(f"Got {len(prompts)} prompts for batch_size {args.batch_size}.")
        self.prompts = prompts if prompts is not None else args.prefix
        set_seed(args.seed)
        self.device = loading.pick_device(args.device)
        self.precision = loading.pick_precision(args.precision, self.device)
        if base_model is None:
            base_model = loading.load_policy(args.base_model, self.device)
        base_model = base_model.to(self.device)
        self.model = TransformerWithValueHead(base_model, fast=args.fast_forward).to(self.device)
        self.ref_model = get_reference_model(base_model)
        self.optimizer, self.scheduler = get_optimizer_and_scheduler(
            self.model, args.base_lr, args.head_lr, args.warmup_steps, args.total_phases,
            args.final_scale,
        )
        self.sample_generator = torch.Generator(device=self.device).manual_seed(args.seed)
        self.shuffle_generator = torch.Generator().manual_seed(args.seed + 1)
        self.phase = 0
        self.global_step = 0  # optimiser steps taken: a checkpoint at a boundary is consistent
        self.history: list[dict[str, float]] = []
        self.last_samples: list[str] = []
        self.last_rewards: list[float] = []
        self.console = console or Console()
        self.table_every = table_every
        self.updating = False
        # Random states at the last phase boundary: with the weights, a consistent checkpoint.
        self.rng_at_boundary = self.get_rng_state()

    # ---- state, for checkpoints ----

    def get_rng_state(self) -> dict:
        """Every random state the run draws from, so a resumed run continues the same curve."""
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "sample_generator": self.sample_generator.get_state(),
            "shuffle_generator": self.shuffle_generator.get_state(),
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

    def state_dict(self) -> dict:
        """Policy, value head, optimiser, scheduler, random states, phase and metrics so far."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.get_rng_state(),
            "phase": self.phase,
            "global_step": self.global_step,
            "history": self.history,
            "args": self.args.to_dict(),
        }

    def load_state_dict(self, state: dict):
        """Continue from `state_dict()`. The reference model is not in it: it is the base model
        as loaded at the start, so load the trainer from the same `args.base_model`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.set_rng_state(state["rng"])
        self.phase = state["phase"]
        self.global_step = state.get("global_step", 0)
        self.history = list(state["history"])

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast for forward passes when the precision is "bf16" (else a no-op). The
        trainer casts logits and values back to float32, so log-softmaxes, the KL and every loss
        term are computed in float32."""
        enabled = self.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ---- rollout ----

    @torch.no_grad()
    def rollout_phase(self) -> ReplayMemory:
        """Sample, score and estimate advantages; return the phase's replay memory."""
        args = self.args
        start = time.perf_counter()
        with self.autocast():
            rollout = get_samples(
                self.model.base_model, self.prompts, batch_size=args.batch_size,
                gen_len=args.gen_len, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, prepend_bos=args.prepend_bos, generator=self.sample_generator,
                fast=args.fast_forward, return_normalized=args.fast_forward,
            )
        sample_time = time.perf_counter() - start
        ids, mask, prefix_len = rollout.sample_ids, rollout.attention_mask, rollout.prefix_len
        logprobs, values, ref_logits, ref_normalized, kl, entropy = self.evaluate_samples(
            ids, mask, prefix_len, rollout.normalized
        )
        reward_start = time.perf_counter()
        rewards = get_rewards(self.reward_fn, rollout.samples, device=self.device)
        reward_time = time.perf_counter() - reward_start
        scaled = normalize_reward(rewards) if args.normalize_reward else rewards
        if args.advantage_estimator == "gae":
            advantages = compute_gae(values, scaled, prefix_len, args.gamma, args.gae_lambda)
        else:
            advantages = compute_advantages(values, scaled, prefix_len)

        gen_values = values[:, prefix_len - 1 : -1]
        self.last_samples, self.last_rewards = rollout.samples, rewards.tolist()
        self.rollout_metrics = {
            "charts/reward_mean": rewards.mean().item(),
            "charts/reward_std": rewards.std(correction=0).item(),
            "charts/kl": kl,
            "charts/entropy": entropy,
            "losses/explained_variance": explained_variance(gen_values, advantages + gen_values),
            "charts/sample_time": sample_time,
            "charts/forward_time": reward_start - start - sample_time,
            "charts/reward_time": reward_time,
            "charts/rollout_time": time.perf_counter() - start,
        }
        return ReplayMemory(ids, mask, logprobs, advantages, gen_values, ref_logits,
                            ref_normalized)

    @torch.no_grad()
    def evaluate_samples(
        self,
        ids: Int[Tensor, "batch seq"],
        mask: Int[Tensor, "batch seq"],
        prefix_len: int,
        normalized: Float[Tensor, "batch gen_plus_one d_model"] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, float, float]:
        """The policy's log-probs and values; what the learning phase needs of the reference
        model; the mean KL and entropy of the policy.

        The reference comes back as its logits at the generated positions, or, with
        `recompute_ref_logits`, as None and its final normalised residual stream there (None
        too when the reference model is not on the fast path: then the learning phase reruns
        it whole).

        `normalized` (from the fast-path sampler) spares the policy's forward pass: the sampler
        already computed its final residual stream at every position from `prefix_len - 1` on.
        With `recompute_ref_logits`, the samples go through the models one minibatch at a time,
        so no batch x seq x d_vocab logits are ever held at once.
        """
        args = self.args
        chunk = args.minibatch_size if args.recompute_ref_logits else len(ids)
        parts: list[tuple] = []
        for rows in torch.arange(len(ids), device=ids.device).split(chunk):
            with self.autocast():
                if normalized is not None:
                    logits, values = self.model.get_heads(normalized[rows])
                    # Values only at the positions the advantages read; NaN proves it.
                    values = F.pad(values, (prefix_len - 1, 0), value=float("nan"))
                else:
                    logits, values = self.model(ids[rows], mask_or_none(mask[rows]))
                    logits = logits[:, prefix_len - 1 :]
            gen_logits, logprobs = self.get_gen_logits_and_logprobs(logits, ids[rows], prefix_len)
            values = values.float()
            ref_logits, ref_normalized = self.get_ref_logits(ids[rows], mask[rows], prefix_len)
            parts.append((
                logprobs, values,
                None if args.recompute_ref_logits else ref_logits,
                ref_normalized if args.recompute_ref_logits else None,
                calc_kl_penalty(gen_logits, ref_logits, kl_coef=1.0).item(),
                calc_entropy_bonus(gen_logits, ent_coef=1.0).item(),
            ))
        logprobs, values, ref_logits, ref_normalized, kl, entropy = zip(*parts)
        return (
            torch.cat(logprobs), torch.cat(values),
            None if ref_logits[0] is None else torch.cat(ref_logits),
            None if ref_normalized[0] is None else torch.cat(ref_normalized),
            float(np.mean(kl)), float(np.mean(entropy)),
        )

    def get_gen_logits_and_logprobs(
        self,
        logits: Float[Tensor, "batch gen_plus_one d_vocab"],
        ids: Int[Tensor, "batch seq"],
        prefix_len: int,
    ) -> tuple[Float[Tensor, "batch gen_len d_vocab"], Float[Tensor, "batch gen_len"]]:
        """From the policy's logits at positions `prefix_len - 1` on: the float32 logits / T that
        chose each generated token, and the log-probs of those tokens."""
        logits = logits.float() / self.args.temperature
        return logits[:, :-1], get_logprobs(logits, ids[:, prefix_len - 1 :])

    @torch.no_grad()
    def get_ref_logits(
        self, ids: Int[Tensor, "batch seq"], mask: Int[Tensor, "batch seq"], prefix_len: int
    ) -> tuple[Float[Tensor, "batch gen_len d_vocab"], Tensor | None]:
        """The reference model's logits / temperature at the generated positions only, and on the
        fast path the final normalised residual stream they were computed from (`ref_unembed`
        turns it back into the same logits). The reference is a copy of the policy's base
        model, so it is on the fast path exactly when the policy is."""
        if not self.model.fast:
            with self.autocast():
                logits = self.ref_model(ids, return_type="logits",
                                        attention_mask=mask_or_none(mask))
            logits = logits[:, prefix_len - 1 : -1].float() / self.args.temperature
            return logits.contiguous(), None
        with self.autocast():
            weights = fast_forward.get_fast_weights(self.ref_model)
            normalized = fast_forward.forward(weights, ids, mask_or_none(mask))
        normalized = normalized[:, prefix_len - 1 : -1].contiguous()
        return self.ref_unembed(normalized), normalized

    @torch.no_grad()
    def ref_unembed(
        self, normalized: Float[Tensor, "batch gen_len d_model"]
    ) -> Float[Tensor, "batch gen_len d_vocab"]:
        """The reference model's logits / temperature from its final normalised residual."""
        with self.autocast():
            logits = fast_forward.unembed(fast_forward.get_output_weights(self.ref_model),
                                          normalized)
        return logits.float() / self.args.temperature

    # ---- learning ----

    def compute_rlhf_objective(self, mb: ReplayMinibatch) -> tuple[Tensor, dict[str, float]]:
        """The objective to maximise on one minibatch, and diagnostics for logging."""
        args = self.args
        prefix_len = mb.sample_ids.shape[1] - mb.logprobs.shape[1]
        with self.autocast():
            logits, values = self.model(mb.sample_ids, mask_or_none(mb.attention_mask))
        logits = logits[:, prefix_len - 1 :]
        gen_logits, logprobs = self.get_gen_logits_and_logprobs(logits, mb.sample_ids, prefix_len)
        values = values.float()
        gen_values = values[:, prefix_len - 1 : -1]
        if mb.ref_logits is not None:
            ref_logits = mb.ref_logits
        elif mb.ref_normalized is not None:  # recompute_ref_logits: the unembedding only
            ref_logits = self.ref_unembed(mb.ref_normalized)
        else:  # recompute_ref_logits with a reference model off the fast path: all of it
            ref_logits, _ = self.get_ref_logits(mb.sample_ids, mb.attention_mask, prefix_len)

        clipped_surrogate = calc_clipped_surrogate_objective(
            logprobs, mb.logprobs, mb.advantages, args.clip_coef
        )
        value_loss = calc_value_function_loss(gen_values, mb.returns, args.vf_coef)
        entropy_bonus = calc_entropy_bonus(gen_logits, args.ent_coef)
        kl_penalty = calc_kl_penalty(gen_logits, ref_logits, args.kl_coef)
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
        return objective, stats

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
            objective.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
            stats["losses/grad_norm"] = grad_norm.item()
            self.optimizer.step()
            self.global_step += 1
            all_stats.append(stats)
        base_lr, head_lr = (group["lr"] for group in self.optimizer.param_groups)
        self.scheduler.step()
        means = {key: float(np.mean([s[key] for s in all_stats])) for key in all_stats[0]}
        return {**means, "charts/lr_base": base_lr, "charts/lr_head": head_lr}

    # ---- the loop ----

    def train_one_phase(self) -> dict[str, float]:
        """One rollout phase and one learning phase; returns the phase's metrics."""
        start = time.perf_counter()
        memory = self.rollout_phase()
        learn_start = time.perf_counter()
        self.updating = True  # weights change from here on: no checkpoint until the phase ends
        metrics = {**self.rollout_metrics, **self.learning_phase(memory)}
        self.updating = False
        metrics["charts/learning_time"] = time.perf_counter() - learn_start
        metrics["charts/phase_time"] = time.perf_counter() - start
        metrics["charts/phase"] = self.phase
        self.history.append(metrics)
        self.phase += 1
        self.rng_at_boundary = self.get_rng_state()
        return metrics

    def train(
        self,
        on_phase_end: Callable[["RLHFTrainer", dict[str, float]], None] | None = None,
        wandb_kwargs: dict | None = None,
    ) -> list[dict[str, float]]:
        """Run phases until `args.total_phases` (continuing from `self.phase` after a resume).

        Args:
            on_phase_end: called after every phase with the trainer and the phase's metrics.
            wandb_kwargs: extra arguments for `wandb.init` (e.g. mode, dir) when args.use_wandb.
        """
        args = self.args
        wandb_config = None
        if args.use_wandb:
            wandb_config = {"project": args.wandb_project_name, "entity": args.wandb_entity,
                            "config": args.to_dict(), **(wandb_kwargs or {})}
        logger = PhaseLogger(args.total_phases, self.table_every, wandb_config, self.console)
        logger.start(completed=self.phase)
        try:
            while self.phase < args.total_phases:
                phase = self.phase
                metrics = self.train_one_phase()
                logger.log_phase(phase, metrics, self.last_samples, self.last_rewards)
                if on_phase_end is not None:
                    on_phase_end(self, metrics)
        finally:
            logger.close()
        return self.history
