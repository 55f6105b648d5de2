"""The optimizer and schedule of a run: AdamW over ``groups``, or ``RowSparseAdamW`` when a table has sparse row
gradients (Over-Encoding's sparse path; it is AdamW for every dense gradient and, by default, for the tables' rows
too), with ``warmup_cosine`` per step. Row-sharded tables' moments are checkpointed as blocks of whole-table tensors
(``sharded_state``)."""

from __future__ import annotations

import torch
from torch import nn

from lit_overtok.nn.sharded_table import RowShardedEmbedding
from lit_overtok.optim.config import OptimizerConfig
from lit_overtok.optim.groups import parameter_groups
from lit_overtok.optim.schedule import warmup_cosine
from lit_overtok.optim.sharded_state import register_sharded_catch_up, register_sharded_state_hooks
from lit_overtok.optim.sparse_adamw import RowSparseAdamW


def build_optimizer(model: nn.Module, config: OptimizerConfig, total_steps: int):
    groups = parameter_groups(model, config)
    has_sparse = any(isinstance(m, (nn.Embedding, RowShardedEmbedding)) and m.sparse for m in model.modules())
    if has_sparse:
        if config.sparse_row_semantics == "adamw" and not config.betas[0] < config.betas[1]:
            raise ValueError(f"optimizer.betas={list(config.betas)}: sparse_row_semantics 'adamw' needs beta1 < beta2 "
                             "(its catch-up sums converge only then); use sparse_row_semantics 'lazy' or dense tables")
        optimizer = RowSparseAdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, row_semantics=config.sparse_row_semantics)
        # Rows a step skipped are caught up right before a lookup reads them and flushed when a state dict is taken.
        optimizer.register_catch_up_hooks(model)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    # Row-sharded tables: their moments go into checkpoints as the blocks of whole-table tensors, and the owner of a
    # block catches up the rows it serves (``register_catch_up_hooks`` hooks whole nn.Embedding tables only).
    sharded = [m for m in model.modules() if isinstance(m, RowShardedEmbedding)]
    register_sharded_state_hooks(optimizer, sharded)
    register_sharded_catch_up(optimizer, sharded)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
        step, config.warmup_steps, total_steps, config.min_lr_ratio, config.warmup_start_ratio))
    return optimizer, scheduler
