# %% [markdown]
# # 12. RL on an answer a program can check
#
# Until now the reward was a judgement: VADER's, a classifier's, a reward model's. Much of RL on
# language models today uses a reward that is a *program*: the answer to a sum, a unit test, a
# format. There is no reward model to over-optimise, but there is still a checker, and a policy
# will find whatever the checker pays for. This notebook runs the whole pipeline on such a task,
# small enough for a laptop: generate the task, measure the base model's pass rate, fine-tune it
# on demonstrations (SFT) until its pass rate sits where GRPO can learn, run GRPO, then swap in
# a loose checker and watch the policy game it.
#
# **What you will learn**
#
# - what makes a task checkable: a generator with a train / held-out split, an exact checker,
#   and demonstrations from the same source;
# - pass@1 and pass@k (and why pass@k needs an unbiased estimator);
# - the *competence band*: GRPO learns only from groups whose answers differ in reward, so a
#   model that always or never passes learns nothing; SFT moves it into the band;
# - how a loose checker is gamed, and what an exact one closes.
#
# **Reading**
#
# - Lambert et al. 2024, *Tulu 3* (arXiv:2411.15124): RL with verifiable rewards (RLVR).
# - Shao et al. 2024, *DeepSeekMath* (arXiv:2402.03300): GRPO.
# - Chen et al. 2021, *Evaluating Large Language Models Trained on Code* (arXiv:2107.03374):
#   pass@k and its unbiased estimator.
# - Pan et al. 2025, *TinyZero*: a 0.5B model "fails to learn reasoning" on Countdown.
# - This repository's `docs/tasks.md` and `docs/sft.md`.
#
# As before: labels, hints one at a time, the solution collapsed after each check.

# %%
import copy
import itertools
import math

import matplotlib.pyplot as plt
import torch
from jaxtyping import Float
from rich.console import Console
from torch import Tensor

from minirlhf import RLHFArgs, RLHFTrainer, exercises
from minirlhf.demonstrations import to_demonstrations
from minirlhf.sft import SFTArgs, SFTTrainer
from minirlhf.tasks import Problem, Task, get_task

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models gain nothing from more threads
QUIET = Console(quiet=True)

# %% [markdown]
# ## A task a program can check
#
# The task: three different letters from a to h, and the answer is the one that comes first in
# the alphabet. `"c,f,a:"` asks for `a`. Our model is the 94-character model of the earlier
# notebooks (one token per printable character, no end-of-text token), so an answer ends with a
# period, the way a chat answer ends with its end-of-turn token: what follows the first period
# is not part of the answer. The exact checker reads the answer alone.
#
# A `Task` (the library's, `minirlhf.tasks`) takes every problem the generator can ask, shuffles
# them with a seed and holds out a quarter of their *keys*, so no held-out problem is ever
# trained on. Each problem carries its own right answer for SFT.

# %%
LETTERS = "abcdefgh"


def make_min_letter_problems() -> list[Problem]:
    """Every ordered triple of different letters, its answer the smallest, e.g. "c,f,a:" -> a."""
    problems = []
    for triple in itertools.permutations(LETTERS, 3):
        answer = min(triple)
        problems.append(Problem(key="".join(triple), prompt=",".join(triple) + ":",
                                fields={"answer": answer}, demonstration=answer + "."))
    return problems


def get_answer(response: str) -> str:
    """The answer: the response up to its first period (what follows is after the end)."""
    return response.split(".")[0]


def check_min_letter(response: str, answer: str) -> float:
    """1.0 for the right letter alone, else 0.0."""
    return float(get_answer(response) == answer)


task = Task("min-letter", "the first of three letters in the alphabet", make_min_letter_problems,
            check_min_letter)
print(len(task.get_problems("train")), "train and", len(task.get_problems("held_out")),
      "held-out problems")
print(task.get_records("train", 3))
print(task.get_demonstrations("train", 3))
for response in ["a.", "a.zz", "ab.", "b.", "ba."]:
    print(f"{response!r:8} scores {task.check(response, answer='a')}")

# %% [markdown]
# ## Exercise 1: an exact checker for a sum
#
# The library's `add` task asks SmolLM2 "What is 47 + 38? Answer with the number only." Write
# the pass/fail core of its checker: 1.0 when the response, stripped of surrounding whitespace
# and of *one* final period, is exactly the answer's digits; 0.0 for anything else. Everything
# else is a way to game a looser checker: `84 85 86` lists candidates, `1859` hides the answer
# in another number, `085` and `+85` are not the number written as asked.
#
# Labels: difficulty 1, importance 5, 10 minutes
#
# Hint: compare strings, not numbers: `int("085") == 85`.
#
# Hint: `text.endswith(".")` then `text[:-1]` removes one period; `rstrip(".")` removes them all.
#
# Predict: Which of these does "the answer appears somewhere in the response" pay for: `84 85
# 86`, `The answer is 85.`, `1859`, `8 5`?
#
# Answer: The first three: each holds "85" somewhere. `8 5` does not contain the string "85".


