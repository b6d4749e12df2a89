"""Training a reward model on preference pairs, and normalising it on the policy's samples.

Sits on the reward model, the preferences and the sampler; the command line and the benchmarks
call `fit_reward_model`, the whole pipeline (make, train, normalise). Each step takes a minibatch
of pairs, scores chosen and rejected texts in one forward pass, and takes an AdamW step on the
pairwise loss (minimised). Every `eval_every` steps the held-out pairs are scored. Metric keys, as
in the PPO trainer, are namespaced:

    train/loss, train/accuracy, train/margin      the step's minibatch
    held_out/loss, held_out/accuracy, held_out/margin  every held-out pair (on evaluation steps)

Accuracy is the share of pairs where the chosen text scores above the rejected one; margin is
the mean of r_chosen - r_rejected. After training, `normalize_on_policy` fits the gain and bias
("The N Implementation Details of RLHF with PPO", Huang et al. 2024, detail 4).
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from rich.console import Console
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.pairs.preferences import Preference
from minirlhf.pairs.reward_model import (
    RewardModel,
    calc_pairwise_loss,
    calc_pairwise_metrics,
    fit_normalization,
    prepare_reward_model,
    score_texts,
)
from minirlhf.runtime import loading, lora
from minirlhf.runtime.trunk import TrunkCache
from minirlhf.sampling import get_samples
from minirlhf.tracking import make_progress
from minirlhf.validation import check_at_least, check_interval, check_positive


@dataclass
class RewardModelArgs:
    # --- run ---
    seed: int = 1
    """Seeds the head's initialisation, the held-out split and the minibatch shuffling."""
    device: str | None = None
    """"cuda", "mps" or "cpu"; None picks CUDA, else MPS, else CPU."""

    # --- model ---
    base_model: str = "tiny"
    """The trunk: "tiny", "smollm2", a folder or a TransformerLens name (usually the policy's)."""
    trainable_layers: int | None = 10
    """Train only the top this many blocks (plus final norm and head); None trains every one."""
    lora_rank: int = 0
    """With a rank >= 1, train LoRA adapters on `lora_targets` (in the top `trainable_layers`
    blocks when that is set), with the final norm and head; the base weights stay as they are
    and are not saved. 0: no LoRA."""
    lora_alpha: float = 16.0
    """LoRA's scale is lora_alpha / lora_rank."""
    lora_targets: str = "q,k,v,o,in,gate,out"
    """Comma-separated matrices that get adapters: attention q, k, v, o; MLP in, gate, out."""
    prepend_bos: bool = True
    """Put the model's BOS token before each text (as the policy's sampler does)."""
    append_end_token: bool = True
    """Put the end-of-text token after each text: the reward is read there."""

    # --- data ---
    held_out_fraction: float = 0.2
    """Share of the pairs kept out of training to measure accuracy."""
    use_margin: bool = True
    """Use the records' margins in the loss (records without one get none)."""

    # --- optimisation ---
    epochs: int = 4
    """Passes over the training pairs."""
    batch_size: int = 16
    """Pairs per step (each pair is two texts in the forward pass)."""
    base_lr: float = 1e-4
    """Learning rate of the trunk's trainable weights (1e-5 barely fit SmolLM2's top layers)."""
    head_lr: float = 1e-2
    """Learning rate of the freshly initialised reward head."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm before each step."""
    eval_every: int = 30
    """Steps between held-out evaluations (the last step is always evaluated)."""

    # --- normalisation ---
    normalize_samples: int = 64
    """Initial-policy samples the gain and bias are fitted on (0: no normalisation)."""
    normalize_prompt: str = "This movie was"
    """The prompt those samples continue (the PPO run's prefix)."""
    normalize_gen_len: int = 20
    """Tokens generated for those samples (the PPO run's gen_len)."""

    def __post_init__(self):
        check_at_least(self, ["epochs", "batch_size", "eval_every"])
        check_at_least(self, ["trainable_layers"], minimum=0, optional=True)
        check_interval(self, ["held_out_fraction"], 0.0, 1.0, open_low=True, open_high=True)
        check_positive(self, ["base_lr", "head_lr"])
        check_at_least(self, ["lora_rank"], minimum=0)
        check_positive(self, ["lora_alpha"])
        lora.parse_targets(self.lora_targets)
        if self.lora_rank and self.trainable_layers == 0:
            raise ValueError("lora_rank puts adapters on the trainable blocks, and "
                             "trainable_layers 0 leaves none: give at least 1, or lora_rank 0.")
        if self.normalize_samples == 1 or self.normalize_samples < 0:
            raise ValueError("normalize_samples must be 0 (off) or at least 2 (a std needs two), "
                             f"got {self.normalize_samples}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_reward_model(args: RewardModelArgs, device: loading.Device = "cpu") -> RewardModel:
    """A fresh reward model on `args.base_model`'s weights, its head seeded by `args.seed`."""
    base_model = loading.load_policy(args.base_model, device)
    torch.manual_seed(args.seed)
    return RewardModel(base_model, args.prepend_bos, args.append_end_token)


class TextScorer:
    """Scores texts with the reward model during training (texts in, rewards out). With the lower
    blocks frozen, their output is computed once per text (`TrunkCache`: they compute the same
    residual stream in every epoch) and each step runs only the trainable blocks on it.
    """

    def __init__(self, reward_model: RewardModel, frozen_layers: int):
        self.reward_model = reward_model
        # TransformerLens's own forward, as the reward model's blocks above run on it.
        self.trunks = TrunkCache(frozen_layers, fast_path=False) if frozen_layers else None

    def __call__(self, texts: list[str]) -> Float[Tensor, " batch"]:
        tokens, mask = self.reward_model.tokenize(texts)  # right-padded: row i is [0, length)
        if self.trunks is None:
            return self.reward_model(tokens, mask)
        trunk = self.trunks(self.reward_model.base_model, tokens, mask)
        return self.reward_model(trunk.residual, mask, start_at_layer=trunk.layer)


def score_pairs(
    score: Callable[[list[str]], Tensor], pairs: list[Preference]
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """Rewards of the chosen and rejected texts, from one forward pass over both."""
    rewards = score([p.chosen_text for p in pairs] + [p.rejected_text for p in pairs]).float()
    return rewards[: len(pairs)], rewards[len(pairs) :]


def get_margins(
    pairs: list[Preference], use_margin: bool, device: str | torch.device
) -> Float[Tensor, " batch"] | None:
    if not use_margin or all(p.margin is None for p in pairs):
        return None
    return torch.tensor([p.margin or 0.0 for p in pairs], device=device)


@torch.no_grad()
def evaluate(
    score: Callable[[list[str]], Tensor], pairs: list[Preference], args: RewardModelArgs
) -> dict[str, float]:
    """Loss, accuracy and mean margin over every pair, scored in batches without gradient.

    Args:
        score: texts -> rewards: a `TextScorer` (`TextScorer(reward_model, 0)` just tokenizes
            and runs the whole model).
    """
    chosen, rejected = [], []
    for start in range(0, len(pairs), 2 * args.batch_size):
        c, r = score_pairs(score, pairs[start : start + 2 * args.batch_size])
        chosen.append(c)
        rejected.append(r)
    chosen_rewards, rejected_rewards = torch.cat(chosen), torch.cat(rejected)
    margins = get_margins(pairs, args.use_margin, chosen_rewards.device)
    loss = calc_pairwise_loss(chosen_rewards, rejected_rewards, margins).item()
    return {"loss": loss, **calc_pairwise_metrics(chosen_rewards, rejected_rewards)}


def get_reward_optimizer(reward_model: RewardModel, args: RewardModelArgs) -> torch.optim.AdamW:
    """AdamW (minimising) with two groups: the trainable trunk at `base_lr`, the head at
    `head_lr`."""
    head = list(reward_model.reward_head.parameters())
    head_ids = {id(p) for p in head}
    trunk = [p for p in reward_model.parameters() if p.requires_grad and id(p) not in head_ids]
    return torch.optim.AdamW([{"params": trunk, "lr": args.base_lr}, {"params": head,
                              "lr": args.head_lr}], weight_decay=args.weight_decay)


def train_reward_model(
    reward_model: RewardModel,
    train: list[Preference],
    held_out: list[Preference],
    args: RewardModelArgs,
    console: Console | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    loss_fn: Callable[..., Tensor] | None = None,
) -> list[dict[str, float]]:
    """Train on the pairwise loss for `args.epochs`; return one metrics dict per step.

    Args:
        loss_fn: `(chosen_rewards, rejected_rewards, margins) -> loss`, the pairwise loss each
            step minimises (notebook 6 passes the learner's own); None: `calc_pairwise_loss`.
    """
    frozen_layers = prepare_reward_model(reward_model, args.trainable_layers, args.lora_rank,
                                         args.lora_alpha, args.lora_targets)
    score = TextScorer(reward_model, frozen_layers)
    optimizer = get_reward_optimizer(reward_model, args)
    generator = torch.Generator().manual_seed(args.seed)

    def evaluate_held_out() -> dict[str, float]:
        reward_model.eval()
        return evaluate(score, held_out, args)

    history = run_pair_epochs(
        len(train), (args.epochs, args.batch_size, args.eval_every),
        lambda: torch.randperm(len(train), generator=generator).tolist(),
        lambda rows: train_step(reward_model, score, optimizer, [train[i] for i in rows], args,
                                loss_fn),
        evaluate_held_out, "reward model", console, on_step,
    )
    reward_model.eval()
    return history


def run_pair_epochs(
    num_pairs: int,
    schedule: tuple[int, int, int],
    shuffle: Callable[[], list[int]],
    step_fn: Callable[[list[int]], dict[str, float]],
    evaluate_fn: Callable[[], dict[str, float]],
    label: str,
    console: Console | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    start_step: int = 0,
) -> list[dict[str, float]]:
    """The loop of every trainer on preference pairs (the reward model's, DPO's): with
    `schedule = (epochs, batch_size, eval_every)`, `epochs` shuffled passes in minibatches of
    `batch_size` pair indices, `step_fn` on each, held-out metrics (`evaluate_fn`) every
    `eval_every` steps and at the end, and a progress bar.

    A resumed run gives `start_step`: the shuffles of the epochs before it are drawn again and
    thrown away, so `shuffle` (seeded) gives each epoch the order it had, and the metrics of the
    steps from `start_step` on are returned."""
    epochs, batch_size, eval_every = schedule
    steps_per_epoch = -(-num_pairs // batch_size)
    total = epochs * steps_per_epoch
    history: list[dict[str, float]] = []
    order = replay_shuffles(shuffle, start_step, steps_per_epoch)
    progress = make_progress(label, console or Console())
    task = progress.add_task("", total=total, completed=start_step)
    with progress:
        for step in range(start_step, total):
            if step % steps_per_epoch == 0:
                order = shuffle()
            start = (step % steps_per_epoch) * batch_size
            metrics = step_fn(order[start : start + batch_size])
            metrics |= {"charts/step": step, "charts/epoch": step / steps_per_epoch}
            if (step + 1) % eval_every == 0 or step == total - 1:
                metrics |= {f"held_out/{k}": v for k, v in evaluate_fn().items()}
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
            progress.update(task, advance=1, description=describe_step(metrics))
    return history


def replay_shuffles(shuffle: Callable[[], list[int]], start_step: int,
                    steps_per_epoch: int) -> list[int]:
    """Draw again the shuffles a resumed run already used; returns the order of the epoch it
    resumes inside ([] when it resumes at an epoch's start, which draws its own)."""
    for _ in range(start_step // steps_per_epoch):
        shuffle()
    return shuffle() if start_step % steps_per_epoch else []


def describe_step(metrics: dict[str, float]) -> str:
    """The progress bar's line: the step's loss, and the held-out accuracy when measured."""
    shown = metrics.get("held_out/accuracy", metrics["train/accuracy"])
    return f"loss {metrics['train/loss']:.3f}  accuracy {shown:.2f}"


def train_step(
    reward_model: RewardModel, score: TextScorer, optimizer: torch.optim.Optimizer,
    mb_pairs: list[Preference], args: RewardModelArgs,
    loss_fn: Callable[..., Tensor] | None = None,
) -> dict[str, float]:
    """One AdamW step on the pairwise loss (`loss_fn`) of a minibatch of pairs."""
    reward_model.train()
    chosen, rejected = score_pairs(score, mb_pairs)
    loss = (loss_fn or calc_pairwise_loss)(chosen, rejected,
                                           get_margins(mb_pairs, args.use_margin, chosen.device))
    if not torch.isfinite(loss):  # stop before the step writes NaN into every weight
        raise FloatingPointError(
            f"The pairwise loss is {loss.item()} on a minibatch of {len(mb_pairs)} pairs (first: "
            f"{mb_pairs[0].chosen_text!r}): look for margins beyond float32's range (3.4e38) in "
            "the data, or lower --base-lr and --head-lr.")
    optimizer.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in reward_model.parameters() if p.requires_grad], args.max_grad_norm)
    optimizer.step()
    pair_metrics = calc_pairwise_metrics(chosen, rejected)
    return {"train/loss": loss.item(), "train/accuracy": pair_metrics["accuracy"],
            "train/margin": pair_metrics["margin"], "train/grad_norm": grad_norm.item()}


def normalize_on_policy(
    reward_model: RewardModel, policy, args: RewardModelArgs
) -> dict[str, float]:
    """Fit gain and bias so the rewards of the initial policy's samples have mean 0, std 1.

    The policy is sampled (seeded, with its own BOS default) with the PPO run's prompt and length;
    call this before PPO changes the policy. Returns the raw mean and std, the gain and the bias.
    """
    samples = get_samples(policy, args.normalize_prompt, batch_size=args.normalize_samples,
                          gen_len=args.normalize_gen_len, seed=args.seed,
                          prepend_bos=policy.cfg.default_prepend_bos).texts
    reward_model.set_normalization(1.0, 0.0)
    raw = score_texts(reward_model, samples)
    gain, bias = fit_normalization(raw)
    reward_model.set_normalization(gain, bias)
    return {"raw_mean": raw.mean().item(), "raw_std": raw.std(correction=0).item(),
            "gain": gain, "bias": bias}


@dataclass
class TrainedRewardModel:
    """What `fit_reward_model` returns: the trained, normalised model and how it got there."""

    reward_model: RewardModel
    history: list[dict[str, float]]
    """One metrics dict per step, as `train_reward_model` returns them."""
    normalization: dict[str, float]
    """`normalize_on_policy`'s raw mean and std, gain and bias (empty: not normalised)."""

    @property
    def final_held_out(self) -> dict[str, float]:
        """The `held_out/...` metrics of the last step (which is always evaluated)."""
        return {k: v for k, v in self.history[-1].items() if k.startswith("held_out/")}


def check_pairs_fit(reward_model: RewardModel, pairs: list[Preference]):
    """Refuse, before any training step, a pair whose text is longer than the model reads (it
    would otherwise stop training at the first minibatch holding it)."""
    n_ctx, tokenizer = reward_model.base_model.cfg.n_ctx, reward_model.base_model.tokenizer
    extra = int(reward_model.prepend_bos) + int(reward_model.append_end_token)
    for i, pair in enumerate(pairs):
        for side, text in [("chosen", pair.chosen_text), ("rejected", pair.rejected_text)]:
            length = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + extra
            if length > n_ctx:
                raise ValueError(
                    f"Preference pair {i + 1} ({side}; prompt {pair.prompt[:40]!r}) is {length} "
                    f"tokens as the reward model reads it, but the model reads at most {n_ctx}. "
                    "Shorten or drop that pair in the preference file.")


def fit_reward_model(
    train: list[Preference],
    held_out: list[Preference],
    args: RewardModelArgs,
    device: loading.Device = "cpu",
    policy: HookedTransformer | None = None,
    console: Console | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> TrainedRewardModel:
    """The reward-model pipeline: a fresh model on `args.base_model`, trained on the `train`
    pairs and evaluated on the `held_out` ones, then normalised on the initial policy's samples.

    Args:
        policy: the initial policy to normalise on; None loads `args.base_model` (not loaded at
            all when `args.normalize_samples` is 0).
        on_step: called with each step's metrics (to write them as they come).
    """
    reward_model = make_reward_model(args, device)
    check_pairs_fit(reward_model, train + held_out)
    history = train_reward_model(reward_model, train, held_out, args, console, on_step)
    normalization = {}
    if args.normalize_samples:
        policy = policy if policy is not None else loading.load_policy(args.base_model, device)
        normalization = normalize_on_policy(reward_model, policy, args)
    return TrainedRewardModel(reward_model, history, normalization)
