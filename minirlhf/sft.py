"""Supervised fine-tuning (SFT) on demonstrations: the stage before the reward model and RL.

The design minirlhf grew from starts every RLHF run here (Ouyang et al. 2022, "Training language
models to follow instructions with human feedback", step 1; Stiennon et al. 2020): fine-tune the
policy on prompt/response demonstrations so that its answers are in-distribution, then train the
reward model and run RL from the SFT model, which is also RL's reference
(`--base-model <sft run>`, `runtime.policy_folder`).

A demonstration (`minirlhf.demonstrations`) is a prompt record (`prompts.Prompt`: "prompt" or
chat "messages") and its "response". The prompt is rendered exactly as RL renders it
(`prompts.render_prompt`: a template or the tokenizer's chat template) and tokenized alone, BOS
first, as the sampler tokenizes it; the response's tokens follow, then the EOS token the sampler
stops at (`RLHFArgs.stop_at_eos`; with SmolLM2's chat template that is `<|im_end|>`, the end of
the assistant's turn), so SFT teaches answers that end. The loss (`calc_sft_loss`, minimised)
is the mean cross-entropy over the response's tokens only. What trains is `SFTArgs`' choice,
as in PPO and DPO: every weight, the top blocks, or LoRA adapters. Metric keys (docs/sft.md):

    train/loss, train/accuracy, train/grad_norm, train/lr     the step's minibatch
    held_out/loss, held_out/accuracy, held_out/exact_match    every held-out demonstration
"""

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from eindex import eindex
from jaxtyping import Float, Int
from rich.console import Console
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.args import RLHFArgs
from minirlhf.demonstrations import Demonstration
from minirlhf.models import prepare_policy, run_model
from minirlhf.optim import get_lr_scale
from minirlhf.pairs.dpo_training import record_steps
from minirlhf.pairs.reward_training import run_pair_epochs
from minirlhf.prompts import render_prompts
from minirlhf.runtime.device import autocast, pick_precision
from minirlhf.runtime.tokens import get_token_rows
from minirlhf.runtime.trained_state import get_trained_state, load_trained_state
from minirlhf.runtime.trunk import TrunkCache
from minirlhf.validation import check_at_least, check_choice, check_interval, check_positive


