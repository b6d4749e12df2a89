"""Training a policy with DPO on preference pairs: the reward model and PPO in one loss.

Sits on the model, the preferences and the DPO math (`minirlhf.pairs.dpo`); the command line calls
`train_dpo`. What trains is `DPOArgs`' choice, as in PPO: every weight, the top blocks (the
frozen ones below run once per text, `TrunkCache`), or LoRA adapters. The reference is the
starting policy, frozen (a copy sharing the frozen weights, or the adapters switched off), asked
once, before the first step, for the log-probs of every response (they never change); then each
step takes a minibatch
of pairs, runs chosen and rejected through the policy in one forward pass, and takes an AdamW
step on the DPO loss (minimised). Every `eval_every` steps the held-out pairs are scored.
Metric keys, as in the reward-model training, are namespaced:

    train/loss, train/accuracy, train/margin,          the step's minibatch
    train/chosen_reward, train/rejected_reward
    held_out/...                                         the same over every held-out pair
    held_out/kl                                          KL(policy || reference) per response
                                                        token on the held-out pairs

The rewards are DPO's implicit rewards beta * (log pi - log pi_ref) (0 for every response before
the first step, so accuracy, which counts ties as wrong, starts at 0).
"""

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from rich.console import Console
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.args import RLHFArgs
from minirlhf.losses import calc_exact_kl
from minirlhf.models import ReferenceModel, prepare_policy, run_model
from minirlhf.pairs.dpo import calc_dpo_loss, calc_preference_metrics, get_sequence_logprobs
from minirlhf.pairs.preferences import Preference
from minirlhf.pairs.reward_training import run_pair_epochs
from minirlhf.runtime import lora
from minirlhf.runtime.trained_state import get_trained_state, load_trained_state
from minirlhf.runtime.trunk import TrunkCache
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
    """Run forward passes on minirlhf.runtime.fast_path where it can run the model."""

    # --- what trains (as in RLHFArgs) ---
    trainable_layers: int | None = None
    """Train only the top this many blocks (and the final norm): the blocks below are frozen,
    run once per response and shared with the reference. None: every weight trains."""
    lora_rank: int = 0
    """With a rank >= 1, train LoRA adapters on `lora_targets` (in the top `trainable_layers`
    blocks when that is set); the reference is the policy with its adapters off. 0: no LoRA."""
    lora_alpha: float = 16.0
    """LoRA's scale is lora_alpha / lora_rank."""
    lora_targets: str = "q,k,v,o,in,gate,out"
    """Comma-separated matrices that get adapters: attention q, k, v, o; MLP in, gate, out."""

    # --- data ---
    held_out_fraction: float = 0.2
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
    base_lr: float = 1e-5
    """AdamW learning rate of what trains (every weight: about 1e-5; LoRA adapters: about 1e-4
    to 1e-3)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm before each step."""
    eval_every: int = 20
    """Steps between held-out evaluations (the last step is always evaluated)."""

    def __post_init__(self):
        check_at_least(self, ["epochs", "batch_size", "eval_every"])
        check_interval(self, ["held_out_fraction"], 0.0, 1.0, open_low=True, open_high=True)
        check_interval(self, ["label_smoothing"], 0.0, 0.5, open_high=True)
        check_positive(self, ["beta", "base_lr"])
        check_choice(self, "loss_type")
        if self.label_smoothing and self.loss_type == "ipo":
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' only.")
        RLHFArgs.check_trainable(self)  # the same four fields, checked the same way

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


def run_pairs(
    model: HookedTransformer, pairs: list[Preference], args: DPOArgs,
    trunks: TrunkCache | None = None,
) -> tuple[Float[Tensor, "batch seq d_vocab"], ResponseTokens]:
    """One forward pass over the chosen responses, then the rejected ones: logits and tokens.
    With `trunks`, only the blocks above the frozen trunk run."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = tokenize_responses(model, prompts, responses, args.prepend_bos)
    trunk = None if trunks is None else trunks(model, batch.tokens, batch.attention_mask)
    logits, _ = run_model(model, batch.tokens, batch.attention_mask, args.fast_path, trunk=trunk)
    return logits, batch


def get_pair_logprobs(
    model: HookedTransformer, pairs: list[Preference], args: DPOArgs,
    trunks: TrunkCache | None = None,
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """log pi(chosen | prompt) and log pi(rejected | prompt), from one forward pass over both."""
    logits, batch = run_pairs(model, pairs, args, trunks)
    logps = get_sequence_logprobs(logits, batch.tokens, batch.attention_mask, batch.response_mask)
    return logps[: len(pairs)], logps[len(pairs) :]


@torch.no_grad()
def get_response_kl(
    policy: HookedTransformer, reference: HookedTransformer, pairs: list[Preference],
    args: DPOArgs, trunks: TrunkCache | None = None,
) -> float:
    """KL(policy || reference) in nats per response token: the exact KL of the next-token
    distributions (`calc_exact_kl`) at every position that predicts a response token, chosen and
    rejected alike, averaged over all those positions of `pairs`. The contexts are the pairs' own
    texts, not the policy's samples: how far the policy has moved on the data it learns from.
    `reference` may be `policy` itself with LoRA adapters: it is run with them off."""
    total, count = 0.0, 0
    for start in range(0, len(pairs), args.batch_size):
        logits, batch = run_pairs(policy, pairs[start : start + args.batch_size], args, trunks)
        trunk = None if trunks is None else trunks(reference, batch.tokens, batch.attention_mask)
        with lora.adapters_off(reference):
            ref_logits, _ = run_model(reference, batch.tokens, batch.attention_mask,
                                      args.fast_path, trunk=trunk)
        # logits[:, s] predicts tokens[:, s+1], as in get_sequence_logprobs.
        counted = (batch.response_mask * batch.attention_mask)[:, 1:].bool()
        kl = calc_exact_kl(logits[:, :-1], ref_logits[:, :-1])
        total += float(kl[counted].sum())
        count += int(counted.sum())
    return total / count


@torch.no_grad()
def get_all_logprobs(
    model: HookedTransformer, pairs: list[Preference], args: DPOArgs,
    trunks: TrunkCache | None = None,
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """`get_pair_logprobs` of every pair, in minibatches, without gradient."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), args.batch_size):
        c, r = get_pair_logprobs(model, pairs[start : start + args.batch_size], args, trunks)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


