"""The reward model: a HookedTransformer whose unembedding is replaced by a scalar reward head.

The stage before PPO in RLHF (Stiennon et al. 2020; Ouyang et al. 2022, InstructGPT). A language
model reads a text; instead of next-token logits, a linear head on the residual stream after the
final layernorm (`ln_final.hook_normalized`, the vector the unembedding would read) gives one
scalar per position, and the reward of the text is the scalar at its **last real token** (the
only position that has seen the whole text). It is trained on preference pairs with the pairwise
loss of Bradley & Terry (1952), optionally with Llama 2's margin (Touvron et al. 2023):

    loss = -log sigmoid(r_chosen - r_rejected - margin)

Then, as in "The N Implementation Details of RLHF with PPO" (Huang et al. 2024), a gain and a
bias are fitted so that its rewards have mean 0 and std 1 on samples of the initial policy, and
`make_reward_model_reward_fn` turns it into a batched reward function for `RLHFTrainer`.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from minirlhf.models import prepare_policy
from minirlhf.runtime import loading, lora
from minirlhf.runtime.hashing import sha256_of
from minirlhf.runtime.tied import untie_if_saved_apart
from minirlhf.runtime.tokens import tokenize_texts

REWARD_HOOK = "ln_final.hook_normalized"
CHECKPOINT_NAME = "reward_model.pt"
END_OF_TEXT = "<|endoftext|>"

# ---------------------------------------------------------------- the math (pure functions)


def get_last_token_index(attention_mask: Int[Tensor, "batch seq"]) -> Int[Tensor, " batch"]:
    """Position of each row's last real token (the last 1 of its attention mask).

    Works for right padding (the index is `length - 1`), left padding (`seq - 1`) and none. Every
    row needs at least one real token.
    """
    assert bool(attention_mask.any(dim=-1).all()), "a row of the attention mask has no real token"
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=-1)


def gather_last_token(
    rewards_per_position: Float[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"]
) -> Float[Tensor, " batch"]:
    """Each row's value at its last real token: the reward of the whole sequence."""
    index = get_last_token_index(attention_mask)
    return rewards_per_position.gather(1, index[:, None]).squeeze(1)


def calc_pairwise_loss(
    chosen_rewards: Float[Tensor, " batch"],
    rejected_rewards: Float[Tensor, " batch"],
    margin: Float[Tensor, " batch"] | None = None,
) -> Float[Tensor, ""]:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) over the pairs. Minimised.

    Written as softplus(-x) = log(1 + exp(-x)), which stays finite for any difference x. A
    margin asks the chosen reward to beat the rejected one by at least that much.
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return F.softplus(-difference).mean()


def calc_pairwise_metrics(
    chosen_rewards: Float[Tensor, " batch"], rejected_rewards: Float[Tensor, " batch"]
) -> dict[str, float]:
    """Accuracy (the share of pairs where chosen scores above rejected) and mean reward margin."""
    difference = (chosen_rewards - rejected_rewards).detach()
    return {"accuracy": (difference > 0).float().mean().item(), "margin": difference.mean().item()}


def fit_normalization(rewards: Float[Tensor, " batch"], eps: float = 1e-8) -> tuple[float, float]:
    """The (gain, bias) that map `rewards` to mean 0 and population std 1: gain * r + bias."""
    assert rewards.numel() > 1, "fitting a normalisation needs at least two rewards"
    gain = 1.0 / (rewards.std(correction=0).item() + eps)
    return gain, -rewards.mean().item() * gain


# ---------------------------------------------------------------- the model


