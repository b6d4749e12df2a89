"""Every random stream a training run draws from, and their state as one dict.

A resumed run continues the same curve only if every stream is restored: Python's, NumPy's and
torch's global ones, and the run's own generators, one per use so that, say, evaluating on
held-out prompts never shifts the training samples:

    sample   the policy's samples (on the model's device; each data-parallel process its own)
    shuffle  the order of minibatches
    prompt   which training prompts each phase draws
    eval     the held-out samples (on the model's device)
"""

import random
import warnings

import numpy as np
import torch

STREAMS = ("sample", "shuffle", "prompt", "eval")


def set_seed(seed: int):
    """Seed Python's, NumPy's and torch's global random states."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RandomStreams:
    """The run's generators, seeded from `seed` (the sampler's from `sample_seed`, which differs
    between data-parallel processes), and the global random states with them.

    Args:
        seed: the run's seed (`RLHFArgs.seed`).
        sample_seed: the seed of this process's sampling stream.
        device: where the model runs; the sample and eval generators live there.
    """

    def __init__(self, seed: int, sample_seed: int, device: torch.device):
        self.seed = seed
        self.sample = torch.Generator(device=device).manual_seed(sample_seed)
        self.shuffle = torch.Generator().manual_seed(seed + 1)
        self.prompt = torch.Generator().manual_seed(seed + 2)
        self.eval = torch.Generator(device=device).manual_seed(seed + 3)

    def state_dict(self) -> dict:
        """Every state, global and the run's own."""
        state = {"python": random.getstate(), "numpy": np.random.get_state(),
                 "torch": torch.get_rng_state(),
                 **{name: getattr(self, name).get_state() for name in STREAMS}}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict):
        """Restore `state_dict()`. States are byte tensors that torch wants on the CPU, even for a
        CUDA generator. A device generator's state saved on another kind of device (CUDA vs CPU)
        has another size and cannot be restored: that stream is then reseeded, with a warning,
        so the run goes on, but not on the same curve."""
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"].cpu())
        for name in STREAMS:
            generator, saved = getattr(self, name), state[name].cpu()
            if saved.numel() == generator.get_state().numel():
                generator.set_state(saved)
            else:
                generator.manual_seed(self.seed + 1000 * (1 + STREAMS.index(name)))
                warnings.warn(f"The checkpoint's {name} stream is from another kind of device: "
                              "it was reseeded, so the run differs from an uninterrupted one.",
                              stacklevel=2)
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([cuda_state.cpu() for cuda_state in state["cuda"]])

