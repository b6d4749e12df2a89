"""`minirlhf.runtime.export`: exported folders, loaded by transformers, give the policy's logits.

The oracle is transformers itself: `AutoModelForCausalLM.from_pretrained(folder)` runs its own
GPT-2 and Llama code on the exported weights, and its logits must equal the HookedTransformer's
to 1e-4. The models are tiny and random, with every weight perturbed (norm scales, biases,
positions), so an export that dropped or mislaid any of them would show. Each way of getting the
conversion wrong is tried below and must be caught.
"""

import json
from pathlib import Path

import pytest
import torch
from einops import rearrange
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from minirlhf import cli
from minirlhf.models import prepare_policy
from minirlhf.runtime import export
from minirlhf.runtime.export import export_hf
from minirlhf.runtime.export_checks import ExportError
from minirlhf.runtime.loading import PRINTABLE_VOCAB, load_policy, load_tiny_model
from minirlhf.runtime.lora import adapters_off

ATOL = 1e-4
WRONG = 1e-3
"""A wrong export must miss by more than this (ten times the tolerance)."""


def perturb(model: HookedTransformer, seed: int = 0) -> HookedTransformer:
    """Every weight moved by noise, except the unembedding bias (set to zero: neither
    architecture has one), so norm scales are not 1 and biases are not 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(torch.zeros_like(param) if name == "unembed.b_U" else param + noise)
    return model


def make_gpt2(**overrides) -> HookedTransformer:
    """GPT-2 shaped: learned positions, LayerNorm, gelu_new MLP, GPT-2's tokenizer."""
    return perturb(load_tiny_model(n_layers=2, d_model=32, n_heads=4, n_ctx=32,
                                   d_vocab=PRINTABLE_VOCAB, **overrides))


def make_llama(adjacent_pairs: bool = False, seed: int = 1) -> HookedTransformer:
    """Llama shaped: rotary (base 5000), RMSNorm, gated SiLU MLP, 4 query heads sharing 2
    key-value heads, untied unembedding."""
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=101, n_ctx=32,
        act_fn="silu", normalization_type="RMS", final_rms=True, gated_mlp=True,
        positional_embedding_type="rotary", rotary_dim=8, rotary_base=5000,
        rotary_adjacent_pairs=adjacent_pairs, n_key_value_heads=2, seed=seed)
    return perturb(HookedTransformer(cfg), seed)


