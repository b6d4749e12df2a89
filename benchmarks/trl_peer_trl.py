"""The TRL side of benchmarks/trl_peer.py: Hugging Face TRL's GRPOTrainer on the same job.

Runs in its own virtual environment (TRL is not a dependency of minirlhf), so it imports only
the standard library, torch, transformers, datasets, peft, TRL and vaderSentiment, never
minirlhf. benchmarks/trl_peer.py writes a job file (the model folder, the prompts in the order
minirlhf draws them, every hyperparameter) and reads back a result file:

    .bench/trl-venv/bin/python benchmarks/trl_peer_trl.py train JOB.json RESULT.json
    .bench/trl-venv/bin/python benchmarks/trl_peer_trl.py logprobs JOB.json RESULT.json

`train` times every generated batch (one generation of 32 samples and the optimiser steps taken
on it: a minirlhf "phase") and records its mean reward; with a `save_dir` in the job, it saves
the trained policy there as a plain Hugging Face folder (LoRA merged in) that minirlhf loads as
a base model, so benchmarks/frontier.py judges it as it judges its own. `logprobs` writes the
log-prob of every token of a few sentences, so the caller can check that both sides start from
the same weights.
"""

import json
import sys
import time
from importlib import metadata
from pathlib import Path

VERSIONS_OF = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "vaderSentiment")


def get_reward_texts(prompts: list[str], completions: list[str]) -> list[str]:
    """The texts the reward scores: prompt followed by completion, as minirlhf's samples are
    (`minirlhf.sampling.get_samples` returns each prompt's text plus its decoded continuation,
    and `make_vader_reward` scores that whole string)."""
    return [prompt + completion for prompt, completion in zip(prompts, completions)]


def vader_compound(texts: list[str]) -> list[float]:
    """VADER's compound score of each text, in [-1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]


def make_vader_reward(batch_means: list[float], direction: str = "pos"):
    """A TRL reward function (prompts, completions, **kwargs) -> rewards: the VADER compound of
    prompt + completion, negated for direction "neg" (as minirlhf's `make_vader_reward`). Each
    call (one per generated batch) appends its mean to `batch_means`."""
    if direction not in ("pos", "neg"):
        raise ValueError(f"direction must be 'pos' or 'neg', got {direction!r}")
    sign = 1.0 if direction == "pos" else -1.0

    def vader_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        rewards = [sign * r for r in vader_compound(get_reward_texts(prompts, completions))]
        batch_means.append(sum(rewards) / len(rewards))
        return rewards

    return vader_reward


def get_lr_scale(phase: int, warmup_steps: int, total_phases: int, final_scale: float) -> float:
    """The LR multiplier of a phase (0-based), as minirlhf's schedule gives it (written out here
    again, because this script must not import minirlhf): linear warmup from (0 + 1) /
    warmup_steps to 1, then linear decay to `final_scale` at the last phase."""
    if phase < warmup_steps:
        return (phase + 1) / warmup_steps
    decay_phases = max(1, total_phases - 1 - warmup_steps)
    progress = min(1.0, (phase - warmup_steps) / decay_phases)
    return 1.0 - (1.0 - final_scale) * progress


def get_versions() -> dict[str, str]:
    """The versions of the packages this side runs on, and Python's."""
    versions = {"python": sys.version.split()[0]}
    for name in VERSIONS_OF:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def load_model(job: dict):
    """The policy and tokenizer from the shared Hugging Face folder, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(job["model_dir"])


def write_logprobs(job: dict) -> dict:
    """The log-prob of every token after the first of each sentence (BOS as the tokenizer adds
    it), for the weights check."""
    import torch

    model, tokenizer = load_model(job)
    logprobs = []
    with torch.no_grad():
        for sentence in job["sentences"]:
            ids = torch.tensor([tokenizer(sentence)["input_ids"]])
            all_logprobs = model(ids).logits.float().log_softmax(-1)
            logprobs.append(all_logprobs[0, :-1].gather(-1, ids[0, 1:, None])[:, 0].tolist())
    return {"logprobs": logprobs, "versions": get_versions()}


def make_phase_timer(steps_per_phase: int, times: list[float], rewards: list[float]):
    """A TrainerCallback recording the wall seconds of each phase (`steps_per_phase` optimiser
    steps on one generated batch), the first counted from the start of training, and printing
    them with the phase's mean reward (which the reward function appended to `rewards`)."""
    from transformers import TrainerCallback

    class PhaseTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_phase == 0:
                now = time.perf_counter()
                times.append(now - self.last)
                self.last = now
                print(f"TRL phase {len(times) - 1}: {times[-1]:.1f} s, reward "
                      f"{rewards[len(times) - 1]:+.3f}", flush=True)

    return PhaseTimer()