@dataclass
class DPOSetup:
    """What `train_dpo` builds around the policy before the first step."""

    optimizer: torch.optim.AdamW
    reference: HookedTransformer
    """The starting policy, frozen: a copy sharing the frozen weights, or, with LoRA, the policy
    itself (always run under `lora.adapters_off`)."""
    trunks: TrunkCache | None
    """The frozen trunk's cached outputs (None: every block trains)."""


def set_up_dpo(policy: HookedTransformer, args: DPOArgs) -> DPOSetup:
    """Decide what trains (`models.prepare_policy`: every weight, the top blocks, or LoRA
    adapters), then the optimiser over exactly that, the reference, and the trunk cache."""
    n_frozen = prepare_policy(policy, args.trainable_layers, args.lora_rank, args.lora_alpha,
                              args.lora_targets)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.base_lr, weight_decay=args.weight_decay)
    reference = ReferenceModel(policy, fast_path=args.fast_path).model
    return DPOSetup(optimizer, reference,
                    TrunkCache(n_frozen, args.fast_path) if n_frozen else None)


def evaluate(
    policy: HookedTransformer, setup: DPOSetup, pairs: list[Preference],
    ref_logps: tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]], args: DPOArgs,
) -> dict[str, float]:
    """Loss, accuracy, margin, mean implicit rewards and the KL to the reference
    (`get_response_kl`) over every pair (no gradient)."""
    policy.eval()
    chosen, rejected = get_all_logprobs(policy, pairs, args, setup.trunks)
    out = calc_dpo_loss(chosen, rejected, *ref_logps, args.beta, args.loss_type,
                        args.label_smoothing)
    return {"loss": out.loss.item(), **calc_preference_metrics(out.chosen_rewards,
                                                               out.rejected_rewards),
            "kl": get_response_kl(policy, setup.reference, pairs, args, setup.trunks)}


def train_step(
    policy: HookedTransformer, setup: DPOSetup, mb_pairs: list[Preference],
    mb_ref_logps: tuple[Float[Tensor, " minibatch"], Float[Tensor, " minibatch"]],
    args: DPOArgs, loss_fn: Callable[..., Tensor] | None = None,
) -> dict[str, float]:
    """One AdamW step on the DPO loss (or `loss_fn`'s, see `train_dpo`) of a minibatch of pairs."""
    policy.train()
    chosen, rejected = get_pair_logprobs(policy, mb_pairs, args, setup.trunks)
    out = calc_dpo_loss(chosen, rejected, *mb_ref_logps, args.beta, args.loss_type,
                        args.label_smoothing)
    loss = out.loss if loss_fn is None else loss_fn(chosen, rejected, *mb_ref_logps, args.beta)
    if not torch.isfinite(loss):  # stop before the step writes NaN into every weight
        raise FloatingPointError(f"The DPO loss is {loss.item()} on a minibatch of "
                                 f"{len(mb_pairs)} pairs: lower --base-lr.")
    setup.optimizer.zero_grad()
    loss.backward()
    trainable = [p for group in setup.optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
    setup.optimizer.step()
    metrics = calc_preference_metrics(out.chosen_rewards, out.rejected_rewards)
    return {"train/loss": loss.item(), **{f"train/{k}": v for k, v in metrics.items()},
            "train/grad_norm": grad_norm.item()}


def get_reference_logprobs(
    setup: DPOSetup, splits: list[list[Preference]], args: DPOArgs
) -> list[tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]]:
    """(chosen, rejected) log-probs of every pair of each split under the reference."""
    with lora.adapters_off(setup.reference):
        return [get_all_logprobs(setup.reference, pairs, args, setup.trunks) for pairs in splits]