@dataclass
class SFTArgs:
    # --- run ---
    seed: int = 1
    """Seeds the held-out split, the minibatch shuffling and new LoRA adapters."""
    device: str | None = None
    """"cuda", "mps" or "cpu"; None picks CUDA, else MPS, else CPU."""

    # --- model ---
    base_model: str = "tiny"
    """The starting policy: "tiny", "smollm2", a folder, a finished SFT run or a TL name."""
    prepend_bos: bool = True
    """Put the model's BOS token before each prompt (as RL's sampler does)."""
    fast_path: bool = True
    """Run forward passes on minirlhf.runtime.fast_path where it can run the model."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """Forward passes in float32 or under bfloat16 autocast (the loss stays float32)."""

    # --- what trains (as in RLHFArgs) ---
    trainable_layers: int | None = None
    """Train only the top this many blocks (and the final norm); None: every weight trains."""
    lora_rank: int = 0
    """With a rank >= 1, train LoRA adapters on `lora_targets` (in the top `trainable_layers`
    blocks when that is set); they are merged into the weights when the run is used. 0: no LoRA."""
    lora_alpha: float = 16.0
    """LoRA's scale is lora_alpha / lora_rank."""
    lora_targets: str = "q,k,v,o,in,gate,out"
    """Comma-separated matrices that get adapters: attention q, k, v, o; MLP in, gate, out."""

    # --- the text the model reads (as in RLHFArgs) ---
    prompt_template: str | None = None
    """Wrap each "prompt" in a template with "{prompt}", e.g. "Question: {prompt}\n\nAnswer:"."""
    chat_template: bool = False
    """Render each prompt with the tokenizer's own chat template (needed by "messages")."""
    append_eos: bool = True
    """End each response with the EOS token RL's sampler stops at (stop_at_eos), so the model
    learns to end its answers. False: responses are learned without an end."""

    # --- data ---
    held_out_fraction: float = 0.1
    """Share of the demonstrations kept out of training to measure loss and accuracy."""
    held_out_max: int = 256
    """Evaluate at most this many held-out demonstrations (the first of the split)."""

    # --- optimisation ---
    epochs: int = 3
    """Passes over the training demonstrations."""
    batch_size: int = 8
    """Demonstrations per step."""
    base_lr: float = 1e-5
    """AdamW learning rate (every weight: about 1e-5; LoRA adapters: about 1e-4 to 1e-3)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Steps of linear LR warmup (the first step already learns)."""
    final_scale: float = 1.0
    """LR multiplier reached by linear decay at the last step (1.0: constant after warmup)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm before each step."""
    eval_every: int = 20
    """Steps between held-out evaluations (the last step is always evaluated)."""

    def __post_init__(self):
        check_at_least(self, ["epochs", "batch_size", "eval_every", "held_out_max"])
        check_at_least(self, ["seed", "warmup_steps"], minimum=0)
        check_interval(self, ["held_out_fraction"], 0.0, 1.0, open_low=True, open_high=True)
        check_interval(self, ["final_scale"], 0.0, 1.0)
        check_positive(self, ["base_lr", "max_grad_norm"])
        check_choice(self, "precision")
        RLHFArgs.check_trainable(self)  # the same four fields, checked the same way
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError('prompt_template must contain "{prompt}", where the prompt goes.')

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- tokens and the loss


@dataclass
class SFTBatch:
    """[BOS] + prompt + response + [EOS] per demonstration, right-padded."""

    tokens: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    """1 for real tokens, 0 for padding."""
    loss_mask: Int[Tensor, "batch seq"]
    """1 for the response's tokens and its EOS; 0 for BOS, the prompt and padding."""


def get_end_token(model: HookedTransformer) -> int:
    """The EOS token id RL's sampler stops at, checked to be in the model's vocabulary."""
    eos = model.tokenizer.eos_token_id
    if eos is None or eos >= model.cfg.d_vocab:
        raise ValueError(f"The tokenizer's EOS token ({eos}) is not in this model's "
                         f"{model.cfg.d_vocab}-token vocabulary: set append_eos=False.")
    return eos


def tokenize_demonstrations(
    model: HookedTransformer, demonstrations: list[Demonstration], args: SFTArgs
) -> SFTBatch:
    """Prompts rendered as RL renders them and tokenized as its sampler does (`get_token_rows`),
    then each response tokenized apart (as the sampler's tokens follow the prompt's), then EOS."""
    tokenizer = model.tokenizer
    texts = render_prompts([d.prompt for d in demonstrations], args.prompt_template,
                           args.chat_template, tokenizer if args.chat_template else None)
    end = [get_end_token(model)] if args.append_eos else []
    rows, starts = [], []
    for head, demo in zip(get_token_rows(tokenizer, texts, args.prepend_bos, None),
                          demonstrations, strict=True):
        rows.append(head + tokenizer(demo.response, add_special_tokens=False)["input_ids"] + end)
        starts.append(len(head))
    seq = max(len(row) for row in rows)
    if seq > model.cfg.n_ctx:
        raise ValueError(f"A demonstration has {seq} tokens; the model reads at most "
                         f"{model.cfg.n_ctx}: shorten it.")
    tokens = torch.zeros((len(rows), seq), dtype=torch.long)  # padding: id 0, masked out
    attention_mask, loss_mask = torch.zeros_like(tokens), torch.zeros_like(tokens)
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, : len(row)], attention_mask[i, : len(row)] = torch.tensor(row), 1
        loss_mask[i, start : len(row)] = 1
    if int(tokens.max()) >= model.cfg.d_vocab:
        raise ValueError(f"Token id {int(tokens.max())} is outside the model's vocabulary.")
    device = model.cfg.device
    return SFTBatch(tokens.to(device), attention_mask.to(device), loss_mask.to(device))


