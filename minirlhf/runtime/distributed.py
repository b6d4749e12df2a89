"""Data-parallel training: several processes, one global batch, the result of one process.

Below the trainer (it knows only torch.distributed). Launched by torchrun, every process holds a
copy of the model and works on its share of each phase's global batch of `batch_size` samples:

- it samples its `batch_size / world_size` rows with its own random stream (`process_seed`);
- every statistic over the batch (reward normalisation, group statistics, advantages, the logged
  metrics) is taken over the global batch: each process gathers every process's rewards and a few
  per-token tensors (`gather_rows`; never logits), so each computes the same numbers;
- the per-minibatch advantage whitening uses the global minibatch's mean and std
  (`global_moments`);
- before each optimiser step the gradients are averaged over the processes (`average_gradients`:
  an explicit all-reduce rather than DistributedDataParallel; docs/distributed.md says why).

With one process (no torchrun, or `--nproc-per-node 1`) no process group is created and every
function here returns its input or does nothing: the trainer runs exactly its one-process code.
"""

import functools
import os
import re
from collections.abc import Callable, Iterable
from datetime import timedelta

import torch
import torch.distributed as dist
from jaxtyping import Float, Shaped
from torch import Tensor

BACKENDS = ("gloo", "nccl")
"""gloo runs on CPU tensors, NCCL on CUDA tensors (the fast one between GPUs)."""

SEED_STRIDE = 1_000_003
"""Process r samples from seed + r * SEED_STRIDE: far from the trainer's other seeds (seed + 1,
+ 2, + 3), and process 0 keeps the seed a one-process run samples from."""


DEFAULT_TIMEOUT_S = 600.0
"""How long a process waits for the others at a collective before giving up (gloo's own default
is 30 minutes, so one stalled process blocked the rest for half an hour)."""


class WorldSizeError(ValueError):
    """A checkpoint saved with another number of processes than this run has."""


class StalledProcessError(RuntimeError):
    """A process did not reach a meeting point of every process within the timeout."""


_MEETING: dict = {"group": None, "timeout_s": DEFAULT_TIMEOUT_S}
"""What `wait_for_others` meets on: a gloo group (NCCL has no monitored barrier) and its
timeout, set by `setup`."""


# ---- who am I ----

def get_world_size() -> int:
    """The number of processes training together (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    """This process's number, 0 .. world_size - 1 (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process is the one that prints, writes metrics, plots and checkpoints."""
    return get_rank() == 0


def launched_world_size() -> int:
    """How many processes torchrun started (its WORLD_SIZE), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_backend(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device: torch.device, backend: str | None = None,
          timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join torchrun's process group when it started several processes, and return this process's
    device: its own GPU (cuda:LOCAL_RANK) on CUDA. Without torchrun, or with one process, it does
    nothing and returns `device`. Calling it again (the trainer does) changes nothing.

    Args:
        backend: "gloo" or "nccl"; None picks NCCL on CUDA, gloo on the CPU.
        timeout_s: how long a collective waits for the other processes.
    """
    if launched_world_size() <= 1:
        return device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Data-parallel training runs on the CPU (gloo) or CUDA GPUs (NCCL), "
                         f"not on {device.type}: pass --device cpu or cuda.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = backend or pick_backend(device)
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}: choose one of {BACKENDS}.")
        if backend == "nccl" and device.type != "cuda":
            raise ValueError("NCCL moves CUDA tensors only: on the CPU use the gloo backend.")
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(backend, timeout=timeout)
        group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        _MEETING.update(group=group, timeout_s=timeout_s)
    return device


