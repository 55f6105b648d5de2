"""Built where sharded: a model whose parameters are constructed on the meta device and drawn once a strategy has
placed them (docs/method.md §6; torchtitan's and OLMo-core's meta-device initialisation).

- ``parameters_on_meta()``: every parameter registered inside is a meta tensor (no memory, and the layers' own
  ``reset_parameters`` draw nothing); buffers stay real, computed by the module that owns them as in an eager build
  (RoPE tables, Engram's compressed-id map and multipliers, coverage flags), so nothing has to be rebuilt later.
- ``trunc_normal_part_``: the part of ``nn.init.trunc_normal_(whole, 0, std, -3 std, 3 std, generator)`` that a
  destination holds (the whole tensor, or this rank's ``Shard(0)`` rows of an FSDP2 parameter), to the bit, while
  holding only one chunk of the draw at a time. torch 2.13 draws it by rejection: ``normal_`` over the whole tensor,
  then whole-tensor redraws that replace the values outside the cut until none is left, each redraw allocating two
  more tensors of the whole size (3-4 times the parameter at its peak). The CPU ``normal_`` of n >= 16 values reads
  n uniforms in order, maps each block of 16 on its own (Box-Muller), and redraws the last 16 from 16 more uniforms
  when n is not a multiple of 16; so a chunk of it is ``normal_`` of that chunk's length from the same generator,
  as long as chunks start at multiples of 16 and the last one holds at least 16 values. Every rank draws the whole
  stream (the values it keeps depend on it) and keeps its slice; the indices still outside the cut are global and
  the same on every rank, so every rank redraws as many times as the eager build does.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

DRAW_CHUNK = 1 << 20  # values drawn at a time (a multiple of 16: see the module docstring)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, ``nn.Module.register_parameter`` (``module.weight = Parameter(...)``) moves each new parameter to the
    meta device, keeping its class and attributes; one already there (a tied weight) is kept as it is, tie included.
    The layers' ``torch.empty`` storage is never written, so it costs no resident memory."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param) -> None:
        if param is not None and not param.is_meta:
            meta = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            param = meta
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def is_unplaced(param: torch.Tensor) -> bool:
    """A parameter still on the meta device (a DTensor sharded by FSDP2 included)."""
    return param.is_meta or (hasattr(param, "_local_tensor") and param._local_tensor.is_meta)


def allocate_like(param: nn.Parameter, device: torch.device) -> nn.Parameter:
    """An uninitialised parameter of ``param``'s kind (a DTensor keeps its mesh and shard) on ``device``."""
    real = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
    real.__dict__.update(param.__dict__)
    return real


def replace_parameter(root: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """``new`` in place of ``old`` in every module of ``root`` that holds it (a tied unembedding shares a table)."""
    for module in root.modules():
        for name, param in module._parameters.items():
            if param is old:
                module._parameters[name] = new


def local_part(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(the tensor this rank holds, the whole tensor's numel, the flat offset of this rank's part in it)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(param, DTensor):
        return param.data, param.numel(), 0
    if any(p not in (Shard(0), Replicate()) for p in param.placements):
        raise NotImplementedError(f"deferred init draws Shard(0) or replicated parameters, not {param.placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), param.numel(), offset[0] * math.prod(param.shape[1:])


def _chunks(numel: int) -> list[tuple[int, int]]:
    """[start, end) of each draw: starts at multiples of 16, the last one at least 16 long (or the whole, if less)."""
    bounds = list(range(0, numel, DRAW_CHUNK)) + [numel]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 16:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def trunc_normal_part_(param: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Fill what this rank holds of ``param`` with its part of ``nn.init.trunc_normal_(param, 0, std, -3 std,
    3 std, generator=generator)`` drawn whole on the CPU (module docstring); ``generator`` is a CPU generator."""
    local, numel, offset = local_part(param)
    flat = local.view(-1)
    end = offset + flat.numel()
    dtype = local.dtype
    # The cut as trunc_normal_ applies it: the bounds rounded to the tensor's dtype.
    lo, hi = (torch.tensor(bound, dtype=dtype).item() for bound in (-3 * std, 3 * std))

    def draws() -> Iterator[tuple[int, torch.Tensor]]:
        for a, b in _chunks(numel):
            yield a, torch.empty(b - a, dtype=dtype).normal_(0.0, std, generator=generator)

    pending = []
    for a, values in draws():
        pending.append(((values < lo) | (values > hi)).nonzero().squeeze(1) + a)
        lo_here, hi_here = max(a, offset), min(a + values.numel(), end)
        if hi_here > lo_here:
            flat[lo_here - offset: hi_here - offset].copy_(values[lo_here - a: hi_here - a])
    pending_P = torch.cat(pending)
    while pending_P.numel():  # a whole-tensor redraw, as trunc_normal_'s rejection loop does
        still = []
        for a, values in draws():
            first, last = torch.searchsorted(pending_P, torch.tensor([a, a + values.numel()])).tolist()
            index_M = pending_P[first:last]  # sorted: found chunk by chunk, in order
            new_M = values[index_M - a]
            still.append(index_M[(new_M < lo) | (new_M > hi)])
            mine = (index_M >= offset) & (index_M < end)
            flat[index_M[mine] - offset] = new_M[mine].to(flat.device)
        pending_P = torch.cat(still)