# %%
def is_exact_sum(response: str, answer: str) -> float:
    """1.0 when the response is the answer alone (whitespace and one final period aside)."""
    # BEGIN SOLUTION
    text = response.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return float(text == answer)
    # END SOLUTION


# %%
exercises.check_is_exact_sum(is_exact_sum)

# %% [markdown]
# The shipped checker (`minirlhf.tasks.arithmetic.check_sum`) is this one plus the question's own
# sum written out (`47 + 38 = 85`, the form SmolLM2 answers in) and partial credit:

# %%
add = get_task("add")
for response in ["85", "47 + 38 = 85", "The answer is 85.", "84 85 86", "86", "40 + 45 = 85"]:
    print(f"{response!r:22} {add.check(response, answer='85', question='47 + 38')}")

# %% [markdown]
# ## The base model's pass rate
#
# `evaluate` answers each of 64 held-out prompts once greedily (pass@1) and 4 times by sampling
# (pass@4), as `minirlhf train --task` does every few phases (`RLHFTrainer.evaluate_held_out`).
# `eval/frac_reward_zero_std` is the share of prompts whose 4 sampled answers all scored the
# same: a GRPO group of them would teach nothing.


# %%
def evaluate(model, checker=check_min_letter) -> dict[str, float]:
    """Held-out pass@1 (greedy), pass@4, the share of sampled answers that pass, and the share
    of prompts whose 4 answers all scored the same."""
    scored = Task("min-letter", "", make_min_letter_problems, checker)
    args = RLHFArgs(batch_size=64, gen_len=4, held_out_max=64, eval_pass_k=4, prepend_bos=False,
                    device="cpu")
    trainer = RLHFTrainer(args, scored.reward_fn, base_model=copy.deepcopy(model), console=QUIET,
                          prompt_split=(scored.get_records("train"),
                                        scored.get_records("held_out")))
    metrics = trainer.evaluate_held_out()
    return {key.removeprefix("eval/"): round(value, 3) for key, value in metrics.items()}


base = exercises.load_char_model(n_layers=2, d_model=32, n_heads=2, seed=0)
print("base:", evaluate(base))

# %% [markdown]
# A random model never passes: every group scores all zeros, and GRPO's advantage (reward minus
# the group's mean) is zero for every sample. SmolLM2-135M-Instruct is in the same place on the
# string and format tasks (docs/tasks.md: pass@1 0.00 on `reverse`, `three-words`, `question`;
# it explains instead of answering). Before RL, the model has to answer in the right form
# *sometimes*.
#
# ## Exercise 2: pass@k
#
# With n answers to a prompt, c of which pass, pass@k is the chance that k answers drawn from
# them *without replacement* hold at least one pass. Write Chen et al.'s unbiased estimator.
#
# Labels: difficulty 2, importance 4, 10 minutes
#
# Hint: the chance that none of the k drawn passes is C(n - c, k) / C(n, k) (`math.comb`).
#
# Hint: when n - c < k every draw holds a pass; `math.comb(n - c, k)` is then 0, so the formula
# already gives 1.
#
# Predict: 8 answers, 2 pass. Is pass@4 more or less than 1 - (1 - 2/8)^4 = 0.68?
#
# Answer: More: 1 - C(6, 4) / C(8, 4) = 1 - 15/70 = 0.79. Without replacement, a failed draw
# makes the next one likelier to pass; the with-replacement formula is biased low.


