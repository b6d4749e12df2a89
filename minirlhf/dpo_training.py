"""Training a policy with DPO on preference pairs: the reward model and PPO in one loss.

Sits on the model, the preferences and the DPO math (`minirlhf.dpo`); the command line calls
`train_dpo`. The reference is a frozen copy of the starting policy, asked once, before the first
step, for the log-probs of every response (they never change); then each step takes a minibatch
of pairs, runs chosen and rejected through the policy in one forward pass, and takes an AdamW
step on the DPO loss (minimised). Every `eval_every` steps the held-out pairs are scored.
Metric keys, as in the reward-model training, are namespaced:

    train/loss, train/accuracy, train/margin,          the step's minibatch
    train/chosen_reward, train/rejected_reward
    heldout/...                                         the same over every held-out pair

The rewards are DPO's implicit rewards beta * (log pi - log pi_ref) (0 for every response before
the first step, so accuracy, which counts ties as wrong, starts at 0).
"""

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float, Int
from rich.console import Console
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.dpo import calc_dpo_loss, calc_preference_metrics, get_sequence_logprobs
from minirlhf.models import ReferenceModel, run_model
from minirlhf.preferences import Preference
from minirlhf.reward_training import run_pair_epochs
from minirlhf.validation import check_at_least, check_choice, check_interval, check_positive


@dataclass
class DPOArgs:
    # --- run ---
    seed: int = 1
    """Seeds the held-out split and the minibatch shuffling."""
    device: str | None = None
    """"cuda", "mps" or "cpu"; None picks CUDA, else MPS, else CPU."""

    # --- model ---
    base_model: str = "tiny"
    """The starting policy and reference: "tiny", "smollm2", a folder or a TransformerLens name."""
    prepend_bos: bool = True
    """Put the model's BOS token before each prompt (as the sampler that made the pairs did)."""
    fast_path: bool = True
    """Run forward passes on minirlhf.fast_path where it can run the model."""

    # --- data ---
    heldout_fraction: float = 0.2
    """Share of the pairs kept out of training to measure accuracy."""

    # --- loss ---
    beta: float = 0.1
    """KL strength: the implicit reward is beta * (log pi - log pi_ref)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """"sigmoid" (DPO, Rafailov et al. 2023) or "ipo" (Azar et al. 2023)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed share of wrong labels, in [0, 0.5) (sigmoid only)."""

    # --- optimisation ---
    epochs: int = 2
    """Passes over the training pairs."""
    batch_size: int = 8
    """Pairs per step (each pair is two sequences in the forward pass)."""
    lr: float = 1e-5
    """AdamW learning rate (every weight of the policy is trained)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm before each step."""
    eval_every: int = 20
    """Steps between held-out evaluations (the last step is always evaluated)."""

    def __post_init__(self):
        check_at_least(self, ["epochs", "batch_size", "eval_every"])
        check_interval(self, ["heldout_fraction"], 0.0, 1.0, open_low=True, open_high=True)
        check_interval(self, ["label_smoothing"], 0.0, 0.5, open_high=True)
        check_positive(self, ["beta", "lr"])
        check_choice(self, "loss_type")
        if self.label_smoothing and self.loss_type == "ipo":
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' only.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ResponseTokens:
    """Prompt + response token ids, right-padded, with the masks `get_sequence_logprobs` reads."""

    tokens: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    """1 for real tokens, 0 for padding."""
    response_mask: Int[Tensor, "batch seq"]
    """1 for the response's tokens, 0 for the prompt (and BOS) and padding."""


def tokenize_responses(
    model: HookedTransformer, prompts: list[str], responses: list[str], prepend_bos: bool = True
) -> ResponseTokens:
    """[BOS] + prompt + response for each pair of texts, the two tokenized apart (so the response
    keeps the tokens it was sampled as) and joined."""
    tokenizer = model.tokenizer
    assert tokenizer is not None, "the model has no tokenizer: it cannot read preference texts"
    bos = [tokenizer.bos_token_id] if prepend_bos else []
    rows, starts = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        head = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tail = tokenizer(response, add_special_tokens=False)["input_ids"]
        if not head or not tail:
            raise ValueError(f"Pair {prompt!r} + {response!r}: a response needs at least one "
                             "token and something before it (a prompt, or prepend_bos).")
        rows.append(head + tail)
        starts.append(len(head))
    seq = max(len(row) for row in rows)
    if seq > model.cfg.n_ctx:
        raise ValueError(f"A pair has {seq} tokens; the model reads at most {model.cfg.n_ctx}.")
    tokens = torch.zeros((len(rows), seq), dtype=torch.long)  # padding: id 0, masked out
    attention_mask, response_mask = torch.zeros_like(tokens), torch.zeros_like(tokens)
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, : len(row)], attention_mask[i, : len(row)] = torch.tensor(row), 1
        response_mask[i, start : len(row)] = 1
    assert int(tokens.max()) < model.cfg.d_vocab, "a token id is outside the model's vocabulary"
    device = model.cfg.device
    return ResponseTokens(tokens.to(device), attention_mask.to(device), response_mask.to(device))


