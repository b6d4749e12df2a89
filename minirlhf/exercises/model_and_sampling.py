"""Checks for notebook 1: the value head and the sampler.

Both run the learner's code on tiny random models. The value head is checked against an oracle
that reads the residual stream after the final layernorm from `run_with_cache` and applies the
learner's own head to it, so any head architecture passes as long as it is wired correctly. The
sampler is checked on what must hold for every draw (the prompt tokens, BOS, top-k) and, for the
temperature, on the frequencies of 1,000 first tokens against softmax(logits / T).
"""

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from minirlhf.exercises.core import describe_difference, load_char_model, passed, single_threaded
from minirlhf.exercises.reporting import call, crash_hint, describe_error, fail, learner_facing
from minirlhf.models import VALUE_HOOK, TransformerWithValueHead
from minirlhf.runtime.loading import load_tiny_model
from minirlhf.sampling import Samples, SamplingConfig, get_samples

# ---------------------------------------------------------------- the value head


@learner_facing
@single_threaded
def check_value_head(model_class: Callable[[HookedTransformer], nn.Module]) -> None:
    """Check a `TransformerWithValueHead`-like class: `model_class(base_model)` must have a
    `value_head` module and a `forward(tokens)` returning `(logits, values)`, with the values
    computed by the head from the residual stream after the final layernorm."""
    exercise = "TransformerWithValueHead"
    base_model = load_char_model(n_layers=2, d_model=16, n_heads=2, seed=1)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, base_model.cfg.d_vocab, (3, 7), generator=generator)
    case = "a 2-layer random model, tokens of shape (3, 7)"
    report = functools.partial(fail, exercise, case, **_value_head_case(base_model, tokens))
    _check_reference_value_head(base_model, tokens)
    model, error = call(model_class, {"base_model": base_model}, positional=True)
    if error is not None:
        hint = None
        if "before Module.__init__() call" in str(error):
            hint = "call super().__init__() first in __init__, before assigning any module."
        report(f"Building it failed. {describe_error(error)}", hint or crash_hint(error),
               error=error)
    head = _check_head(report, model, base_model.cfg.d_model)
    output, error = call(model, {"tokens": tokens}, positional=True)
    if error is not None:
        report(f"forward(tokens) failed. {describe_error(error)}", crash_hint(error),
               error=error)
    if not isinstance(output, tuple) or len(output) != 2:
        report(f"forward should return a tuple (logits, values), got {type(output).__name__}.")
    logits, values = output
    if values is None:
        report("forward returned values = None.", "did you forget `nonlocal values` in the "
               "hook function? Without it, the hook's assignment creates a local variable and "
               "the outer `values` stays None.")
    _check_value_head_outputs(report, base_model, head, tokens, logits, values)
    passed(exercise, "logits unchanged, values = value_head(ln_final.hook_normalized), "
           "gradients reach the head and the trunk")


def _check_head(report: Callable[..., None], model: nn.Module, d_model: int) -> nn.Module:
    """The value head: a registered submodule, the MLP the notebook prescribes (Linear(d_model,
    4 d_model), ReLU, Linear(4 d_model, 1); a single linear layer passes every other test, but
    fits values less well)."""
    head = getattr(model, "value_head", None)
    if not isinstance(head, nn.Module):
        report("It has no `value_head` attribute that is an nn.Module.",
               "store the head as `self.value_head = nn.Sequential(...)` in __init__.")
    shapes = [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, nn.Linear)]
    if shapes != [(d_model, 4 * d_model), (4 * d_model, 1)]:
        report(f"The value head's linear layers map {shapes} (in, out); expected "
               f"[({d_model}, {4 * d_model}), ({4 * d_model}, 1)].", "the head is an MLP: "
               "nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.ReLU(), nn.Linear(4 * d_model, "
               "1)). One linear layer can only fit values that are linear in the residual stream.")
    if not any(isinstance(m, nn.ReLU) for m in head.modules()):
        report("The value head has no ReLU between its linear layers.", "without a "
               "nonlinearity two linear layers are one: nn.Sequential(Linear, nn.ReLU(), Linear).")
    registered = {id(p) for p in model.parameters()}
    if not all(id(p) in registered for p in head.parameters()):
        report("The value head's parameters are not among model.parameters(), so the optimiser "
               "would never train them.", "the value head is not registered: assign the "
               "nn.Module to self.value_head (after super().__init__()), not to a list, dict or "
               "global.")
    return head