def shutdown():
    """Leave the process group (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _MEETING.update(group=None, timeout_s=DEFAULT_TIMEOUT_S)


def wait_for_others(where: str):
    """Every process waits here until all have arrived. Where work is uneven (sampling, the
    reward, a save), a process that stalls or dies shows up here: process 0 names it after the
    timeout (gloo's monitored barrier) instead of every process blocking. One process: nothing.

    Raises:
        StalledProcessError: a process did not arrive within `setup`'s timeout.
    """
    if get_world_size() == 1:
        return
    try:
        dist.monitored_barrier(_MEETING["group"], timedelta(seconds=_MEETING["timeout_s"]),
                               wait_all_ranks=True)
    except RuntimeError as error:
        late = re.search(r"[Rr]anks? ([\d, ]+) failed", str(error))
        raise stalled(where, f"process {late.group(1).strip()}" if late else None) from error


def stalled(where: str, who: str | None = None) -> StalledProcessError:
    """The error for a process that did not reach `where` in time; `who` defaults to the other
    process (two processes) or "one of processes ..."."""
    if who is None:
        others = [str(rank) for rank in range(get_world_size()) if rank != get_rank()]
        who = f"process{'es' if len(others) > 1 else ''} {', '.join(others)}"
        who = who if len(others) == 1 else f"one of {who}"
    return StalledProcessError(
        f"{who} did not reach {where} within {_MEETING['timeout_s']:.0f} s (seen by process "
        f"{get_rank()}): it stalled or died; its own error, if any, is above. Raise the "
        f"wait with --collective-timeout if a step is just slow.")


def names_a_stall(where: str) -> Callable:
    """Decorate a collective so that its timeout (another process stalled or died before
    joining it) raises `StalledProcessError` naming `where`, not gloo's bare timeout."""
    def decorate(collective: Callable) -> Callable:
        @functools.wraps(collective)
        def wrapper(*args, **kwargs):
            try:
                return collective(*args, **kwargs)
            except RuntimeError as error:
                if not re.search(r"[Tt]imed out|[Cc]onnection closed|[Cc]onnection reset",
                                 str(error)):
                    raise
                raise stalled(where) from error
        return wrapper
    return decorate


@names_a_stall("the check for a stop")
def any_process(flag: bool) -> bool:
    """Whether `flag` is true in any process (every process gets the same answer)."""
    if get_world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def process_seed(seed: int) -> int:
    """The seed of this process's own sampling stream (process 0: `seed` itself)."""
    return seed + SEED_STRIDE * get_rank()


def local_rows(global_batch: int) -> slice:
    """This process's rows of a global batch: process r holds rows r * B / N .. (r + 1) * B / N.
    One process: all of them."""
    share = global_batch // get_world_size()
    return slice(get_rank() * share, (get_rank() + 1) * share)


# ---- statistics over the global batch ----

@names_a_stall("a gather of the batch's rows")
def gather_rows(rows: Shaped[Tensor, "batch ..."]) -> Shaped[Tensor, "global_batch ..."]:
    """Every process's rows, in process order (every process passes the same shape), so each
    process holds the global batch. One process: `rows` itself."""
    world_size = get_world_size()
    if world_size == 1:
        return rows
    parts = [torch.empty_like(rows) for _ in range(world_size)]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


@names_a_stall("a gather of the batch's texts")
def gather_objects(items: list) -> list:
    """Every process's list (of strings, say) joined in process order. One process: `items`."""
    if get_world_size() == 1:
        return items
    parts = [None] * get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


@names_a_stall("the whitening of a minibatch")
def global_moments(
    values: Float[Tensor, "*batch"], mask: Tensor | None = None,
) -> tuple[Float[Tensor, ""], Float[Tensor, ""]] | None:
    """The mean and population std of `values` (those where `mask` is 1, if given) joined over
    every process, in two passes as a one-process mean and std would be. One process: None, for
    "use your own"."""
    if get_world_size() == 1:
        return None
    if mask is not None:
        values = values[mask.bool()]
    sums = torch.stack([values.sum(), torch.tensor(values.numel(), dtype=values.dtype,
                                                   device=values.device)])
    dist.all_reduce(sums)
    mean = sums[0] / sums[1]
    squares = (values - mean).pow(2).sum()
    dist.all_reduce(squares)
    return mean, (squares / sums[1]).sqrt()


@names_a_stall("the averaging of the metrics")
def mean_over_processes(metrics: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the processes: a mean over equal-sized shares is the global
    mean. One process: `metrics` itself."""
    if get_world_size() == 1:
        return metrics
    values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=collective_device())
    dist.all_reduce(values)
    return dict(zip(metrics, (values / get_world_size()).tolist()))


def collective_device() -> torch.device:
    """Where small tensors made for a collective must live: this GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- gradients and weights ----

@names_a_stall("the gradient average of a learning step")
def average_gradients(parameters: Iterable[torch.nn.Parameter]):
    """Replace each gradient by its mean over the processes: the gradient of the global
    minibatch's loss, since each process's loss is a mean over an equal share of it. Parameters
    without a gradient (frozen ones) are skipped, alike in every process. One process: nothing."""
    world_size = get_world_size()
    if world_size == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([grad.flatten() for grad in grads])  # one message, not one per tensor
    dist.all_reduce(flat)
    flat /= world_size
    for grad, averaged in zip(grads, flat.split([grad.numel() for grad in grads])):
        grad.copy_(averaged.view_as(grad))


@names_a_stall("the copying of process 0's weights")
def broadcast_module(module: torch.nn.Module):
    """Give every process process 0's weights and buffers, so all start from the same model
    whatever each loaded. One process: nothing."""
    if get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


# ---- checkpoints ----

@names_a_stall("a gather of the random states for a save")
def per_process(state: dict) -> dict | list:
    """What a checkpoint keeps of state that differs between processes (random streams): one
    process's `state` as it is; with several, every process's, in process order. (A bare `list`
    hint: a runtime checker that samples an item of a `list[dict]` draws from Python's random
    stream, the very state being saved.)"""
    if get_world_size() == 1:
        return state
    parts = [None] * get_world_size()
    dist.all_gather_object(parts, state)
    return parts


def own_part(saved: dict | list) -> dict:
    """This process's part of what `per_process` saved."""
    return saved[get_rank()] if isinstance(saved, list) else saved


def check_world_size(saved_world_size: int):
    """Refuse a checkpoint saved by another number of processes: the split of each batch, the
    minibatches and every process's random stream depend on it, so the curve could not go on."""
    world_size = get_world_size()
    if saved_world_size == world_size:
        return
    raise WorldSizeError(
        f"This checkpoint was saved by a run of {saved_world_size} process(es), and this run has "
        f"{world_size}: resume it with the same number, e.g. `torchrun --nproc-per-node "
        f"{saved_world_size} -m minirlhf train ... --resume` "
        f"({'or without torchrun' if saved_world_size == 1 else 'on as many processes'}).")


def get_local_batch_size(batch_size: int, num_minibatches: int, group_size: int,
                         world_size: int) -> int:
    """This process's share of the batch, batch_size / world_size, after checking that every
    process gets whole minibatches and whole groups of samples."""
    if batch_size % (world_size * num_minibatches):
        raise ValueError(
            f"batch_size ({batch_size}) must be divisible by the number of processes "
            f"({world_size}) times num_minibatches ({num_minibatches}), so every process "
            "holds an equal share of every minibatch.")
    if (batch_size // world_size) % group_size:
        raise ValueError(
            f"Each of the {world_size} processes samples batch_size / {world_size} = "
            f"{batch_size // world_size} rows, which must be whole groups of group_size "
            f"({group_size}): a prompt's samples stay in one process.")
    return batch_size // world_size
