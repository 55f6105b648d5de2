"""Per-rank memory of a run before it starts: weights, gradients, optimizer state and hashed n-gram tables.

``OverTokLM.setup`` prints the estimate at the start of every fit and stops with one clear error when it exceeds
the declared devices, before hours of queueing end in an out-of-memory at the first step. Counted (bytes per rank):

- backbone and heads (everything but the memory tables): weights, gradients and AdamW's two moments, in the
  parameter dtype (fp32 unless the precision is ``*-true`` half precision); FSDP2 divides all three by the world size;
  DDP adds its gradient buckets (one more gradient-sized buffer);
- memory tables (Over-Encoding's one weight, each Engram layer's): this rank's rows (all of them when replicated,
  1/world when sharded or FSDP-sharded) times weight and two moments, a dense gradient unless ``sparse`` (the sparse
  one holds only a batch's rows; RowSparseAdamW keeps an int32 step per row instead), and a coverage byte per row
  (OE's always, Engram's when sharded: ``RowShardedEmbedding`` keeps one).

Not counted: activations (they grow with batch × sequence and can be cut by activation checkpointing), FSDP's
transient all-gathered blocks, the CUDA context and allocator slack. A run whose static state alone exceeds the
device cannot start; one close to it will need small micro-batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import parameter_counts

GIB = 2**30
_HALF_PRECISIONS = ("bf16-true", "16-true", "bf16", "16", "half")
_SHARDABLE = ("over_encoding", "engram")  # model_config fields whose tables can be row-sharded


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank, by kind."""

    world: int
    weights: int
    gradients: int
    optimizer_state: int
    tables: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.tables

    def report(self, capacity: Optional[int], device: str) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.3g}" for name in
                          ("weights", "gradients", "optimizer_state", "tables"))
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


def estimate_per_rank(config: ModelConfig, world: int, fsdp: bool = False, ddp: bool = False,
                      precision: str = "32-true") -> MemoryEstimate:
    param_bytes = 2 if str(precision) in _HALF_PRECISIONS else 4
    counts = parameter_counts(config)
    memory_tables = _memory_tables(config)
    dense = counts.total - sum(t.rows * t.width for t in memory_tables)
    dense_share = math.ceil(dense / world) if fsdp else dense
    weights = dense_share * param_bytes
    gradients = weights * (2 if ddp and world > 1 else 1)
    tables = 0
    for table in memory_tables:
        split = table.sharded or (fsdp and not table.sparse)
        rows_here = math.ceil(table.rows / world) if split else table.rows
        per_row = table.width * param_bytes * (3 if table.sparse else 4)  # weight, 2 moments (+ a dense gradient)
        per_row += 1 if table.coverage else 0
        if table.sparse:
            per_row += 4  # RowSparseAdamW's int32 step each row is current to (its default "adamw" row rule)
        if ddp and world > 1 and not table.sharded and not table.sparse:
            per_row += table.width * param_bytes  # DDP's bucket for the replicated table's gradient
        tables += rows_here * per_row
    return MemoryEstimate(world, weights, gradients, 2 * weights, tables)


def device_capacity(device: torch.device, processes_per_node: int) -> tuple[int, str]:
    """Bytes one rank may use, and a name for the error message: the GPU's memory, or the host's shared by its
    ranks."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return properties.total_memory, f"{properties.name} ({device})"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // max(1, processes_per_node), f"the host's memory shared by {processes_per_node} rank(s)"


def devices_needed(config: ModelConfig, capacity: int, precision: str) -> Optional[int]:
    """The smallest power-of-two world size at which FSDP2 with sharded tables fits ``capacity``; None beyond 2^16."""
    for exponent in range(17):
        world = 2**exponent
        if estimate_per_rank(sharded_variant(config), world, fsdp=True, precision=precision).total <= capacity:
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
    needed = devices_needed(config, capacity, precision)
    keys = " and ".join(f"{name}.sharded" for name in _SHARDABLE if getattr(config, name) is not None)
    hint = ("no world size up to 65536 fits it" if needed is None else
            f"FSDP2Strategy{f' with {keys}: true' if keys else ''} fits it from {needed} devices")
    raise ValueError(f"this configuration does not fit the declared devices: {estimate.report(capacity, device)}; "
                     f"{hint} (trainer.devices x trainer.num_nodes)")