def _value_head_case(base_model: HookedTransformer, tokens: Tensor) -> dict:
    """`fail`'s keywords that record a value-head case and say how to re-run it."""
    inputs = "exercises.last_failure().inputs"
    return {"inputs": {"base_model": base_model, "tokens": tokens},
            "rerun": f'TransformerWithValueHead({inputs}["base_model"])({inputs}["tokens"])'}


def _value_oracle(base_model: HookedTransformer, head: nn.Module, tokens: Tensor, hook: str):
    _, cache = base_model.run_with_cache(tokens)
    return head(cache[hook]).squeeze(-1)


def _check_reference_value_head(base_model: HookedTransformer, tokens: Tensor) -> None:
    reference = TransformerWithValueHead(base_model)
    with torch.no_grad():
        logits, values = reference(tokens)
        oracle = _value_oracle(base_model, reference.value_head, tokens, VALUE_HOOK)
    assert describe_difference(base_model(tokens), logits) is None, "reference changed logits"
    assert describe_difference(oracle, values) is None, "reference values != oracle"


def _check_value_head_outputs(report: Callable[..., None], base_model: HookedTransformer,
                              head: nn.Module, tokens: Tensor, logits: Tensor, values: Tensor
                              ) -> None:
    batch, seq = tokens.shape
    with torch.no_grad():
        expected_logits = base_model(tokens)
    problem = describe_difference(expected_logits, logits, dims="batch, seq, d_vocab")
    if problem is not None:
        if describe_difference(expected_logits.log_softmax(-1), logits) is None:
            hint = "you returned log-probs (log_softmax); return the raw logits."
        else:
            hint = ("your hook changed the residual stream: a hook function that returns a "
                    "tensor replaces the activation. Store the values (nonlocal), return nothing.")
        report(f"The logits differ from the base model's. {problem}", hint)
    if isinstance(values, Tensor) and values.shape == (batch, seq, 1):
        report(f"values has shape {tuple(values.shape)}, expected ({batch}, {seq}).",
               "did you forget .squeeze(-1) on the value head's output?")
    with torch.no_grad():
        expected = _value_oracle(base_model, head, tokens, VALUE_HOOK)
        pre_ln = _value_oracle(base_model, head, tokens, f"blocks.{base_model.cfg.n_layers - 1}"
                               ".hook_resid_post")
    problem = describe_difference(expected, values, dims="batch, seq")
    if problem is not None:
        hint = None
        if describe_difference(pre_ln, values) is None:
            hint = ("you read the residual stream before the final layernorm; hook "
                    f"{VALUE_HOOK!r}, the vector the unembedding reads.")
        report(f"The values are not value_head({VALUE_HOOK}). {problem}", hint)
    _check_value_gradients(report, base_model, head, values)


def _check_value_gradients(report: Callable[..., None], base_model: HookedTransformer,
                           head: nn.Module, values: Tensor) -> None:
    """A loss on the values reaches the head and the (shared) trunk."""
    if not values.requires_grad:
        report("values has no gradient.",
               "did you compute the values under torch.no_grad() or .detach() them?")
    values.sum().backward()
    if any(p.grad is None for p in head.parameters()):
        report("The loss on the values sends no gradient to the value head.")
    if all(p.grad is None for p in base_model.parameters()):
        report("The loss on the values sends no gradient to the transformer.",
               "the trunk is shared: don't detach the residual stream before the value head.")
    base_model.zero_grad()


# ---------------------------------------------------------------- the sampler

SampleFn = Callable[..., tuple[Tensor, list[str]]]


def reference_get_samples(model: HookedTransformer, prompt: str | list[str],
                          batch_size: int | None = None, gen_len: int = 20,
                          temperature: float = 1.0, top_k: int | None = None,
                          prepend_bos: bool = True) -> Samples:
    """minirlhf's `get_samples` called with the exercise's arguments (temperature and top_k
    rather than a `SamplingConfig`)."""
    return get_samples(model, prompt, batch_size, gen_len, SamplingConfig(temperature, top_k),
                       prepend_bos)


