"""Judging a policy on held-out prompts: its mean reward, its sequence-level KL to the reference,
and how its answers read. A reward alone says little (a policy that repeats what a word-counting
judge pays for scores high); the field compares methods by reward against KL (the DPO paper's
IMDb frontier, Rafailov et al. 2023) with the answers' fluency beside it.

Above the pipeline (sampling, models, rewards, `fluency`), below the command line: `minirlhf
eval` (`cli.eval`) is a thin wrapper around `evaluate_policy`, which benchmarks call directly.

The KL is the exact one, summed over the vocabulary at each generated position
(`losses.calc_exact_kl`) and over each answer's real tokens: KL(policy || reference) of the whole
answer, the x-axis of a reward-vs-KL frontier. Both models' logits are divided by the sampling
temperature, as in training; top-k and top-p are not applied to them (nor are they in training).
"""

import contextlib
import dataclasses

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.args import RLHFArgs
from minirlhf.fluency import calc_logprob_per_token, get_fluency_metrics
from minirlhf.losses import calc_exact_kl, get_gen_logprobs
from minirlhf.models import generated_states, run_model
from minirlhf.prompts import Prompt, render_prompts
from minirlhf.rewards import RewardFn, get_rewards
from minirlhf.runtime import lora
from minirlhf.sampling import Samples, SamplingConfig, apply_temperature, get_samples


@dataclasses.dataclass
class EvalSettings:
    """How answers are sampled and how prompts are rendered: a run's own settings by default
    (`from_args`)."""

    gen_len: int = 20
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    prepend_bos: bool = True
    stop_at_eos: bool = False
    stop_string: str | None = None
    prompt_template: str | None = None
    chat_template: bool = False
    samples_per_prompt: int = 4
    """Answers sampled to each prompt."""
    batch_size: int = 32
    """Answers sampled (and scored) at once."""
    seed: int = 0

    def __post_init__(self):
        for name in ("gen_len", "samples_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")

    @classmethod
    def from_args(cls, args: RLHFArgs, **changes) -> "EvalSettings":
        """The settings a run trained with (`RLHFArgs`), with `changes` on top."""
        own = dict(gen_len=args.gen_len, prepend_bos=args.prepend_bos,
                   sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
                   stop_at_eos=args.stop_at_eos, stop_string=args.stop_string,
                   prompt_template=args.prompt_template, chat_template=args.chat_template)
        return cls(**own | changes)


@torch.no_grad()
def get_answer_logits(
    model: HookedTransformer, samples: Samples, temperature: float, adapters_off: bool = False
) -> Float[Tensor, "batch gen_len d_vocab"]:
    """The model's logits / temperature in the states that chose the generated tokens; with
    `adapters_off`, those of a LoRA policy's base model (the reference)."""
    with lora.adapters_off(model) if adapters_off else contextlib.nullcontext():
        logits, _ = run_model(model, samples.sample_ids, samples.attention_mask, True,
                              generated_states(samples.prefix_len))
    return apply_temperature(logits, temperature)


def score_answers(
    policy: HookedTransformer, reference: HookedTransformer, samples: Samples, temperature: float
) -> dict[str, list[float]]:
    """Per answer: its KL(policy || reference) summed over its real tokens, its number of real
    tokens, and its log-likelihood per token under the reference."""
    gen_tokens = samples.sample_ids[:, samples.prefix_len :]
    mask = samples.response_mask
    if mask is None:
        mask = torch.ones_like(gen_tokens)
    ref_logits = get_answer_logits(reference, samples, temperature, reference is policy)
    kl = calc_exact_kl(get_answer_logits(policy, samples, temperature), ref_logits)
    ref_logprobs = get_gen_logprobs(ref_logits, gen_tokens)
    return {"kl": torch.where(mask.bool(), kl, 0.0).sum(-1).tolist(),
            "length": mask.sum(-1).tolist(),
            "ref_logprob_per_token": calc_logprob_per_token(ref_logprobs, mask).tolist()}


def sample_and_score(
    policy: HookedTransformer, reference: HookedTransformer, records: list[Prompt],
    reward_fn: RewardFn, settings: EvalSettings,
) -> list[dict]:
    """One row per answer: `samples_per_prompt` answers to each record (adjacent), sampled
    `batch_size` at a time, with its prompt, reward, KL, length and reference log-likelihood."""
    rows = [record for record in records for _ in range(settings.samples_per_prompt)]
    texts = render_prompts(rows, settings.prompt_template, settings.chat_template,
                           policy.tokenizer)
    generator = torch.Generator(policy.cfg.device).manual_seed(settings.seed)
    answers = []
    for start in range(0, len(rows), settings.batch_size):
        chunk = slice(start, start + settings.batch_size)
        samples = get_samples(policy, texts[chunk], None, settings.gen_len, settings.sampling,
                              settings.prepend_bos, generator=generator,
                              stop_at_eos=settings.stop_at_eos, stop_string=settings.stop_string)
        rewards = get_rewards(reward_fn, samples.texts, "cpu", samples.prompts,
                              samples.responses, rows[chunk])
        scores = score_answers(policy, reference, samples, settings.sampling.temperature)
        answers += [{"prompt": prompt, "response": response, "reward": reward, **dict(zip(
                        scores, values))}
                    for prompt, response, reward, *values in zip(
                        samples.prompts, samples.responses, rewards.tolist(), *scores.values())]
    return answers


def evaluate_policy(
    policy: HookedTransformer, reference: HookedTransformer, records: list[Prompt],
    reward_fn: RewardFn, settings: EvalSettings | None = None,
) -> dict:
    """Sample answers to the prompt records and judge them: mean reward, sequence-level KL to
    the reference, fluency.

    Args:
        policy: the policy to judge (a LoRA run's adapters attached or merged).
        reference: the model the KL is measured against (the run's base model). Pass the policy
            itself for a LoRA policy with its adapters attached: they are turned off for it.
        records: the prompts (`prompts.load_prompt_split`'s held-out ones, say).

    Returns:
        A JSON-ready dict: "metrics" (floats: `reward_mean`, `reward_std`, `kl_per_answer`,
        `kl_per_token`, `ref_logprob_per_token`, `response_length`, and the fluency measures
        `distinct_1`, `distinct_2`, `repeated_3gram`), "answers" (one dict per answer), and the
        "settings".
    """
    settings = settings or EvalSettings()
    if not records:
        raise ValueError("evaluate_policy got no prompt records: give at least one.")
    answers = sample_and_score(policy, reference, records, reward_fn, settings)
    return {"metrics": summarise(answers), "answers": answers,
            "settings": dataclasses.asdict(settings) | {"num_prompts": len(records)}}


def summarise(answers: list[dict]) -> dict[str, float]:
    """The means over answers (the reference log-likelihood over those with a token)."""
    def column(key: str) -> Tensor:
        return torch.tensor([answer[key] for answer in answers], dtype=torch.float64)

    rewards, lengths = column("reward"), column("length")
    fluency = get_fluency_metrics([answer["response"] for answer in answers])
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(correction=0).item(),
            "kl_per_answer": column("kl").mean().item(),
            "kl_per_token": (column("kl").sum() / lengths.sum().clamp(min=1)).item(),
            "ref_logprob_per_token": column("ref_logprob_per_token").nanmean().item(),
            "response_length": lengths.mean().item(),
            **{key.removeprefix("fluency/"): value for key, value in fluency.items()},
            "num_answers": float(len(answers))}