# %%
def calc_pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt from n answers, c of which passed (1 <= k <= n)."""
    # BEGIN SOLUTION
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
    # END SOLUTION


# %%
exercises.check_calc_pass_at_k(calc_pass_at_k)

# %% [markdown]
# ## Exercise 3: the share of groups that teach nothing
#
# GRPO samples `group_size` answers to each prompt, one after the other: `rewards[0:4]` are the
# first prompt's with a group of 4. Write the share of groups whose rewards are all equal
# (TRL logs it as `frac_reward_zero_std`; so does minirlhf, as `charts/frac_reward_zero_std`).
#
# Labels: difficulty 1, importance 4, 5 minutes
#
# Hint: `rewards.view(-1, group_size)` has one row per prompt.
#
# Hint: a row has no spread when every entry equals its first: `(groups == groups[:, :1])`.


# %%
def get_zero_spread_share(rewards: Float[Tensor, " batch"], group_size: int) -> float:
    """The share of groups (adjacent group_size rewards) whose rewards are all equal."""
    # BEGIN SOLUTION
    groups = rewards.view(-1, group_size)
    return (groups == groups[:, :1]).all(dim=1).float().mean().item()
    # END SOLUTION


# %%
exercises.check_get_zero_spread_share(get_zero_spread_share)

# %% [markdown]
# ## SFT into the band
#
# Ten steps of supervised fine-tuning on 160 demonstrations (`"c,f,a:"` -> `"a."`), with the loss
# on the answer's tokens only (`minirlhf.sft`). Few steps on purpose: we want a model that passes
# *sometimes*, with room left for RL. A few seconds.

# %%
sft_model = copy.deepcopy(base)
sft_args = SFTArgs(epochs=1, batch_size=16, base_lr=3e-3, eval_every=10, held_out_max=32,
                   prepend_bos=False, append_eos=False)  # the period ends the answer
SFTTrainer(sft_model, to_demonstrations(task.get_demonstrations("train", 160)),
           to_demonstrations(task.get_demonstrations("held_out")), sft_args, QUIET).train()
after_sft = evaluate(sft_model)
print("SFT: ", after_sft)

# %% [markdown]
# Now some groups pass and some fail: a pass@1 between about 0.1 and 0.9 and a zero-spread
# share well below 1. That is the competence band.
#
# ## GRPO with the exact checker
#
# 30 phases of GRPO (groups of 8 answers to 8 prompts a phase) from the SFT model, which is also
# the reference of the KL penalty. About 10 seconds.


# %%
def run_grpo(checker, phases: int = 30) -> tuple[RLHFTrainer, list[dict]]:
    """GRPO from the SFT model, rewarded by `checker`."""
    rewarded = Task("min-letter", "", make_min_letter_problems, checker)
    args = RLHFArgs(batch_size=64, group_size=8, num_minibatches=2, gen_len=4,
                    advantage_estimator="grpo", total_phases=phases, base_lr=3e-3, head_lr=3e-3,
                    warmup_steps=0, kl_coef=0.01, eval_every=1000, held_out_max=32,
                    prepend_bos=False, device="cpu", seed=1)
    trainer = RLHFTrainer(args, rewarded.reward_fn, base_model=copy.deepcopy(sft_model),
                          console=QUIET, table_every=0,
                          prompt_split=(rewarded.get_records("train"),
                                        rewarded.get_records("held_out")))
    return trainer, trainer.train()


exact_trainer, exact_history = run_grpo(check_min_letter)
after_grpo = evaluate(exact_trainer.model.base_model)
print("SFT + GRPO:", after_grpo)

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot([h["charts/reward_mean"] for h in exact_history], label="mean reward (exact)")
ax.plot([h["charts/frac_reward_zero_std"] for h in exact_history], label="zero-spread share")
ax.set(xlabel="phase", ylim=(0, 1))
ax.legend()
plt.show()

# %% [markdown]
# ## A loose checker, gamed
#
# Now the checker most people write first: the answer appears somewhere in the response (before
# its end). Same SFT model, same GRPO. We score the trained policy with *both* checkers.


# %%
def check_loose(response: str, answer: str) -> float:
    """1.0 when the answer appears anywhere in the answer."""
    return float(answer in get_answer(response))


loose_trainer, loose_history = run_grpo(check_loose)
loose_policy = loose_trainer.model.base_model
print("loose reward, last phase:", round(loose_history[-1]["charts/reward_mean"], 2))
print("held-out, loose checker:", evaluate(loose_policy, check_loose))
print("held-out, exact checker:", evaluate(loose_policy))
prompts = task.get_records("held_out", 8)
samples = loose_trainer.sample(prompts, torch.Generator().manual_seed(0))
for record, response in zip(prompts, samples.responses):
    print(f"{record['prompt']} answer {record['answer']}: {response!r}")

# %% [markdown]
# Held out, the loose checker passes about 80% of the answers and the exact one almost none:
# the policy learnt to write several letters and no period, which nearly always include the
# smallest. Nothing in the loose checker says "one letter". The fix is the checker, not the
# policy: check the answer *alone* (the exact checker above), and test it on the ways it could
# be gamed, as
# `tests/test_tasks.py` does for every shipped task (lists, repeats, the answer inside another
# number or a sentence).
#
# Predict: with the exact checker, could the policy still game anything here?
#
# Answer: Not this checker: only the right letter, alone, passes. A format checker is weaker
# (`three-words` cannot judge meaning, so "blue green red" describes a lamp); that is why the
# shipped ones close the cheap ways to meet the format and are tested against them.
#
# ## Full size: SmolLM2-135M-Instruct
#
# The same pipeline on the shipped tasks, from the command line (minutes per stage on a CPU):
#
# ```bash
# minirlhf sft --task add --out runs/sft-add            # 32 steps, LoRA, the chat template
# minirlhf train --task add --base-model runs/sft-add --out runs/grpo-add
# python benchmarks/tasks.py --tasks add,reverse        # base / SFT / SFT + GRPO pass@1
# ```
#
# `sft --task` renders each prompt exactly as `train --task` does (SmolLM2's chat template, each
# answer ending with `<|im_end|>`), so GRPO starts from the very text SFT learnt, and the SFT
# model is GRPO's reference. docs/tasks.md has the measured table.
#
# ## Bonus: where to go from here
#
# None of these has a check. This is the end of the sequence.
#
# 1. **Out of the band the other way.** Train the SFT model for 100 steps. What happens to the
#    zero-spread share, and to what GRPO adds?
# 2. **Partial credit.** Give 0.25 to a response that is one letter of the prompt, but the
#    wrong one. Does GRPO learn faster from the SFT model? From the base model?
# 3. **A length penalty instead.** Keep the loose checker but subtract 0.1 per extra letter.
#    Is that enough to stop the listing? What is the policy's best strategy now?
# 4. **pass@k as the objective.** Reward a group when *any* answer passes. What happens to
#    pass@1?
