"""Run a function on N local ranks, forked from the test process (no re-import: each rank starts in well under a
second), with the environment a launcher such as torchrun gives its workers (MASTER_ADDR/PORT, WORLD_SIZE, RANK,
LOCAL_RANK, NODE_RANK), so a Lightning Trainer inside sees externally created processes and joins them."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
import warnings

import torch
import torch._dynamo  # noqa: F401  (imported lazily by DTensor's first use: seconds, once here rather than per rank)
import torch.distributed as dist
import torch.distributed.tensor  # noqa: F401
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(world: int, rank: int, port: int, local_rank: int = None, node_rank: int = 0) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank),
            "LOCAL_RANK": str(rank if local_rank is None else local_rank), "NODE_RANK": str(node_rank),
            "OMP_NUM_THREADS": "1"}


def _entry(rank: int, world: int, port: int, errors: str, init_process_group: bool, fn, args) -> None:
    os.environ.update(launcher_env(world, rank, port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if init_process_group:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        if dist.is_initialized():
            dist.barrier()
    except BaseException:
        with open(os.path.join(errors, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, init_process_group: bool = True) -> None:
    """``fn(rank, world, *args)`` on ``world`` forked ranks (gloo); on failure, every rank's traceback (the first
    rank to exit is often only the peer of the one that failed). ``init_process_group=False`` leaves it to the
    function (a Lightning Trainer initialises it from the environment)."""
    with tempfile.TemporaryDirectory() as errors:
        try:
            mp.start_processes(_entry, args=(world, free_port(), errors, init_process_group, fn, args), nprocs=world,
                               join=True, start_method="fork")
        except Exception as error:
            reports = [open(os.path.join(errors, n)).read() for n in sorted(os.listdir(errors))]
            raise AssertionError("\n".join(reports) or f"a rank died without a traceback: {error}") from None