class RewardModel(nn.Module):
    """A HookedTransformer trunk and a linear reward head on the final normalised residual.

    The unembedding is never computed. `forward` returns `gain * head(x_last) + bias`, where
    `x_last` is the normalised residual at each row's last real token; `gain` and `bias` start at
    1 and 0 (training sees raw rewards) and are set by `set_normalization` after training.

    Args:
        base_model: the trunk, usually the policy's own initial weights (`loading.load_policy`).
        prepend_bos: texts start with the model's BOS token, as the policy's samples do.
        append_end_token: texts end with the end-of-text token (`get_end_token_id`), so the
            reward is always read at the same token, one that has seen the whole text. On
            SmolLM2 this raised a linear probe's held-out accuracy on VADER pairs from 0.68 to 0.79.
    """

    def __init__(
        self, base_model: HookedTransformer, prepend_bos: bool = True, append_end_token: bool = True
    ):
        super().__init__()
        self.base_model = base_model
        self.prepend_bos = prepend_bos
        self.append_end_token = append_end_token
        self.reward_head = nn.Linear(base_model.cfg.d_model, 1).to(base_model.cfg.device)
        nn.init.normal_(self.reward_head.weight, std=1 / (base_model.cfg.d_model + 1) ** 0.5)
        nn.init.zeros_(self.reward_head.bias)
        self.register_buffer("gain", torch.tensor(1.0, device=base_model.cfg.device))
        self.register_buffer("bias", torch.tensor(0.0, device=base_model.cfg.device))

    def get_rewards_per_position(
        self,
        tokens: Int[Tensor, "batch seq"] | Float[Tensor, "batch seq d_model"],
        attention_mask: Int[Tensor, "batch seq"],
        start_at_layer: int | None = None,
    ) -> Float[Tensor, "batch seq"]:
        """The raw head output at every position (before gain and bias).

        Args:
            tokens: token ids, or with `start_at_layer` the residual stream entering that block
                (a frozen trunk's output, `runtime.trunk`: frozen lower layers need running
                only once).
        """
        rewards = None

        def read_head(final_residual: Float[Tensor, "batch seq d_model"], hook: HookPoint):
            nonlocal rewards
            head_input = final_residual.to(self.reward_head.weight.dtype)
            rewards = self.reward_head(head_input).squeeze(-1)

        # return_type=None: TransformerLens stops after ln_final, so no logits are computed.
        self.base_model.run_with_hooks(
            tokens, return_type=None, fwd_hooks=[(REWARD_HOOK, read_head)],
            attention_mask=attention_mask, start_at_layer=start_at_layer,
        )
        assert rewards is not None, f"the reward hook {REWARD_HOOK} did not run"
        return rewards

    def forward(
        self,
        tokens: Int[Tensor, "batch seq"] | Float[Tensor, "batch seq d_model"],
        attention_mask: Int[Tensor, "batch seq"],
        start_at_layer: int | None = None,
    ) -> Float[Tensor, " batch"]:
        """One reward per sequence: the (normalised) head output at its last real token."""
        per_position = self.get_rewards_per_position(tokens, attention_mask, start_at_layer)
        return self.gain * gather_last_token(per_position, attention_mask) + self.bias

    def set_normalization(self, gain: float, bias: float):
        self.gain.fill_(gain)
        self.bias.fill_(bias)

    def tokenize(
        self, texts: list[str], padding_side: Literal["left", "right"] = "right"
    ) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
        """Token ids and attention mask of texts, as this reward model reads them."""
        end = get_end_token_id(self.base_model) if self.append_end_token else None
        return tokenize_texts(self.base_model, texts, self.prepend_bos, end, padding_side)


def prepare_reward_model(
    reward_model: RewardModel, trainable_layers: int | None, lora_rank: int = 0,
    lora_alpha: float = 16.0, lora_targets: str = ",".join(lora.LORA_TARGETS),
) -> int:
    """Decide what of the reward model trains, through the policy's own `models.prepare_policy`
    (the `RewardModelArgs` fields of the same names); return how many blocks are frozen (the
    ones `TextScorer` runs once per text).

    trainable_layers None, or at least the model's depth: every block trains, and the embedding
    with them. The final norm and the reward head always train, LoRA or not: they read the
    residual stream the reward is computed from. Frozen layers get no gradient, so a backward
    pass stops at the lowest trainable block."""
    for param in reward_model.parameters():
        param.requires_grad_(True)
    if trainable_layers is not None and trainable_layers >= reward_model.base_model.cfg.n_layers:
        trainable_layers = None
    n_frozen = prepare_policy(reward_model.base_model, trainable_layers, lora_rank, lora_alpha,
                              lora_targets)
    for module in (reward_model.reward_head, reward_model.base_model.ln_final):
        module.requires_grad_(True)
    return n_frozen


# ---------------------------------------------------------------- texts in, rewards out


def get_end_token_id(model: HookedTransformer) -> int:
    """`<|endoftext|>` if the tokenizer has it (GPT-2, SmolLM2: the separator between pretraining
    documents), else its EOS token. (SmolLM2-Instruct's EOS, `<|im_end|>`, ends a chat turn.)"""
    tokenizer = model.tokenizer
    assert tokenizer is not None, "the reward model needs a tokenizer to read texts"
    if END_OF_TEXT in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    if tokenizer.eos_token_id is None:
        raise ValueError("This tokenizer has no end-of-text token: use append_end_token=False.")
    return tokenizer.eos_token_id


@torch.no_grad()
def score_texts(
    reward_model: RewardModel, texts: list[str], batch_size: int = 32
) -> Float[Tensor, " batch"]:
    """The reward model's reward of each text, in batches, with no gradient, on its device."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens, mask = reward_model.tokenize(texts[start : start + batch_size])
        chunks.append(reward_model(tokens, mask).float())
    return torch.cat(chunks)


def make_reward_model_reward_fn(
    reward_model: RewardModel, batch_size: int = 32
) -> Callable[[list[str]], Tensor]:
    """A reward function for `RLHFTrainer`: the (frozen) reward model's score of each sample."""
    reward_model.eval()
    for param in reward_model.parameters():
        param.requires_grad_(False)

    def reward_fn(samples: list[str]) -> Float[Tensor, " batch"]:
        return score_texts(reward_model, samples, batch_size)

    reward_fn.__name__ = "reward_model"
    return reward_fn


# ---------------------------------------------------------------- saving and loading


RECORD_NAME = "reward_model.json"
FORMAT = "minirlhf-reward-model-2"  # 1: no integrity record, missing weights not checked


class RewardModelError(ValueError):
    """A saved reward model that cannot be trusted; the message says what to do."""