def make_trainer_class():
    """GRPOTrainer with minirlhf's optimiser and schedule: AdamW (torch's defaults, weight decay
    0.01 on every trained weight, fused) over the trainable weights, and the LR scaled per phase
    by `get_lr_scale`. TRL's own would decay to 0 and skip decay on biases and norms."""
    import torch
    from trl import GRPOTrainer

    class MatchedGRPOTrainer(GRPOTrainer):
        job: dict = {}

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                trainable = [p for p in self.model.parameters() if p.requires_grad]
                self.optimizer = torch.optim.AdamW(trainable, lr=self.job["learning_rate"],
                                                   weight_decay=0.01, fused=True)
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                job = self.job

                def lr_lambda(step: int) -> float:
                    return get_lr_scale(step // job["steps_per_phase"], job["warmup_steps"],
                                        job["phases"], job["final_scale"])

                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lr_lambda)
            return self.lr_scheduler

    return MatchedGRPOTrainer


def get_config(job: dict, output_dir: Path):
    """GRPOConfig matching minirlhf's run (benchmarks/trl_peer.py says what differs)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir), use_cpu=True, bf16=False, fp16=False, seed=job["seed"],
        # GRPOConfig's default is True (recompute activations in the backward pass); minirlhf
        # keeps them, and so does TRL here.
        gradient_checkpointing=False,
        num_generations=job["group_size"],
        per_device_train_batch_size=job["minibatch_size"],  # one optimiser step's samples
        steps_per_generation=job["num_minibatches"],  # generation batch = 8 x 4 = 32 samples
        num_iterations=job["batches_per_learning_phase"],  # passes over each generated batch
        gradient_accumulation_steps=1, max_steps=job["phases"] * job["steps_per_phase"],
        max_completion_length=job["gen_len"], temperature=job["temperature"], top_k=0, top_p=1.0,
        learning_rate=job["learning_rate"], max_grad_norm=job["max_grad_norm"],
        beta=job["kl_coef"], epsilon=job["clip_coef"], entropy_coef=job["ent_coef"],
        loss_type="bnpo", scale_rewards="group", shuffle_dataset=False,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, log_level="error",
        dataloader_num_workers=0,
    )


def get_peft_config(job: dict):
    """PEFT LoRA on the same matrices of the same top blocks as minirlhf's, or None."""
    if not job.get("lora"):
        return None
    from peft import LoraConfig

    lora = job["lora"]
    return LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                      "gate_proj", "down_proj"],
                      layers_to_transform=lora["layers"], layers_pattern="layers",
                      task_type="CAUSAL_LM")


def save_policy(model, model_dir: str, save_dir: str):
    """The trained policy as a plain Hugging Face folder: a PEFT model's LoRA merged into its
    weights, and the tokenizer of `model_dir` as it was (TRL may change padding settings on
    the one it trains with)."""
    from transformers import AutoTokenizer

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(save_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(save_dir)


def train(job: dict) -> dict:
    """Run GRPOTrainer on the job; per phase: wall seconds and mean reward."""
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    model, tokenizer = load_model(job)
    phase_times, phase_rewards = [], []
    trainer_class = make_trainer_class()
    trainer_class.job = job
    trainer = trainer_class(
        model=model, processing_class=tokenizer,
        reward_funcs=make_vader_reward(phase_rewards, job["direction"]),
        args=get_config(job, Path(job["work_dir"])),
        train_dataset=Dataset.from_dict({"prompt": job["prompts"]}),
        callbacks=[make_phase_timer(job["steps_per_phase"], phase_times, phase_rewards)],
        peft_config=get_peft_config(job),
    )
    trainer.remove_callback(PrinterCallback)  # a dict per step; PhaseTimer prints per phase
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    start = time.perf_counter()
    trainer.train()
    wall_time = time.perf_counter() - start
    if job.get("save_dir"):
        save_policy(trainer.model, job["model_dir"], job["save_dir"])
    return {
        "versions": get_versions(), "threads": torch.get_num_threads(),
        "trainable_parameters": trainable, "wall_time_s": wall_time,
        "phase_time_s": phase_times, "reward_mean_per_phase": phase_rewards,
        "log_history": trainer.state.log_history,
    }


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("train", "logprobs"):
        sys.exit(f"usage: {sys.argv[0]} train|logprobs JOB.json RESULT.json")
    job = json.loads(Path(sys.argv[2]).read_text())
    result = train(job) if sys.argv[1] == "train" else write_logprobs(job)
    Path(sys.argv[3]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