def _sample(fn: SampleFn, model: HookedTransformer, **kwargs) -> tuple[Tensor, list[str]]:
    """Call the learner's sampler (keywords as in minirlhf.get_samples); check what it returns."""
    exercise = "get_samples"
    case = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    where = _where(model, kwargs)
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
        torch.manual_seed(0)
        result, error = call(lambda model, **kw: fn(model, **kw), {"model": model, **kwargs})
    if error is not None:
        fail(exercise, case, describe_error(error), crash_hint(error), error=error, **where)
    if not isinstance(result, tuple) or len(result) < 2:
        fail(exercise, case, "Return a tuple (sample_ids, samples): token ids and their texts.",
             **where)
    sample_ids, samples = result[0], result[1]
    batch_size, gen_len = kwargs["batch_size"], kwargs["gen_len"]
    prompt_len = model.to_tokens(kwargs["prompt"], prepend_bos=kwargs["prepend_bos"]).shape[1]
    expected = (batch_size, prompt_len + gen_len)
    if not isinstance(sample_ids, Tensor) or tuple(sample_ids.shape) != expected:
        shape = tuple(sample_ids.shape) if isinstance(sample_ids, Tensor) else type(sample_ids)
        hint = None
        if shape in [(batch_size, expected[1] + 1), (batch_size, expected[1] - 1)]:
            hint = "one token too many or too few: did you pass prepend_bos to model.to_tokens?"
        elif shape == (batch_size, gen_len):
            hint = "sample_ids should start with the prompt's tokens, then the generated ones."
        elif shape in [(prompt_len + gen_len,), (1, prompt_len + gen_len)]:
            hint = "did you tokenize the prompt once? Repeat the prompt batch_size times."
        fail(exercise, case, f"sample_ids should have shape {expected} = (batch, prompt tokens + "
             f"gen_len), got {shape}.", hint, **where)
    if len(samples) != batch_size or not all(isinstance(s, str) for s in samples):
        fail(exercise, case, f"samples should be a list of {batch_size} strings.", **where)
    if not all(kwargs["prompt"] in s for s in samples):
        fail(exercise, case, "Every text in samples should contain the prompt.",
             "decode the whole row (prompt + continuation), e.g. model.to_string(sample_ids).",
             **where)
    return sample_ids, samples


def _where(model: HookedTransformer, kwargs: dict) -> dict:
    """`fail`'s keywords that record a sampler case: the model by position, the rest by name."""
    return {"inputs": {"model": model, **kwargs}, "keywords": tuple(kwargs)}


def _greedy(model: HookedTransformer, prompt: str, gen_len: int) -> Tensor:
    """The greedy continuation (argmax at every step) of a prompt, without BOS."""
    tokens = model.to_tokens(prompt, prepend_bos=False)
    with torch.no_grad():
        for _ in range(gen_len):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[0]


def _check_prompt_tokens(fn: SampleFn, model: HookedTransformer) -> None:
    prompt_ids = model.to_tokens("This is", prepend_bos=False)[0]
    bos = model.tokenizer.bos_token_id
    for prepend_bos in (True, False):
        kwargs = dict(prompt="This is", batch_size=3, gen_len=4, temperature=1.0, top_k=None,
                      prepend_bos=prepend_bos)
        sample_ids, _ = _sample(fn, model, **kwargs)
        expected = torch.cat([torch.tensor([bos]), prompt_ids]) if prepend_bos else prompt_ids
        start = sample_ids[:, : len(expected)]
        if not (start == expected).all():
            fail("get_samples", f"prepend_bos={prepend_bos}", f"Rows should start with the "
                 f"prompt tokens {expected.tolist()}, got {start[0].tolist()}.",
                 "did you pass prepend_bos to model.to_tokens?", **_where(model, kwargs))


def _check_rows(fn: SampleFn, model: HookedTransformer) -> None:
    kwargs = dict(prompt="a", batch_size=8, gen_len=8, temperature=1.0, top_k=None,
                  prepend_bos=False)
    sample_ids, _ = _sample(fn, model, **kwargs)
    if (sample_ids == sample_ids[0]).all():
        hint = ("did you sample one row and repeat it? Repeat the prompt batch_size times, then "
                "sample every row.")
        if torch.equal(sample_ids[0], _greedy(model, "a", kwargs["gen_len"])):
            hint = ("every row is the greedy continuation: you took the most likely token "
                    "(argmax). Draw it instead: torch.multinomial(probs, num_samples=1).")
        fail("get_samples", "batch_size=8, gen_len=8, temperature=1.0", "Every row is the same.",
             hint, **_where(model, kwargs))


