"""The few collectives modules use outside the process group's training loop: rank and size of a group, an in-place
all-reduce that is a no-op in a single process (no process group, or a group of one), and whether a model is split
over ranks."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from lit_overtok.nn import hooks


def group_rank_and_size(group: Optional[dist.ProcessGroup] = None) -> tuple[int, int]:
    """This process's rank in ``group`` (None: the default group) and its size; (0, 1) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``tensor`` reduced over ``group`` in place ("sum" or "max"), and returned; unchanged in a single process."""
    if group_rank_and_size(group)[1] > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return tensor


def is_split_over_ranks(model: nn.Module) -> bool:
    """Whether parts of ``model`` live on other ranks (row-sharded lookup tables, FSDP shards). Then a forward is
    itself a collective, so every rank must run the same forwards in the same order, which loops whose length depends
    on the rank's data (sampling until EOS, lm-eval's per-rank requests) cannot promise; and a gradient norm needs
    the other ranks' pieces."""
    from torch.distributed.fsdp import FSDPModule

    if group_rank_and_size()[1] == 1:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(
        hooks.global_shape(p) is not None for p in model.parameters())
