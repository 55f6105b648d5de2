"""Per-rank memory of a run before it starts: the process, weights, hashed n-gram tables, gradients, optimizer state
and FSDP2's gathered units.

``OverTokLM.setup`` prints the estimate at the start of every fit and stops with one clear error when it exceeds
the declared devices, before hours of queueing end in an out-of-memory at the first step. Counted (bytes per rank):

- backbone and heads (everything but the memory tables): weights, gradients and AdamW's two moments, in the
  parameter dtype (fp32 unless the precision is ``*-true`` half precision); FSDP2 divides all three by the world size;
  DDP adds its gradient buckets (one more gradient-sized buffer);
- memory tables (Over-Encoding's one weight, each Engram layer's): this rank's rows (all of them when replicated,
  1/world when sharded or FSDP-sharded) times weight and two moments (counted with the optimizer state), a dense
  gradient unless ``sparse`` (the sparse one holds only a batch's rows; RowSparseAdamW keeps an int32 step per row
  instead), and a coverage byte per row (OE's always, Engram's when sharded: ``RowShardedEmbedding`` keeps one);
- the process itself, measured when the estimate is made (``process_bytes``): on the host, the resident memory of
  torch, Lightning and the process group (~0.5 GiB); on a GPU, what is already in use there (the CUDA context);
- FSDP2's gathered units: within a step a rank holds the root unit's whole weights and gradient and the largest
  block's whole weights twice (computing, prefetched) and its gradient once (``_gathered_parameters``).

Not counted: activations (they grow with batch × sequence and can be cut by activation checkpointing) and allocator
slack. ``benchmarks/build_memory.py`` sets the estimate against the measured peak of real FSDP2 steps (BENCHMARKS.md).
A run whose static state alone exceeds the device cannot start; one close to it will need small micro-batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.hooks import global_shape
from lit_overtok.nn.transformer import Transformer

GIB = 2**30
_HALF_PRECISIONS = ("bf16-true", "16-true", "bf16", "16", "half")
_SHARDABLE = ("over_encoding", "engram")  # model_config fields whose tables can be row-sharded


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank, by kind. ``at_setup`` is what exists once the model is placed and drawn (the process, weights
    and tables); gradients and AdamW's moments come with the first step, FSDP2's gathered units within each step."""

    world: int
    process: int  # what the process holds before the model (torch, Lightning, the CUDA context), measured
    weights: int  # backbone and heads
    tables: int  # memory-table weights with their coverage bytes and RowSparseAdamW's row steps
    gradients: int
    optimizer_state: int  # AdamW's two moments, backbone and tables
    gathered: int  # FSDP2's whole weights and gradients of the units a step holds at once

    @property
    def at_setup(self) -> int:
        return self.process + self.weights + self.tables

    @property
    def total(self) -> int:
        return self.at_setup + self.gradients + self.optimizer_state + self.gathered

    def report(self, capacity: Optional[int], device: str) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.3g}" for name in
                          ("process", "weights", "tables", "gradients", "optimizer_state", "gathered"))
        fits = "" if capacity is None else f" of {capacity / GIB:.3g} GiB on {device}"
        return (f"memory per rank in GiB (world size {self.world}, activations not included): {parts}; "
                f"total {self.total / GIB:.3g}{fits}")


@dataclass(frozen=True)
class _Table:
    """One memory-table weight of a configuration, as the estimate sees it."""

    rows: int
    width: int
    sparse: bool
    sharded: bool
    coverage: bool  # a byte per row of training coverage flags


def _memory_tables(config: ModelConfig) -> list[_Table]:
    tables = []
    oe, engram = config.over_encoding, config.engram
    if oe is not None:
        tables.append(_Table(sum(oe.row_counts()), oe.slice_width(config.d_model), oe.sparse, oe.sharded, True))
    if engram is not None:  # one weight per Engram layer, each split over the ranks on its own
        tables += [_Table(sum(primes), engram.head_width(), engram.sparse, engram.sharded, engram.sharded)
                   for primes in engram.head_primes().values()]
    return tables


