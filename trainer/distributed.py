"""Data-parallel training across processes, GPUs and nodes, through torch.distributed.

The reward-model fit (trainer/reward.py `fit`) and PPO (trainer/ppo.py `train`) split
each optimiser step's global batch across the processes of a torchrun launch, sum
their gradients with one all-reduce, and take the same optimiser step everywhere, so
every process holds the same weights and the result is the single-process one (up
to the order of floating-point sums). Batch sizes stay global: `--reward-batch-size`
and `--ppo-batch-size` are the examples and prompts of one step over all processes.

Launch (every process runs the same command; rank 0 saves and publishes):

    torchrun --nproc-per-node 2 -m trainer reward ...          # one machine, 2 GPUs (or 2 CPU processes)
    torchrun --nproc-per-node 2 -m trainer ppo ...
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 \\
             --master-addr HOST0 --master-port 29500 -m trainer ppo ...   # on HOST0; --node-rank 1 on the other

A plain `python -m trainer ...` is one process and everything here is a no-op: rank
0 of a world of 1, collectives that return their input.

Backend: nccl on CUDA, each process on the GPU of its local rank (`local_device`);
gloo on CPU. Gradients are all-reduced by hand (`all_reduce_grads`) rather than
through DistributedDataParallel: the reward model's forward pass goes through
peft's backbone and a separate scalar head, PPO's through the policy, the reference
(adapter disabled or swapped) and a value head, and generation runs in between, none
of it through one module's `forward` that DDP could wrap; the trainable LoRA and
head parameters are few, so one flat all-reduce per optimiser step is all there is
to synchronise, and it puts no hooks or bucket logic between the loop and autograd.

What it does not do: split the data (reward.fit and ppo.train decide what each
process works on, with `shard`), or launch processes (torchrun does).
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Started by torchrun (or anything that sets its variables) with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be a whole number of processes, got {os.environ['WORLD_SIZE']!r}") from None


def local_device(device: str) -> str:
    """The `--device` this process trains on: under a launch, 'auto' and 'cuda' mean the
    GPU of this process's local rank (cuda:LOCAL_RANK), so each process has its own.
    Anything else ('cpu', an explicit 'cuda:N') stands; outside a launch, all do."""
    if not launched() or device not in ("auto", "cuda"):
        return device
    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def init(device: str | torch.device = "cpu") -> bool:
    """Join the launch's process group, once: nccl when `device` is a GPU (made this
    process's current device), gloo otherwise. Rendezvous through torchrun's variables
    (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). Returns whether this process is part
    of a launch; outside one, nothing is done. The group is torn down at exit."""
    if not launched():
        return False
    if dist.is_initialized():
        return True
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(destroy)
    return True


def active() -> bool:
    """A process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that saves, publishes and prints."""
    return rank() == 0


def _comm_device() -> torch.device:
    """Where the backend's tensors must live: this process's GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(tensor: torch.Tensor, op) -> torch.Tensor:
    """Run `op(t)` in place on `tensor`, through a copy on the backend's device when it lives elsewhere."""
    where = _comm_device()
    if tensor.device == where:
        op(tensor)
        return tensor
    moved = tensor.to(where)
    op(moved)
    tensor.copy_(moved)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; returns it. One process: unchanged."""
    if active():
        _collective(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return tensor


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any process: every process learns it, so all of them stop
    together (a process that raised alone would leave the others waiting in a collective)."""
    if not active():
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)).item() > 0)


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum the gradients of `params` over all processes, in place, with one all-reduce.

    The gradients are flattened into one float32 buffer (a process that ran no example
    this step sends zeros: a missing `.grad` becomes zeros, then the sum), reduced, and
    copied back. Each process's loss is its share of the global batch's loss, so the sum
    is the gradient of the whole batch. One process: nothing is touched."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.detach().reshape(-1).float() for p in params])
    all_reduce_sum(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` with rank `src`'s, in place; returns it. One process: unchanged."""
    if active():
        _collective(tensor, lambda t: dist.broadcast(t, src=src))
    return tensor


def broadcast_params(params: list[torch.Tensor], src: int = 0) -> None:
    """Start every process from rank `src`'s weights, as DistributedDataParallel does (a
    fresh LoRA adapter's A matrices are random, and processes need not share a seed)."""
    if not active():
        return
    with torch.no_grad():
        for p in params:
            broadcast(p.data, src)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (any picklable value), on every process. One process: `obj`."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait until every process gets here."""
    if active():
        dist.barrier()


def shard_range(n: int, rank_: int | None = None, world_: int | None = None) -> tuple[int, int]:
    """(start, stop) of process `rank_`'s contiguous share of `n` items: the shares
    differ in size by at most one, and in rank order they cover 0..n exactly."""
    rank_ = rank() if rank_ is None else rank_
    world_ = world() if world_ is None else world_
    if not 0 <= rank_ < world_:
        raise ValueError(f"rank {rank_} is not one of the {world_} processes")
    if n < 0:
        raise ValueError(f"cannot shard {n} items")
    return rank_ * n // world_, (rank_ + 1) * n // world_


def shard(items: list, rank_: int | None = None, world_: int | None = None) -> list:
    """This process's contiguous share of a global batch `items` (all of it in one process)."""
    start, stop = shard_range(len(items), rank_, world_)
    return items[start:stop]


def destroy() -> None:
    """Leave the process group (registered at exit by `init`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