def get_pair_logprobs(
    model: HookedTransformer, pairs: list[Preference], args: DPOArgs
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """log pi(chosen | prompt) and log pi(rejected | prompt), from one forward pass over both."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = tokenize_responses(model, prompts, responses, args.prepend_bos)
    logits, _ = run_model(model, batch.tokens, batch.attention_mask, args.fast_path)
    logps = get_sequence_logprobs(logits, batch.tokens, batch.attention_mask, batch.response_mask)
    return logps[: len(pairs)], logps[len(pairs) :]


@torch.no_grad()
def get_all_logprobs(
    model: HookedTransformer, pairs: list[Preference], args: DPOArgs
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """`get_pair_logprobs` of every pair, in minibatches, without gradient."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), args.batch_size):
        c, r = get_pair_logprobs(model, pairs[start : start + args.batch_size], args)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def evaluate(
    policy: HookedTransformer, pairs: list[Preference],
    ref_logps: tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]], args: DPOArgs,
) -> dict[str, float]:
    """Loss, accuracy, margin and mean implicit rewards over every pair (no gradient)."""
    policy.eval()
    chosen, rejected = get_all_logprobs(policy, pairs, args)
    out = calc_dpo_loss(chosen, rejected, *ref_logps, args.beta, args.loss_type,
                        args.label_smoothing)
    return {"loss": out.loss.item(), **calc_preference_metrics(out.chosen_rewards,
                                                               out.rejected_rewards)}


def train_step(
    policy: HookedTransformer, optimizer: torch.optim.Optimizer, mb_pairs: list[Preference],
    mb_ref_logps: tuple[Float[Tensor, " minibatch"], Float[Tensor, " minibatch"]],
    args: DPOArgs, loss_fn: Callable[..., Tensor] | None = None,
) -> dict[str, float]:
    """One AdamW step on the DPO loss (or `loss_fn`'s, see `train_dpo`) of a minibatch of pairs."""
    policy.train()
    chosen, rejected = get_pair_logprobs(policy, mb_pairs, args)
    out = calc_dpo_loss(chosen, rejected, *mb_ref_logps, args.beta, args.loss_type,
                        args.label_smoothing)
    loss = out.loss if loss_fn is None else loss_fn(chosen, rejected, *mb_ref_logps, args.beta)
    if not torch.isfinite(loss):  # stop before the step writes NaN into every weight
        raise FloatingPointError(f"The DPO loss is {loss.item()} on a minibatch of "
                                 f"{len(mb_pairs)} pairs: lower --lr.")
    optimizer.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
    optimizer.step()
    metrics = calc_preference_metrics(out.chosen_rewards, out.rejected_rewards)
    return {"train/loss": loss.item(), **{f"train/{k}": v for k, v in metrics.items()},
            "train/grad_norm": grad_norm.item()}


def get_reference_logprobs(
    policy: HookedTransformer, splits: list[list[Preference]], args: DPOArgs
) -> list[tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]]:
    """(chosen, rejected) log-probs of every pair of each split under a frozen copy of `policy`
    as it is now; the copy is dropped on return."""
    reference = ReferenceModel(policy, fast_path=args.fast_path).model
    return [get_all_logprobs(reference, pairs, args) for pairs in splits]


def train_dpo(
    policy: HookedTransformer,
    train: list[Preference],
    heldout: list[Preference],
    args: DPOArgs,
    console: Console | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    loss_fn: Callable[..., Tensor] | None = None,
) -> list[dict[str, float]]:
    """Train `policy` (in place) with DPO for `args.epochs`; return one metrics dict per step.

    The reference log-probs of every pair are computed first (`get_reference_logprobs`).

    Args:
        loss_fn: `(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
            ref_rejected_logps, beta) -> loss`, what each step minimises (notebook 8 passes the
            learner's own); None: `calc_dpo_loss` with `args.loss_type` and
            `args.label_smoothing`. The logged implicit rewards and the held-out loss are
            `calc_dpo_loss`'s either way.
    """
    ref_train, ref_heldout = get_reference_logprobs(policy, [train, heldout], args)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    shuffler = random.Random(args.seed)
    history = run_pair_epochs(
        len(train), (args.epochs, args.batch_size, args.eval_every),
        lambda: shuffler.sample(range(len(train)), len(train)),
        lambda rows: train_step(policy, optimizer, [train[i] for i in rows],
                                (ref_train[0][rows], ref_train[1][rows]), args, loss_fn),
        lambda: evaluate(policy, heldout, ref_heldout, args), "DPO", console, on_step,
    )
    policy.eval()
    return history


def plot_dpo_metrics(history: list[dict[str, float]], path: str | Path) -> Path:
    """A PNG: preference accuracy (train and held-out), and the held-out implicit rewards of the
    chosen and rejected responses, against step."""
    from minirlhf.report import plot_accuracy, two_panel_figure

    with two_panel_figure(path) as (ax_acc, ax_reward):
        evals = plot_accuracy(ax_acc, history, "Chosen's implicit reward above rejected's")
        eval_steps = [m["charts/step"] for m in evals]
        for key, label in [("chosen_reward", "chosen"), ("rejected_reward", "rejected"),
                           ("margin", "margin")]:
            ax_reward.plot(eval_steps, [m[f"heldout/{key}"] for m in evals], marker="o",
                           label=label)
        ax_reward.axhline(0.0, color="grey", linewidth=0.5)
        ax_reward.set(xlabel="step", ylabel="beta * (log pi - log pi_ref)",
                      title="Held-out implicit rewards")
        ax_acc.legend()
        ax_reward.legend()
    return Path(path)