def describe_lora(model: HookedTransformer) -> dict | None:
    """The model's LoRA adapters as the `lora.add_lora` arguments that attach them again (rank,
    alpha, targets, layers), or None when it has none."""
    adapters = lora.get_adapters(model)
    if adapters is None:
        return None
    keys = [key.split("_", 1) for key in adapters.adapters]
    first = next(iter(adapters.adapters.values()))
    return {"rank": first.A.shape[0], "alpha": first.alpha,
            "targets": [t for t in lora.LORA_TARGETS if any(t == k for _, k in keys)],
            "layers": sorted({int(layer) for layer, _ in keys})}


def attach_saved_lora(model: HookedTransformer, description: dict | None):
    """Attach the adapters `describe_lora` described (nothing for None), with fresh weights: the
    saved ones are loaded into them next."""
    if description:
        lora.add_lora(model, description["rank"], description["alpha"], description["targets"],
                      description["layers"])


def save_reward_model(reward_model: RewardModel, folder: str | Path, info: dict) -> Path:
    """Write `folder/reward_model.pt`, the trained weights only (frozen ones come from the base;
    a LoRA reward model's are its adapters, final norm and head), and `reward_model.json`:
    `info` with the adapters' `describe_lora` (loading attaches them again), the format, the
    file's size and SHA-256, and the names of the frozen weights left out (the only ones loading
    may find missing). Both are written under temporary names and renamed.

    Args:
        info: must hold "base_model" (the name `loading.load_policy` rebuilds the trunk from);
            anything else (metrics, config) is kept beside the weights.
    """
    assert "base_model" in info, "info needs the base_model to rebuild the trunk from"
    info = {**info, "prepend_bos": reward_model.prepend_bos,
            "append_end_token": reward_model.append_end_token,
            "lora": describe_lora(reward_model.base_model)}
    trained = {name for name, p in reward_model.named_parameters() if p.requires_grad}
    state = {name: tensor for name, tensor in reward_model.state_dict().items()
             if name in trained or name in ("gain", "bias")}
    path = Path(folder) / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    for target in (path, path.with_name(RECORD_NAME)):
        if target.is_symlink():
            raise RewardModelError(f"{target} is a symbolic link: remove it (its target is left "
                                   "alone); a reward model is never written through one.")
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"state_dict": state, "info": info}, tmp)
    record = {**info, "format": FORMAT, "bytes": tmp.stat().st_size, "sha256": sha256_of(tmp),
              "frozen": sorted(set(reward_model.state_dict()) - set(state))}
    tmp_json = path.with_name(RECORD_NAME + ".tmp")
    tmp_json.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    tmp_json.replace(path.with_name(RECORD_NAME))
    return path


def read_reward_record(folder: Path) -> dict:
    """`reward_model.json` of `folder`, checked against `reward_model.pt` (size, SHA-256).

    Raises:
        RewardModelError: naming the file and what is wrong (missing, another format, damaged).
    """
    path, record_path = folder / CHECKPOINT_NAME, folder / RECORD_NAME
    retrain = f"train it again with `minirlhf reward-model --out {folder} --force`"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as error:
        raise RewardModelError(f"{record_path} is missing or unreadable ({type(error).__name__}), "
                               f"so {path} cannot be checked: {retrain}.") from None
    found = record.get("format") if isinstance(record, dict) else None
    if found != FORMAT:
        raise RewardModelError(f"{path} is in the format {found or 'of an older minirlhf'}; "
                               f"this minirlhf reads {FORMAT} only: {retrain}.")
    if path.stat().st_size != record["bytes"] or sha256_of(path) != record["sha256"]:
        raise RewardModelError(f"{path} differs from the size and SHA-256 in {RECORD_NAME} "
                               f"(cut short, damaged or edited): {retrain}.")
    return record


def load_reward_model(
    folder: str | Path, device: loading.Device = "cpu"
) -> tuple[RewardModel, dict]:
    """The reward model saved in `folder` (its trunk rebuilt from the base model) and its info.

    Raises:
        FileNotFoundError: there is no reward_model.pt.
        RewardModelError: it fails its record, or lacks a weight that was not frozen.
    """
    folder = Path(folder)
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No reward model at {path}: train one with "
                                "`fit_reward_model` and `save_reward_model` (on the command "
                                "line: `minirlhf reward-model --data PREFS.jsonl --out FOLDER`).")
    record = read_reward_record(folder)
    saved = torch.load(path, map_location=device, weights_only=True)
    info = saved["info"]
    base_model = loading.load_policy(info["base_model"], device)
    attach_saved_lora(base_model, info.get("lora"))  # before loading: the adapters' weights
    untie_if_saved_apart(base_model, saved["state_dict"], prefix="base_model.")
    reward_model = RewardModel(base_model, info["prepend_bos"], info["append_end_token"])
    result = reward_model.load_state_dict(saved["state_dict"], strict=False)
    missing = sorted(set(result.missing_keys) - set(record["frozen"]))
    if result.unexpected_keys or missing:
        raise RewardModelError(f"{path} does not fit its model: missing {missing[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}: train it again.")
    reward_model.eval()
    return reward_model, info