def _check_top_k(fn: SampleFn, model: HookedTransformer) -> None:
    for top_k in (1, 3):
        kwargs = dict(prompt="a", batch_size=64, gen_len=5, temperature=1.0, top_k=top_k,
                      prepend_bos=False)
        sample_ids, _ = _sample(fn, model, **kwargs)
        with torch.no_grad():
            logits = model(sample_ids)[:, :-1]
        chosen = logits.gather(-1, sample_ids[:, 1:, None]).squeeze(-1)
        kth_best = logits.topk(top_k, dim=-1).values[..., -1]
        outside = (chosen < kth_best - 1e-4)[:, -kwargs["gen_len"] :]
        if outside.any():
            row, col = (int(i) for i in outside.nonzero()[0])
            fail("get_samples", f"top_k={top_k}", f"Generated token {col} of row {row} is not "
                 f"among the {top_k} most likely tokens.",
                 "did you pass top_k on to the sampling step?", **_where(model, kwargs))
        if top_k == 1 and not (sample_ids == sample_ids[0]).all():
            fail("get_samples", "top_k=1", "With top_k=1 every row should be the greedy "
                 "continuation, but the rows differ.", **_where(model, kwargs))


def _check_temperature(fn: SampleFn, model: HookedTransformer, num_samples: int = 1000) -> None:
    """Frequencies of the first generated token against softmax(logits / T) for three T's.

    The three distributions are 0.4 to 0.8 apart in total variation; 1,000 samples land within
    about 0.05 of their own.
    """
    temperature = 0.5
    with torch.no_grad():
        logits = model(model.to_tokens("a", prepend_bos=False))[0, -1]
    kwargs = dict(prompt="a", batch_size=num_samples, gen_len=1, temperature=temperature,
                  top_k=None, prepend_bos=False)
    sample_ids, _ = _sample(fn, model, **kwargs)
    counts = torch.bincount(sample_ids[:, -1], minlength=logits.shape[-1]).float()
    frequencies = counts / counts.sum()

    def distance(temp: float) -> float:  # total variation distance
        return 0.5 * ((logits / temp).softmax(-1) - frequencies).abs().sum().item()

    distances = {temperature: distance(temperature), 1.0: distance(1.0), 2.0: distance(2.0)}
    best = min(distances, key=distances.get)
    if best == temperature and distances[best] < 0.1:
        return
    hints = {1.0: "the temperature seems to be ignored: sample from softmax(logits / "
                  "temperature).",
             2.0: "did you multiply the logits by the temperature instead of dividing?"}
    fail("get_samples", f"temperature={temperature}, {num_samples} samples of one token",
         f"The first tokens' frequencies are {distances[temperature]:.2f} (total variation) away "
         f"from softmax(logits / {temperature}), and {distances[best]:.2f} from "
         f"softmax(logits / {best}).", hints.get(best), **_where(model, kwargs))


@learner_facing
@single_threaded
def check_get_samples(fn: SampleFn) -> None:
    """Check a sampler `fn(model, prompt, batch_size, gen_len, temperature, top_k, prepend_bos)`
    returning `(sample_ids, samples)` (or minirlhf's `Samples`, whose first two fields these are).
    """
    gpt2_shaped = load_tiny_model(n_layers=1, d_model=16, n_heads=2, seed=0)
    model = load_char_model(n_layers=1, d_model=16, n_heads=2, seed=3)
    with torch.no_grad():  # sharpen its predictions, so that temperatures differ clearly
        model.unembed.W_U.mul_(2.0)
    for check in (lambda f: _check_prompt_tokens(f, gpt2_shaped), lambda f: _check_rows(f, model),
                  lambda f: _check_top_k(f, model), lambda f: _check_temperature(f, model)):
        check(reference_get_samples)  # the reference passes, or the check itself is wrong
        check(fn)
    passed("get_samples", "prompt and BOS tokens, top_k=1 and 3, and temperature 0.5 (first-token "
           "frequencies of 1,000 samples) match the reference's behaviour")
