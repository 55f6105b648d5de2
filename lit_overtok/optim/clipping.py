"""Global-norm gradient clipping when gradients are split over ranks (row-sharded tables, FSDP2 shards).

torch's ``clip_grad_norm_`` sees one process's gradients: a row-sharded table's block holds only this rank's rows,
and cannot be mixed with FSDP2's DTensor gradients or take sparse ones. The global norm is
``sqrt(replicated² + Σ_ranks sharded²)``: gradients every rank holds in full (DDP's all-reduced ones) count once,
disjoint pieces (a table's row block, an FSDP2 shard: a DTensor with a ``Shard`` placement) are summed over the
data-parallel group with one all-reduce. Every gradient is then scaled by the same factor as torch's rule:
``min(1, max_norm / (norm + 1e-6))``. Value clipping is elementwise and needs no communication.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
import torch.distributed as dist

from lit_overtok.nn import hooks
from lit_overtok.nn.collectives import all_reduce_


def _local_gradients(parameters: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, bool]]:
    """(a dense tensor to read and scale in place, whether it is a disjoint piece) per gradient."""
    from torch.distributed.tensor import DTensor, Shard

    pieces = []
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            param.grad = grad = grad.coalesce()  # a row's duplicates must be summed before its norm is taken
            pieces.append((grad._values(), hooks.global_shape(param) is not None))
        elif isinstance(grad, DTensor):
            pieces.append((grad._local_tensor, any(isinstance(p, Shard) for p in grad.placements)))
        else:
            pieces.append((grad, hooks.global_shape(param) is not None))
    return pieces


@torch.no_grad()
def clip_grad_norm_across_ranks_(parameters: Iterable[torch.Tensor], max_norm: float,
                                 group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Scale all gradients so that their global L2 norm is at most ``max_norm``; returns the norm before."""
    pieces = _local_gradients(parameters)
    device = pieces[0][0].device if pieces else torch.device("cpu")
    squares = torch.zeros(2, dtype=torch.float64, device=device)  # [replicated, sharded]
    for tensor, sharded in pieces:
        squares[int(sharded)] += tensor.double().square().sum()
    sharded_total = all_reduce_(squares[1:].clone(), "sum", group)
    total_norm = (squares[0] + sharded_total[0]).sqrt().float()
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for tensor, _ in pieces:
        tensor.mul_(coef.to(tensor.device, tensor.dtype))
    return total_norm


@torch.no_grad()
def clip_grad_value_(parameters: Iterable[torch.Tensor], clip_value: float) -> None:
    for tensor, _ in _local_gradients(parameters):
        tensor.clamp_(-clip_value, clip_value)
