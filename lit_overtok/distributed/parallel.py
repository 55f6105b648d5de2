"""Data parallelism for ``OverTokLM`` on Lightning's strategies: what ``configure_model`` does under each.

Lightning creates the process group, then calls ``configure_model``, then wraps the model (DDP) or sets it up
(ModelParallelStrategy), so the row-sharded tables (Over-Encoding's, Engram's) are materialized here, over the
data-parallel group, and the model, whose parameters were built on the meta device, is allocated and drawn once it is
placed (``Transformer.materialize``: after ``fully_shard`` under FSDP2, so a rank only ever holds its shards):

- one device (or no Trainer: ``load_from_checkpoint``, evaluation): the whole table, lookups are plain gathers;
- DDP (``ShardedDDPStrategy`` when the tables are sharded): tables sharded over all ranks. DDP must ignore the table
  blocks (their gradients are reduced by the table's own all-to-all; DDP would broadcast rank 0's block over the
  others' at construction) and every buffer (DDP broadcasts rank 0's buffers before each forward, which would
  overwrite each rank's coverage flags and MoE load counts; the others, RoPE tables, are the same on every rank);
- FSDP2 (``FSDP2Strategy``, or ModelParallelStrategy with ``tensor_parallel_size: 1``): every block is its own FSDP
  unit and the rest one root unit; the tables stay out of FSDP (``ignored_params``: no all-gather, no
  reduce-scatter) and are sharded by rows over the mesh's data-parallel group.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy

from lit_overtok.nn import hooks
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.sharded_table import place_sharded_tables
from lit_overtok.nn.transformer import Transformer
from lit_overtok.distributed.strategies import ShardedDDPStrategy


def configure_parallelism(module: pl.LightningModule, transformer: Transformer, strategy: Optional[Strategy]) -> None:
    """Place the sharded tables and apply the strategy's wrapping preparations; idempotent (Lightning calls
    ``configure_model`` at every fit/validate/test)."""
    if isinstance(strategy, ModelParallelStrategy):
        mesh = strategy.device_mesh
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                f"trainer.strategy: ModelParallelStrategy with tensor_parallel_size={mesh['tensor_parallel'].size()}; "
                "these models implement data parallelism only: use trainer.strategy fsdp2 (or "
                "tensor_parallel_size: 1 and data_parallel_size: the number of devices)")
        data_parallel = mesh["data_parallel"]
        place_sharded_tables(transformer, data_parallel.get_group() if data_parallel.size() > 1 else None)
        _fully_shard(transformer, data_parallel)
        transformer.materialize(strategy.root_device)
        return
    place_sharded_tables(transformer, None)
    transformer.materialize(strategy.root_device if strategy is not None else torch.device("cpu"))
    if isinstance(strategy, DDPStrategy):
        from torch.nn.parallel import DistributedDataParallel

        ignored = [n for n, p in module.named_parameters() if hooks.global_shape(p) is not None]
        ignored += [n for n, _ in module.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)


def _fully_shard(transformer: Transformer, mesh) -> None:
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(transformer, FSDPModule):
        return
    tables = {p for p in transformer.parameters() if hooks.global_shape(p) is not None}
    for block in transformer.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(transformer, mesh=mesh, ignored_params=tables or None)
    # Training and generation enter through these methods, not forward(): FSDP must gather the root's parameters.
    for method in ("loss", "hidden_states"):
        register_fsdp_forward_method(transformer, method)


def check_strategy(model_config: ModelConfig, strategy: Optional[Strategy]) -> None:
    """One clear error, before any training, for a strategy that cannot run or checkpoint this model."""
    world = strategy.world_size if strategy is not None else 1
    if world == 1:
        return
    sharded_checkpoints = isinstance(strategy, ShardedDDPStrategy) or (
        isinstance(strategy, ModelParallelStrategy) and strategy._save_distributed_checkpoint)
    # Over-Encoding's and Engram's tables follow the same rules (both are RowShardedEmbedding when sharded).
    for name in ("over_encoding", "engram"):
        tables = getattr(model_config, name)
        if tables is None:
            continue
        if tables.sparse and not tables.sharded and isinstance(strategy, ModelParallelStrategy):
            raise ValueError(f"model_config.{name}.sparse: FSDP cannot shard sparse table gradients; under "
                             f"FSDP2Strategy set model_config.{name}.sharded: true (or sparse: false)")
        if tables.sharded and not sharded_checkpoints:
            raise ValueError(
                f"model_config.{name}.sharded: {type(strategy).__name__} writes checkpoints from rank 0 only, "
                "which would hold rank 0's rows of every table and lose the others'; use trainer.strategy "
                "ddp_sharded_checkpoints (lit_overtok.distributed.strategies.ShardedDDPStrategy) or fsdp2 (FSDP2Strategy)")
