"""`RLHFArgs`: every hyperparameter of an RLHF-with-PPO run, in one serialisable dataclass.

Follows the `RLHFArgs` of the ARENA RLHF exercises with CleanRL's names. The reward
function is *not* a field: it is passed to `RLHFTrainer`, so that a config is plain data that
serialises to JSON, wandb and the command line.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from minirlhf.runtime.lora import parse_targets
from minirlhf.validation import (
    check_at_least,
    check_choice,
    check_interval,
    check_positive,
    check_weights,
)

CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
"""Advantage estimators without a value head."""
GROUPED = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
"""The estimators that compare the samples of one prompt with each other."""
KL_IN_REWARD = ("reinforce_pp", "reinforce_pp_baseline")
"""The estimators that read a per-token KL reward (`kl_in="reward"`)."""


@dataclass
class RLHFArgs:
    # --- run ---
    seed: int = 1
    """Seeds torch, the sampler and the minibatch shuffling."""
    device: str | None = None
    """"cuda", "mps" or "cpu"; None picks CUDA, else MPS, else CPU."""
    use_wandb: bool = False
    """Log metrics to Weights & Biases (imported only when this is set)."""
    wandb_project_name: str = "minirlhf"
    """wandb project to log to."""
    wandb_entity: str | None = None
    """wandb entity (team or user); None uses your default."""

    # --- macro-training ---
    total_phases: int = 100
    """Number of rollout + learning phases."""
    batch_size: int = 32
    """Samples generated per rollout phase: prompts_per_phase x group_size."""
    group_size: int = 1
    """Samples per prompt, adjacent in the batch (GRPO's G; at least 2 for grpo, dr_grpo, rloo)."""
    num_minibatches: int = 4
    """Minibatches the batch is split into on each pass of a learning phase."""
    batches_per_learning_phase: int = 2
    """Shuffled passes over the rollout batch per learning phase (PPO "epochs")."""

    # --- optimisation ---
    base_lr: float = 2e-5
    """Learning rate of the transformer's own weights."""
    head_lr: float = 5e-4
    """Learning rate of the freshly initialised value head."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm before each step."""
    warmup_steps: int = 20
    """Phases of linear LR warmup (the LR is never 0, not even in the first phase)."""
    final_scale: float = 0.1
    """LR multiplier reached by linear decay at the last phase."""

    # --- PPO objective coefficients ---
    clip_coef: float = 0.2
    """PPO's epsilon: the probability ratio is clipped to [1 - clip_coef, 1 + clip_coef]."""
    vf_coef: float = 0.15
    """Weight of the value-function loss (subtracted from the objective)."""
    ent_coef: float = 0.001
    """Weight of the entropy bonus (added to the objective)."""
    kl_coef: float = 2.5
    """Weight of the KL penalty against the reference model (subtracted from the objective); with
    kl_target, only its starting value."""

    # --- KL ---
    kl_estimator: Literal["exact", "k1", "k2", "k3", "k3_is"] = "exact"
    """"exact" (summed over the vocabulary) or a sampled estimator of Schulman 2020 (from the
    sampled tokens' log-probs only); "k3_is": k3 times the ratio to the sampling policy, whose
    gradient is the KL's (docs/critic_free.md). The exact KL is logged as charts/kl whichever."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL penalty goes: a term of the objective, or the per-token reward (REINFORCE++,
    advantage_estimator="reinforce_pp" or "reinforce_pp_baseline", only)."""
    kl_target: float | None = None
    """Target KL per sample (summed over its gen_len tokens) of the adaptive controller (Ziegler
    et al. 2019); None keeps kl_coef fixed."""
    kl_horizon: int = 10000
    """The adaptive controller's horizon, in samples: a smaller one adapts faster."""

    # --- advantages ---
    advantage_estimator: Literal["one_step", "gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                                 "reinforce_pp_baseline"] = "one_step"
    """With a value head: "one_step" (A_t = V(s_{t+1}) - V(s_t), as in the ARENA exercises) or
    "gae" (Schulman et al. 2016). Critic-free (no value head): "grpo", "dr_grpo", "rloo",
    "reinforce_pp", "reinforce_pp_baseline" (docs/critic_free.md)."""
    gamma: float = 1.0
    """Discount factor for GAE (1.0: an episode is one short completion)."""
    gae_lambda: float = 0.95
    """GAE's lambda: 0 gives the one-step estimate, 1 the Monte-Carlo one."""

    # --- model and sampling ---
    base_model: str = "tiny"
    """Policy to load: "tiny", "smollm2", a TransformerLens name like "gpt2", or a folder."""
    gen_len: int = 30
    """Tokens generated after the prompt."""
    temperature: float = 1.0
    """Sampling temperature; the PPO log-probs and KL use logits / temperature too."""
    top_k: int | None = None
    """Sample only from the k most likely tokens (None: no top-k; the ARENA exercises use 10)."""
    top_p: float | None = None
    """Nucleus sampling threshold (None: off)."""
    prefix: str = "This is"
    """The prompt every sample continues (when no `prompts` file is given)."""
    prompts: str | None = None
    """A prompt file (text, one per line, or JSONL with "prompt"), or "reviews" for the shipped
    film-review openings; each phase draws prompts_per_phase of its training prompts."""
    held_out_fraction: float = 0.1
    """Share of the `prompts` file held out from training, to measure over-fitting."""
    eval_every: int = 5
    """Score one sample of every held-out prompt every this many phases (and at the last)."""
    held_out_max: int = 256
    """Score at most this many held-out prompts (the first of the held-out split), in batches of
    batch_size, so a large prompt file cannot make evaluation take over the run."""
    eval_pass_k: int = 0
    """With k > 0, held-out evaluation also gives pass@1 (greedy) and pass@k (k sampled answers
    per prompt), a pass being a reward of at least 1 (a task checker's exact answer); 0: off."""
    prepend_bos: bool = True
    """Put the model's BOS token before the prompt."""

    # --- what trains ---
    trainable_layers: int | None = None
    """Train only the top this many blocks (and the final norm): the blocks below, the embedding
    and the unembedding are frozen, their output is computed once per phase and reused by every
    learning step, and the reference model shares them. None: every weight trains."""
    lora_rank: int = 0
    """With a rank >= 1, train LoRA adapters (Hu et al. 2021) on `lora_targets` instead of the
    weights themselves (only in the top `trainable_layers` blocks when that is set); the
    reference model is the policy with its adapters off. 0: no LoRA."""
    lora_alpha: float = 16.0
    """LoRA's scale is lora_alpha / lora_rank."""
    lora_targets: str = "q,k,v,o,in,gate,out"
    """Comma-separated matrices that get adapters: attention q, k, v, o; MLP in, gate, out."""

    # --- speed and memory ---
    fast_path: bool = True
    """Sample and train on minirlhf's fast path (`runtime.fast_path`: the same logits, weights
    laid out once); False, or a model with hooks attached, runs TransformerLens's own forward."""
    recompute_ref_logits: bool = False
    """Keep the reference model's final residual stream instead of its logits, and recompute the
    logits (the unembedding only) per minibatch: d_model instead of d_vocab floats per token."""
    activation_checkpointing: bool = False
    """Learning steps keep each block's input instead of every activation inside it and run the
    block again in the backward pass: less memory for about a fifth more learning time (fast
    path only; measured in docs/performance.md)."""
    return_freed_memory: bool = False
    """Have glibc's malloc give every block of 1 MiB or more its own mapping, returned to the
    system when freed: less peak memory, a fifth to a quarter more learning time
    (`runtime.allocator`). Process-wide, Linux (glibc) only."""
    keep_freed_memory: bool = False
    """The opposite: glibc's malloc serves every block from its heap and never trims it, so a
    step reuses the last one's pages instead of the kernel zeroing fresh ones: learning steps
    up to a fourteenth faster, the peak about a tenth higher (measured in docs/performance.md).
    Process-wide, Linux (glibc) only; neither setting: glibc's own behaviour."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """Forward passes in float32, or under bfloat16 autocast (log-softmaxes, the KL and every
    loss stay float32); "auto" picks bf16 where the hardware multiplies bfloat16 fast (a CUDA GPU
    with bf16, a CPU with AVX512-BF16 or AMX), else fp32."""

    # --- reward ---
    normalize_reward: bool = True
    """Scale each phase's rewards to mean 0, std 1 before computing advantages."""

    # --- answers that end (docs/answers.md) ---
    stop_at_eos: bool = False
    """End each answer at the model's EOS token (or `stop_string`); False: every answer has
    exactly gen_len tokens (fixed-length continuations)."""
    stop_string: str | None = None
    """With stop_at_eos, also end an answer once its text contains this string (e.g. "\n\n")."""
    prompt_template: str | None = None
    """Wrap each prompt in a template with "{prompt}", e.g. "Question: {prompt}\n\nAnswer:"."""
    chat_template: bool = False
    """Render each prompt as a user message with the tokenizer's own chat template."""
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    """How a per-token loss is averaged over answers of different lengths: over every real token
    (DAPO), per answer then over answers (GRPO), or summed and divided by a constant (Dr. GRPO)."""
    clip_coef_high: float | None = None
    """The upper clip of the ratio, 1 + clip_coef_high (DAPO's clip-higher); None: clip_coef."""
    truncation: Literal["keep", "mask", "penalty"] = "keep"
    """Answers that reach gen_len without ending: kept as they are, masked out of the loss
    (DAPO), or a soft length penalty over the last `overlong_buffer` tokens (DAPO)."""
    overlong_buffer: int = 4
    """With truncation="penalty": answers longer than gen_len - overlong_buffer lose up to 1
    reward, linearly, and a truncated answer loses 1."""
    drop_zero_spread: bool = False
    """Leave groups whose samples all got the same reward out of the loss (they are counted in
    charts/frac_reward_zero_std either way)."""

    # --- derived (set in __post_init__) ---
    minibatch_size: int = field(init=False)
    """batch_size // num_minibatches."""
    prompts_per_phase: int = field(init=False)
    """batch_size // group_size: prompts drawn per phase."""

    def __post_init__(self):
        check_at_least(self, ["total_phases", "batch_size", "num_minibatches",
                              "batches_per_learning_phase", "gen_len"])
        check_at_least(self, ["seed"], minimum=0)
        if self.batch_size % self.num_minibatches != 0:
            nearest = self.num_minibatches * max(1, self.batch_size // self.num_minibatches)
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by num_minibatches "
                f"({self.num_minibatches}), so every minibatch has the same size. Try "
                f"batch_size={nearest}."
            )
        if not 0 <= self.warmup_steps < self.total_phases:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be at least 0 and less than "
                f"total_phases ({self.total_phases}), or the LR never leaves warmup."
            )
        check_positive(self, ["temperature", "base_lr", "head_lr", "max_grad_norm", "clip_coef"])
        check_at_least(self, ["top_k"], optional=True)
        check_interval(self, ["top_p"], 0.0, 1.0, open_low=True, optional=True)
        check_interval(self, ["gamma", "gae_lambda", "final_scale"], 0.0, 1.0)
        check_weights(self, ["vf_coef", "ent_coef", "kl_coef"])
        check_choice(self, "advantage_estimator")
        check_choice(self, "precision")
        if self.keep_freed_memory and self.return_freed_memory:
            raise ValueError("keep_freed_memory (faster) and return_freed_memory (leaner) ask "
                             "glibc's malloc for opposite things: set one of them.")
        self.check_critic_free()
        self.check_trainable()
        self.check_answers()
        self.minibatch_size = self.batch_size // self.num_minibatches
        self.prompts_per_phase = self.batch_size // self.group_size

    @property
    def critic_free(self) -> bool:
        """True when the advantage estimator needs no value head."""
        return self.advantage_estimator in CRITIC_FREE

    def check_critic_free(self):
        """group_size, the KL options and the critic-free estimators agree."""
        check_at_least(self, ["group_size", "kl_horizon", "eval_every", "held_out_max"])
        check_interval(self, ["held_out_fraction"], 0.0, 1.0, open_high=True)
        check_at_least(self, ["eval_pass_k"], 0)
        check_choice(self, "kl_estimator")
        check_choice(self, "kl_in")
        check_positive(self, [] if self.kl_target is None else ["kl_target"])
        if self.batch_size % self.group_size != 0:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of group_size "
                             f"({self.group_size}): prompts_per_phase x group_size samples.")
        if self.advantage_estimator in GROUPED and self.group_size < 2:
            raise ValueError(
                f'advantage_estimator="{self.advantage_estimator}" compares the samples of one '
                f"prompt with each other, so it needs group_size >= 2 (got {self.group_size}); "
                "a group of one would be its own baseline and have advantage 0.")
        if self.kl_in == "reward" and self.advantage_estimator not in KL_IN_REWARD:
            raise ValueError('kl_in="reward" puts the KL into the per-token reward, which only '
                             'advantage_estimator="reinforce_pp" or "reinforce_pp_baseline" '
                             'reads; use kl_in="loss".')

    def check_answers(self):
        """The options of answers that end agree with each other."""
        check_choice(self, "loss_aggregation")
        check_choice(self, "truncation")
        check_positive(self, [] if self.clip_coef_high is None else ["clip_coef_high"])
        check_at_least(self, ["overlong_buffer"])
        if self.truncation != "keep" and not self.stop_at_eos:
            raise ValueError(f'truncation="{self.truncation}" acts on answers that never ended, '
                             "which needs answers that can end: set stop_at_eos=True.")
        if self.truncation == "penalty" and self.overlong_buffer >= self.gen_len:
            raise ValueError(f"overlong_buffer ({self.overlong_buffer}) must be less than gen_len "
                             f"({self.gen_len}).")
        if self.stop_string is not None and not (self.stop_string and self.stop_at_eos):
            raise ValueError("stop_string needs stop_at_eos=True and must not be empty.")
        if self.drop_zero_spread and self.group_size < 2:
            raise ValueError("drop_zero_spread compares the samples of a prompt: group_size >= 2.")
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError('prompt_template must contain "{prompt}", where the prompt goes.')

    def check_trainable(self):
        """trainable_layers and the LoRA fields make sense."""
        check_at_least(self, ["trainable_layers"], optional=True)
        check_at_least(self, ["lora_rank"], minimum=0)
        check_positive(self, ["lora_alpha"])
        parse_targets(self.lora_targets)

    def to_dict(self) -> dict:
        """Every field, derived ones included, as plain JSON-serialisable data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RLHFArgs":
        """The inverse of `to_dict` (derived fields are recomputed, not read)."""
        init_names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown RLHFArgs fields: {sorted(unknown)}.")
        return cls(**{k: v for k, v in values.items() if k in init_names})