def calc_sft_loss(
    logits: Float[Tensor, "batch seq d_vocab"],
    tokens: Int[Tensor, "batch seq"],
    loss_mask: Int[Tensor, "batch seq"],
) -> Float[Tensor, ""]:
    """The mean cross-entropy, in nats per token, over the tokens `loss_mask` marks (the
    responses and their EOS) in the whole batch: every response token weighs the same, so a long
    response counts more than a short one. Minimised. Prompt and padding tokens are not counted."""
    assert not loss_mask[:, 0].any(), "loss_mask marks token 0, which nothing predicts"
    counted = loss_mask[:, 1:].bool()
    assert counted.any(), "loss_mask marks no token: every demonstration needs a response"
    # logits[:, s] predicts tokens[:, s+1]. Masked log-probs are replaced, not multiplied by 0
    # (NaN * 0 is NaN).
    logprobs = eindex(logits.float().log_softmax(dim=-1), tokens, "b s [b s+1]")
    logprobs = torch.where(counted, logprobs, 0.0)
    return -logprobs.sum() / counted.sum()


def count_correct(
    logits: Float[Tensor, "batch seq d_vocab"],
    tokens: Int[Tensor, "batch seq"],
    loss_mask: Int[Tensor, "batch seq"],
) -> dict[str, int]:
    """Counts for accuracy: response tokens, those that are the model's most likely next token,
    demonstrations, and those whose every response token is (their whole response, EOS included,
    is what greedy decoding writes)."""
    counted = loss_mask[:, 1:].bool()
    correct = (logits[:, :-1].argmax(dim=-1) == tokens[:, 1:]) & counted
    return {"tokens": int(counted.sum()), "correct": int(correct.sum()),
            "rows": len(tokens), "exact": int((correct == counted).all(dim=-1).sum())}


# ---------------------------------------------------------------- training