def _gathered_parameters(model: Transformer) -> int:
    """Parameters FSDP2 (``distributed.parallel``: one unit per block, the root for the rest) holds whole at once at
    the peak of a step: the root's weights and gradient (gathered at the first forward, released after the last
    backward) and, of the largest block, two copies of the weights (the one computing and the one prefetched) and
    one gradient before its reduce-scatter. Row-sharded tables are never gathered."""
    def gathered_numel(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if global_shape(p) is None)

    blocks = [gathered_numel(b) for b in model.blocks]
    root = gathered_numel(model) - sum(blocks)
    return 2 * root + 3 * max(blocks, default=0)


def estimate_per_rank(config: ModelConfig, world: int, fsdp: bool = False, ddp: bool = False,
                      precision: str = "32-true", process: int = 0) -> MemoryEstimate:
    param_bytes = 2 if str(precision) in _HALF_PRECISIONS else 4
    with torch.device("meta"):
        model = Transformer(config)
    memory_tables = _memory_tables(config)
    dense = model.parameter_counts().total - sum(t.rows * t.width for t in memory_tables)
    weights = (math.ceil(dense / world) if fsdp else dense) * param_bytes
    gradients = weights * (2 if ddp and world > 1 else 1)
    optimizer_state = 2 * weights
    tables = 0
    for table in memory_tables:
        split = table.sharded or (fsdp and not table.sparse)
        rows_here = math.ceil(table.rows / world) if split else table.rows
        row_bytes = table.width * param_bytes
        tables += rows_here * (row_bytes + (1 if table.coverage else 0) + (4 if table.sparse else 0))
        # RowSparseAdamW keeps an int32 step per row (its default "adamw" row rule); a sparse gradient holds only
        # a batch's rows, a dense one all of them (twice under DDP: its bucket for the replicated table).
        dense_gradients = 0 if table.sparse else (2 if ddp and world > 1 and not table.sharded else 1)
        gradients += rows_here * row_bytes * dense_gradients
        optimizer_state += rows_here * row_bytes * 2
    gathered = _gathered_parameters(model) * param_bytes if fsdp else 0
    return MemoryEstimate(world, process, weights, tables, gradients, optimizer_state, gathered)


def process_bytes(module: nn.Module, device: torch.device) -> int:
    """What the process already holds on ``device`` apart from ``module``'s tensors: on a GPU, everything in use on
    it (the CUDA context included); on the host, this process's resident memory (torch, Lightning, the process
    group) less the module's own tensors there (a model built where sharded has almost none before it is placed)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()] if t.device.type == "cpu"}
    return max(0, resident - sum(storages.values()))


def device_capacity(device: torch.device, processes_per_node: int) -> tuple[int, str]:
    """Bytes one rank may use, and a name for the error message: the GPU's memory, or the host's shared by its
    ranks."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return properties.total_memory, f"{properties.name} ({device})"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // max(1, processes_per_node), f"the host's memory shared by {processes_per_node} rank(s)"


def devices_needed(config: ModelConfig, capacity: int, precision: str, process: int = 0) -> Optional[int]:
    """The smallest power-of-two world size at which FSDP2 with sharded tables fits ``capacity``; None beyond 2^16."""
    for exponent in range(17):
        world = 2**exponent
        if estimate_per_rank(sharded_variant(config), world, True, False, precision, process).total <= capacity:
            return world
    return None


def sharded_variant(config: ModelConfig) -> ModelConfig:
    """``config`` with every memory table sharded."""
    changes = {name: dataclasses.replace(getattr(config, name), sharded=True) for name in _SHARDABLE
               if getattr(config, name) is not None}
    return config.replace(**changes) if changes else config


def check_fits(estimate: MemoryEstimate, capacity: int, device: str, config: ModelConfig, precision: str) -> None:
    if estimate.total <= capacity:
        return
    needed = devices_needed(config, capacity, precision, estimate.process)
    keys = " and ".join(f"{name}.sharded" for name in _SHARDABLE if getattr(config, name) is not None)
    hint = ("no world size up to 65536 fits it" if needed is None else
            f"FSDP2Strategy{f' with {keys}: true' if keys else ''} fits it from {needed} devices")
    raise ValueError(f"this configuration does not fit the declared devices: {estimate.report(capacity, device)}; "
                     f"{hint} (trainer.devices x trainer.num_nodes)")
