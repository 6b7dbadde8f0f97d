"""torchrun support shared by train.py and infer.py: join the process group, share values.

`torchrun --nproc_per_node N script.py ...` starts N copies of a script with RANK,
WORLD_SIZE and LOCAL_RANK set. `setup` joins them into one process group (nccl on
CUDA, gloo on CPU) -- nothing to configure by hand; without torchrun every helper
here is a no-op for a single process. Multi-node runs use torchrun's own
rendezvous flags (README).
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger("birdclef")


def local_device(name: str) -> torch.device:
    """--device -> a torch device; "auto" picks CUDA when present, and a plain "cuda" under
    torchrun is this process's own GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def setup(device: torch.device) -> tuple[int, int]:
    """Join torchrun's process group if there is one -> (rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() != 0:  # one copy of the INFO lines (rank 0's); every rank's warnings, marked
        log.setLevel(logging.WARNING)
        log.addFilter(_RankPrefix(dist.get_rank()))
    return dist.get_rank(), dist.get_world_size()


class _RankPrefix(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.prefix + str(record.msg)
        return True


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def process_group(device: torch.device):
    """Join torchrun's process group (nothing without torchrun) for the body; leave it after -- at once
    if the body raised."""
    setup(device)
    try:
        yield
    except BaseException:
        shutdown(failed=True)
        raise
    shutdown()


def shutdown(failed: bool = False) -> None:
    """Leave the process group. After success, first wait for every rank (none leaves while
    another still writes or gathers); after an error, leave at once -- the others may be inside
    a collective this rank will never join, and torchrun stops them when this rank exits."""
    if dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def rank_and_world_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main_process() -> bool:
    return rank_and_world_size()[0] == 0


def _communication_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (one collective call under torchrun)."""
    if not dist.is_initialized():
        return bool(flag)
    value = torch.tensor([float(flag)], device=_communication_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """A scalar averaged over the ranks: each rank's batch mean -> the global batch's mean."""
    if not dist.is_initialized():
        return value
    value = value.float().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def gather_objects(value) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank; [value] without torchrun."""
    if not dist.is_initialized():
        return [value]
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, value)
    return shares


def gather_rows(indices: list, *columns: list) -> tuple:
    """Per-batch (B,) row numbers and (B, ...) tensors of this rank -> whole tensors from every
    rank, ordered by row number, each row once (no padding duplicates); None if there are none."""
    local = [torch.cat(parts) if parts else None for parts in (indices, *columns)]
    shares = [share for share in gather_objects(local) if share[0] is not None]
    if not shares:
        return (None,) * len(columns)
    joined = [torch.cat([share[i] for share in shares]) for i in range(len(local))]
    order = torch.argsort(joined[0])
    return tuple(column[order] for column in joined[1:])


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) to every rank, so evaluation is one model everywhere."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
