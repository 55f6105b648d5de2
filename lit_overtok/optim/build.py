"""The optimizer and schedule of a run: AdamW over ``groups``, or ``RowSparseAdamW`` when a table has sparse row
gradients (Over-Encoding's sparse path; it is AdamW for every dense gradient), with ``warmup_cosine`` per step.
Row-sharded tables' moments are checkpointed as blocks of whole-table tensors (``sharded_state``)."""

from __future__ import annotations

import torch
from torch import nn

from lit_overtok.nn.sharded_table import RowShardedEmbedding
from lit_overtok.optim.config import OptimizerConfig
from lit_overtok.optim.groups import parameter_groups
from lit_overtok.optim.schedule import warmup_cosine
from lit_overtok.optim.sharded_state import register_sharded_catch_up, register_sharded_state_hooks
from lit_overtok.optim.sparse_adamw import RowSparseAdamW


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, total_steps: int):
    groups = parameter_groups(model, cfg)
    has_sparse = any(isinstance(m, (nn.Embedding, RowShardedEmbedding)) and m.sparse for m in model.modules())
    optimizer_class = RowSparseAdamW if has_sparse else torch.optim.AdamW
    optimizer = optimizer_class(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    # Row-sharded tables: their moments go into checkpoints as the blocks of whole-table tensors.
    sharded = [m for m in model.modules() if isinstance(m, RowShardedEmbedding)]
    register_sharded_state_hooks(optimizer, sharded)
    register_sharded_catch_up(optimizer, sharded)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
        step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cfg.warmup_start_ratio))
    return optimizer, scheduler