class SFTTrainer:
    """Fine-tunes `policy` (in place) on demonstrations; `train` runs the epochs.

    Args:
        policy: the starting policy (`loading.load_policy`); what trains is `args`' choice.
        train, held_out: the demonstrations to learn and to evaluate on.
    """

    def __init__(self, policy: HookedTransformer, train: list[Demonstration],
                 held_out: list[Demonstration], args: SFTArgs, console: Console | None = None):
        self.policy, self.args, self.console = policy, args, console
        if not train or not held_out:
            raise ValueError(f"SFT needs training and held-out demonstrations; got {len(train)} "
                             f"and {len(held_out)}.")
        self.train_set, self.held_out = train, held_out[: args.held_out_max]
        torch.manual_seed(args.seed)  # new LoRA adapters start the same on every run
        n_frozen = prepare_policy(policy, args.trainable_layers, args.lora_rank, args.lora_alpha,
                                  args.lora_targets)
        self.optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                           lr=args.base_lr, weight_decay=args.weight_decay)
        self.trunks = TrunkCache(n_frozen, args.fast_path) if n_frozen else None
        self.device = next(policy.parameters()).device
        self.precision = pick_precision(args.precision, self.device)
        self.history: list[dict[str, float]] = []
        self.total_steps = args.epochs * -(-len(train) // args.batch_size)

    def forward(self, demonstrations: list[Demonstration]) -> tuple[Tensor, SFTBatch]:
        """The policy's logits on a batch of demonstrations (above the frozen trunk, if any)."""
        batch = tokenize_demonstrations(self.policy, demonstrations, self.args)
        trunk = None if self.trunks is None else self.trunks(self.policy, batch.tokens,
                                                             batch.attention_mask)
        with autocast(self.device, self.precision):
            logits, _ = run_model(self.policy, batch.tokens, batch.attention_mask,
                                  self.args.fast_path, trunk=trunk)
        return logits.float(), batch

    def train_step(self, rows: list[int]) -> dict[str, float]:
        """One AdamW step on `calc_sft_loss` of the training demonstrations `rows`."""
        self.policy.train()
        lr = self.args.base_lr * get_lr_scale(len(self.history), self.args.warmup_steps,
                                              self.total_steps, self.args.final_scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logits, batch = self.forward([self.train_set[i] for i in rows])
        loss = calc_sft_loss(logits, batch.tokens, batch.loss_mask)
        if not torch.isfinite(loss):  # stop before the step writes NaN into every weight
            raise FloatingPointError(f"The SFT loss is {loss.item()}: lower --base-lr.")
        self.optimizer.zero_grad()
        loss.backward()
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.args.max_grad_norm)
        self.optimizer.step()
        counts = count_correct(logits, batch.tokens, batch.loss_mask)
        return {"train/loss": loss.item(), "train/accuracy": counts["correct"] / counts["tokens"],
                "train/grad_norm": grad_norm.item(), "train/lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (per response token), token accuracy and exact match over the held-out set."""
        self.policy.eval()
        total_loss, counts = 0.0, {"tokens": 0, "correct": 0, "rows": 0, "exact": 0}
        for start in range(0, len(self.held_out), self.args.batch_size):
            logits, batch = self.forward(self.held_out[start : start + self.args.batch_size])
            found = count_correct(logits, batch.tokens, batch.loss_mask)
            total_loss += calc_sft_loss(logits, batch.tokens, batch.loss_mask).item() * \
                found["tokens"]
            counts = {key: counts[key] + found[key] for key in counts}
        return {"loss": total_loss / counts["tokens"],
                "accuracy": counts["correct"] / counts["tokens"],
                "exact_match": counts["exact"] / counts["rows"]}

    def state_dict(self) -> dict:
        """What continues the run: what trained (named as in a PPO checkpoint, under
        "base_model.", so `minirlhf sample` and `export` read it), AdamW's state, the metrics.
        The shuffles and the LR need no state: they follow from the seed and the step."""
        return {"model": {f"base_model.{name}": value
                          for name, value in get_trained_state(self.policy).items()},
                "optimizer": self.optimizer.state_dict(), "history": list(self.history),
                "phase": len(self.history), "global_step": len(self.history)}

    def load_state_dict(self, saved: dict):
        """Put a `state_dict` back (the policy prepared as the run's was)."""
        load_trained_state(self.policy, {name.removeprefix("base_model."): value
                                         for name, value in saved["model"].items()})
        self.optimizer.load_state_dict(saved["optimizer"])
        self.history = list(saved["history"])

    def train(
        self, on_step: Callable[[dict[str, float]], None] | None = None,
        saved: dict | None = None, save: Callable[[dict], None] | None = None,
        save_every: int = 20, stop: Callable[[], int | None] | None = None,
    ) -> list[dict[str, float]]:
        """Run the epochs (from `saved`, a `state_dict`, when resuming); one metrics dict per
        step. `save(state_dict())` every `save_every` steps and after the last; `stop()` asked
        after each step (a signal number saves and ends the run: `dpo_training.record_steps`)."""
        if saved is not None:
            self.load_state_dict(saved)
        after_step = record_steps(self.history, self.total_steps, on_step, save, save_every,
                                  self.state_dict, stop)
        shuffler = random.Random(self.args.seed)
        run_pair_epochs(
            len(self.train_set), (self.args.epochs, self.args.batch_size, self.args.eval_every),
            lambda: shuffler.sample(range(len(self.train_set)), len(self.train_set)),
            self.train_step, self.evaluate, "SFT", self.console, after_step,
            start_step=len(self.history))
        self.policy.eval()
        return self.history