def get_logits(model: HookedTransformer, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The HookedTransformer's logits and transformers' logits on the exported folder."""
    tokens = torch.randint(model.cfg.d_vocab, (3, 20), generator=torch.Generator().manual_seed(0))
    hf_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(tokens), hf_model(tokens).logits


def max_logit_diff(model: HookedTransformer, folder: Path) -> float:
    ours, theirs = get_logits(model, folder)
    return float((ours - theirs).abs().max())


def max_logprob_diff(model: HookedTransformer, folder: Path) -> float:
    ours, theirs = get_logits(model, folder)
    return float((ours.log_softmax(-1) - theirs.log_softmax(-1)).abs().max())


MODELS = {"gpt2": make_gpt2, "gpt2, varying b_U": lambda: set_varying_unembed_bias(make_gpt2()),
          "llama": make_llama,
          "llama, GPT-J rotary pairs": lambda: make_llama(adjacent_pairs=True)}


@pytest.mark.parametrize("name", MODELS)
def test_exported_logits_match_transformers(name: str, tmp_path: Path):
    model = MODELS[name]()
    exported = export_hf(model, tmp_path)
    assert exported.architecture == name.split(",")[0]
    assert (tmp_path / "model.safetensors").is_file()
    assert max_logit_diff(model, tmp_path) < ATOL


def test_folded_and_centred_weights_keep_the_logits(tmp_path: Path):
    """As `HookedTransformer.from_pretrained` processes models: LayerNorm folded (LNPre, exported
    with weight 1, bias 0; the final norm's bias folded into b_U), writing weights and the
    unembedding centred. Centring W_U moves all logits of a position by the same amount, so the
    processed model keeps the original's log-softmax, not its logits; the export must then
    reproduce the processed model's logits."""
    model = make_gpt2()
    original = model(torch.arange(20)[None])
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert model.cfg.normalization_type == "LNPre"
    assert torch.allclose(model(torch.arange(20)[None]).log_softmax(-1),
                          original.log_softmax(-1), atol=ATOL)
    assert model.unembed.b_U.std() > 0.1  # the folded final bias, different for each token
    export_hf(model, tmp_path)
    assert max_logit_diff(model, tmp_path) < ATOL


def test_folded_rms_norm_exports_with_unit_weights(tmp_path: Path):
    model = make_llama()
    model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    assert model.cfg.normalization_type == "RMSPre"
    export_hf(model, tmp_path)
    assert max_logit_diff(model, tmp_path) < ATOL


def test_llama_without_biases_exports_a_plain_llama(tmp_path: Path):
    model = make_llama()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".b_" in name or "._b_" in name:
                param.zero_()
    export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert not config["attention_bias"] and not config["mlp_bias"]
    assert config["rope_parameters"]["rope_theta"] == 5000
    assert max_logit_diff(model, tmp_path) < ATOL


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_tokenizer_is_saved_with_the_model(prepend_bos: bool, tmp_path: Path):
    model = make_gpt2()
    exported = export_hf(model, tmp_path, prepend_bos=prepend_bos)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    bos = [50256] if prepend_bos else []
    assert tokenizer("Hello world")["input_ids"] == bos + [15496, 995]  # GPT-2's own ids
    assert "94" in exported.notes[0]  # the cut-down vocabulary is pointed out


def test_a_model_without_tokenizer_exports_its_weights_and_says_so(tmp_path: Path):
    model = make_llama()
    exported = export_hf(model, tmp_path)
    assert not list(tmp_path.glob("tokenizer*"))
    assert "no tokenizer" in exported.notes[0]


# ---------------------------------------------------------------- the unembedding bias


def test_a_constant_unembedding_bias_is_dropped_without_changing_logprobs(tmp_path: Path):
    model = make_llama()
    with torch.no_grad():
        model.unembed.b_U.fill_(0.7)
    export_hf(model, tmp_path)
    assert max_logit_diff(model, tmp_path) > 0.5  # every logit moved by 0.7 ...
    assert max_logprob_diff(model, tmp_path) < ATOL  # ... and no probability


def set_varying_unembed_bias(model: HookedTransformer) -> HookedTransformer:
    with torch.no_grad():
        model.unembed.b_U.copy_(torch.linspace(0, 0.05, model.cfg.d_vocab))
    return model


def test_gpt2_keeps_a_varying_unembedding_bias_exactly(tmp_path: Path):
    model = set_varying_unembed_bias(make_gpt2())
    assert export_hf(model, tmp_path).unembed_bias_dropped == 0
    assert max_logit_diff(model, tmp_path) < ATOL


def test_llama_refuses_a_varying_unembedding_bias_unless_told_to_drop_it(tmp_path: Path):
    model = set_varying_unembed_bias(make_llama())
    with pytest.raises(ExportError, match="unembed.b_U.*--drop-unembed-bias"):
        export_hf(model, tmp_path / "refused")
    exported = export_hf(model, tmp_path / "dropped", drop_unembed_bias=True)
    difference = max_logprob_diff(model, tmp_path / "dropped")
    # The refusal was needed (the log-probs do move), and the bound it states holds.
    assert ATOL < difference <= exported.unembed_bias_dropped + 1e-6


# ---------------------------------------------------------------- wrong exports are caught


def transposed_c_proj(state, cfg, layer):
    """Conv1D read as nn.Linear: the attention output projection transposed."""
    weights = GOOD["get_gpt2_block"](state, cfg, layer)
    name = f"transformer.h.{layer}.attn.c_proj.weight"
    return weights | {name: weights[name].T}


def heads_last(weight):
    """Q, K, V columns laid out dimension-major instead of head after head."""
    return rearrange(weight, "head d_model d_head -> d_model (d_head head)")


def unit_norms(state, tl_name, hf_name, d_model, with_bias):
    """Every norm exported as if folded: trained scales and biases lost."""
    weights = {f"{hf_name}.weight": torch.ones(d_model)}
    return weights | ({f"{hf_name}.bias": torch.zeros(d_model)} if with_bias else {})


def no_rotary_reorder(cfg):
    """GPT-J's adjacent rotary pairs exported as they are, into Llama's half pairing."""
    return torch.arange(cfg.d_head)


def b_in_on_up_proj(state, cfg, layer):
    """TransformerLens's gated-MLP b_in (added after the gate) put on up_proj (before it)."""
    weights = GOOD["get_llama_mlp"](state, cfg, layer)
    tl, hf = f"blocks.{layer}.mlp.", f"model.layers.{layer}.mlp."
    return weights | {f"{hf}up_proj.bias": state[f"{tl}b_in"],
                      f"{hf}down_proj.bias": state[f"{tl}b_out"]}


def dropped_unembed_bias(ln_f, W_U, b_U):
    """GPT-2's unembedding bias dropped instead of carried by the final LayerNorm."""
    return ln_f, W_U


def default_rope_theta(cfg, token_ids, attention_bias, mlp_bias):
    """Llama's default rotary base (10000) instead of the model's."""
    config = GOOD["get_llama_config"](cfg, token_ids, attention_bias, mlp_bias)
    config.rope_parameters["rope_theta"] = 10000.0
    return config


GOOD = {name: getattr(export, name) for name in
        ("get_gpt2_block", "get_llama_mlp", "get_llama_config")}
WRONG_EXPORTS = [
    ("gpt2", "get_gpt2_block", transposed_c_proj),
    ("gpt2", "heads_to_columns", heads_last),
    ("gpt2", "get_norm_weights", unit_norms),
    ("gpt2, varying b_U", "carry_unembed_bias_in_norm", dropped_unembed_bias),
    ("llama", "get_norm_weights", unit_norms),
    ("llama, GPT-J rotary pairs", "get_rotary_order", no_rotary_reorder),
    ("llama", "get_llama_mlp", b_in_on_up_proj),
    ("llama", "get_llama_config", default_rope_theta),
]


@pytest.mark.parametrize(("name", "function", "wrong"), WRONG_EXPORTS,
                         ids=[wrong.__name__ for _, _, wrong in WRONG_EXPORTS])
def test_a_wrong_export_is_caught(name: str, function: str, wrong, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch):
    model = MODELS[name]()
    monkeypatch.setattr(export, function, wrong)
    export_hf(model, tmp_path)
    assert max_logit_diff(model, tmp_path) > WRONG


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(("overrides", "field"), [
    (dict(normalization_type="RMS"), "cfg.normalization_type"),
    (dict(attn_only=True), "cfg.attn_only"),
    (dict(act_fn="solu_ln"), "cfg.act_fn"),
    (dict(positional_embedding_type="shortformer"), "cfg.positional_embedding_type"),
])
def test_unsupported_configs_are_refused_by_field(overrides: dict, field: str, tmp_path: Path):
    cfg = HookedTransformerConfig(**{**dict(n_layers=1, d_model=16, n_heads=2, d_head=8,
                                            d_mlp=32, d_vocab=50, n_ctx=16, act_fn="gelu_new"),
                                     **overrides})
    with pytest.raises(ExportError, match=field.replace(".", r"\.")):
        export_hf(HookedTransformer(cfg), tmp_path)
    assert not tmp_path.joinpath("config.json").exists()


# ---------------------------------------------------------------- minirlhf export


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory) -> Path:
    """One phase of the tiny-smoke preset (a GPT-2-shaped policy; its b_U has moved)."""
    out = tmp_path_factory.mktemp("ppo") / "run"
    cli.main(["train", "--preset", "tiny-smoke", "--table-every", "0", "--batch-size", "4",
              "--gen-len", "6", "--total-phases", "1", "--out", str(out)])
    return out


def get_trained_tiny(run: Path) -> HookedTransformer:
    """The run's policy, rebuilt by hand: the tiny model with the checkpoint's weights."""
    model = load_tiny_model()
    state = torch.load(run / "checkpoint.pt", weights_only=True)["trainer"]["model"]
    missing, unexpected = model.load_state_dict(
        {name.removeprefix("base_model."): value for name, value in state.items()
         if name.startswith("base_model.")}, strict=False)
    # The tiny model has no unembedding bias (all zeros): it stays frozen, and PPO checkpoints
    # leave frozen weights out (DPO's keep every weight).
    assert set(missing) <= {"unembed.b_U"} and not unexpected
    return model


def test_export_command_writes_the_trained_policy(ppo_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "hf"
    cli.main(["export", "--run", str(ppo_run), "--out", str(out)])
    assert "a gpt2 model" in capsys.readouterr().out
    trained = get_trained_tiny(ppo_run)
    assert max_logit_diff(trained, out) < ATOL
    # Not the untrained model: the checkpoint's weights were exported.
    assert max_logit_diff(load_tiny_model(), out) > WRONG
    assert AutoTokenizer.from_pretrained(out)("Hi")["input_ids"][0] == 50256  # prepend_bos


def test_export_command_guards_its_folder(ppo_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "hf"
    cli.main(["export", "--run", str(ppo_run), "--out", str(out)])
    with pytest.raises(SystemExit):
        cli.main(["export", "--run", str(ppo_run), "--out", str(out)])
    assert "--force" in capsys.readouterr().err
    (out / "stale.bin").write_text("from an older export")
    cli.main(["export", "--run", str(ppo_run), "--out", str(out), "--force"])
    assert not (out / "stale.bin").exists() and (out / "config.json").is_file()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(SystemExit):
        cli.main(["export", "--run", str(ppo_run), "--out", str(notes), "--force"])
    assert "does not look like a model folder" in capsys.readouterr().err
    assert (notes / "todo.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        cli.main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x")])
    assert "no run.json" in capsys.readouterr().err


def test_a_lora_run_exports_with_its_adapters_merged(tmp_path: Path):
    run = tmp_path / "lora"
    cli.main(["train", "--preset", "tiny-smoke", "--table-every", "0", "--batch-size", "4",
              "--gen-len", "6", "--total-phases", "1", "--lora-rank", "2", "--lora-alpha", "64",
              "--out", str(run)])
    # The oracle: the tiny model with the run's adapters, running them through its hooks.
    trained = load_tiny_model()
    prepare_policy(trained, lora_rank=2, lora_alpha=64.0)
    state = torch.load(run / "checkpoint.pt", weights_only=True)["trainer"]["model"]
    # A LoRA checkpoint holds the adapters, not the frozen base weights (the tiny model's own).
    _, unexpected = trained.load_state_dict({name.removeprefix("base_model."): value for name, value
                                             in state.items() if name.startswith("base_model.")},
                                            strict=False)
    assert not unexpected and any(".lora." in name for name in state)
    with pytest.raises(ExportError, match="merge_lora"):
        export_hf(trained, tmp_path / "unmerged")
    cli.main(["export", "--run", str(run), "--out", str(tmp_path / "hf")])
    assert max_logit_diff(trained, tmp_path / "hf") < ATOL
    with adapters_off(trained):  # the adapters did move the logits: they were merged in
        assert max_logit_diff(trained, tmp_path / "hf") > WRONG


def test_a_dpo_run_exports(tmp_path: Path):
    pairs = [{"prompt": "This is", "chosen": f" the{' e' * k}", "rejected": " a cat"}
             for k in range(1, 11)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run = tmp_path / "dpo"
    cli.main(["dpo", "--data", str(tmp_path / "prefs.jsonl"), "--out", str(run), "--base-model",
              "tiny", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3"])
    cli.main(["export", "--run", str(run), "--out", str(tmp_path / "hf")])
    assert max_logit_diff(get_trained_tiny(run), tmp_path / "hf") < ATOL
    assert max_logit_diff(load_tiny_model(), tmp_path / "hf") > WRONG


# ---------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_exports_to_a_llama_with_the_same_logits(tmp_path: Path):
    pytest.importorskip("gguf")
    try:
        model = load_policy("smollm2")
    except ImportError as error:
        pytest.skip(str(error))
    exported = export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert exported.architecture == "llama" and config["num_key_value_heads"] == 3
    assert not config["attention_bias"]  # as loaded: TransformerLens's zero biases left out
    tokens = model.to_tokens("This movie was a huge disappointment, and yet")
    # In float64: in float32, 30 layers summed in different orders leave logits (up to 31) 1e-4
    # apart (log-probs 7e-5), which hides nothing but leaves no margin under 1e-4.
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    with torch.no_grad():
        ours, theirs = model.to(torch.float64)(tokens), hf_model(tokens).logits
    assert (ours - theirs).abs().max() < ATOL
    # The exported tokenizer reads text as the policy did: <|endoftext|> (0) first.
    assert AutoTokenizer.from_pretrained(tmp_path)("This movie")["input_ids"] == [0, 1348, 7704]