def train_dpo(
    policy: HookedTransformer,
    train: list[Preference],
    held_out: list[Preference],
    args: DPOArgs,
    console: Console | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    loss_fn: Callable[..., Tensor] | None = None,
    saved: dict | None = None,
    save: Callable[[dict], None] | None = None,
    save_every: int = 20,
    stop: Callable[[], int | None] | None = None,
) -> list[dict[str, float]]:
    """Train `policy` (in place) with DPO for `args.epochs`; return one metrics dict per step.
    What trains is `args`' choice (`set_up_dpo`: LoRA adapters stay attached to `policy`). The
    reference (the starting policy, frozen) scores every pair first, then the KL.

    Args:
        loss_fn: `(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
            ref_rejected_logps, beta) -> loss`, what each step minimises (notebook 8 passes the
            learner's own); None: `calc_dpo_loss` with `args.loss_type` and
            `args.label_smoothing`. The logged implicit rewards and the held-out loss are
            `calc_dpo_loss`'s either way.
        saved: a `get_dpo_state` to resume from (`policy` is still the starting policy, which
            the reference copies; it gets the saved weights after).
        save: called with `get_dpo_state` every `save_every` steps and after the last.
        stop: asked after each step; a signal number (see `record_steps`) stops the run.
    """
    setup = set_up_dpo(policy, args)
    refs = get_reference_logprobs(setup, [train, held_out], args)
    history = load_dpo_state(policy, setup.optimizer, saved) if saved is not None else []
    total = args.epochs * -(-len(train) // args.batch_size)
    after_step = record_steps(history, total, on_step, save, save_every,
                              lambda: get_dpo_state(policy, setup.optimizer, history), stop)
    run_dpo_epochs(policy, setup, (train, held_out), refs, args, loss_fn, console, after_step,
                   start_step=len(history))
    policy.eval()
    return history


def record_steps(
    history: list[dict[str, float]], total: int,
    on_step: Callable[[dict[str, float]], None] | None, save: Callable[[dict], None] | None,
    save_every: int, get_state: Callable[[], dict],
    stop: Callable[[], int | None] | None = None,
) -> Callable[[dict[str, float]], None]:
    """What runs after each step: its metrics appended to `history` and passed to `on_step`,
    and `save(get_state())` every `save_every` steps and after the last of `total`. When
    `stop()` returns a signal number (a SIGTERM or Ctrl-C the command line caught), the step is
    saved and the run ends with SystemExit(128 + signal), as a shell reports a signal."""

    def after_step(metrics: dict[str, float]):
        history.append(metrics)
        if on_step is not None:
            on_step(metrics)
        due = len(history) % save_every == 0 or len(history) == total
        signum = stop() if stop is not None else None
        if save is not None and (due or signum is not None):
            save(get_state())
        if signum is not None:
            raise SystemExit(128 + signum)

    return after_step


def run_dpo_epochs(
    policy: HookedTransformer, setup: DPOSetup, splits: tuple[list[Preference], list[Preference]],
    refs: list[tuple[Tensor, Tensor]], args: DPOArgs, loss_fn: Callable[..., Tensor] | None,
    console: Console | None, after_step: Callable[[dict[str, float]], None], start_step: int,
):
    """`run_pair_epochs` with DPO's pieces: a `train_step` on each minibatch of the training
    pairs (shuffled from `args.seed`), `evaluate` on the held-out pairs with their reference
    log-probs `refs` (training's, then held-out's)."""
    (train, held_out), (ref_train, ref_held_out) = splits, refs
    shuffler = random.Random(args.seed)
    run_pair_epochs(
        len(train), (args.epochs, args.batch_size, args.eval_every),
        lambda: shuffler.sample(range(len(train)), len(train)),
        lambda rows: train_step(policy, setup, [train[i] for i in rows],
                                (ref_train[0][rows], ref_train[1][rows]), args, loss_fn),
        lambda: evaluate(policy, setup, held_out, ref_held_out, args), "DPO", console,
        after_step, start_step=start_step,
    )


def get_dpo_state(policy: HookedTransformer, optimizer: torch.optim.Optimizer,
                  history: list[dict[str, float]]) -> dict:
    """What continues a DPO run: what trained (under "model", named as in a PPO checkpoint, so
    `minirlhf sample` and `export` read them alike; frozen weights, which the base model holds,
    are left out: `runtime.trained_state`), AdamW's state, and the metrics so far. The
    shuffles need no state: they are drawn again from the seed."""
    return {"model": {f"base_model.{name}": value
                      for name, value in get_trained_state(policy).items()},
            "optimizer": optimizer.state_dict(), "history": list(history),
            "phase": len(history), "global_step": len(history)}


def load_dpo_state(policy: HookedTransformer, optimizer: torch.optim.Optimizer,
                   saved: dict) -> list[dict[str, float]]:
    """Put a `get_dpo_state` back into `policy` (prepared as the run's was) and `optimizer`;
    returns its metrics so far."""
    load_trained_state(policy, {name.removeprefix("base_model."): value
                                for name, value in saved["model"].items()})
    optimizer.load_state_dict(saved["optimizer"])
    return list(saved["history"])
