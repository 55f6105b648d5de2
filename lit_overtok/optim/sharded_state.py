"""Optimizer state of row-sharded tables in checkpoints: each rank's moments as ``Shard(0)`` DTensors.

The optimizer holds a table's block as an ordinary parameter, so its moments (``exp_avg``, ``exp_avg_sq``) have the
block's shape. ``register_sharded_state_hooks`` makes ``optimizer.state_dict()`` show every row-shaped state tensor of
a sharded table as a ``Shard(0)`` DTensor of the whole table's shape (a view, no copy), and ``load_state_dict`` take
those back, or full-table tensors (a replicated run's optimizer state): then torch.distributed.checkpoint saves
each rank's rows and reshards them on load at any world size, as it does for FSDP2's parameters.
``register_sharded_catch_up`` gives the sharded tables RowSparseAdamW's row catch-up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_overtok.nn.sharded_table import RowShardedEmbedding

PER_ROW_STATE = ("row_step",)  # RowSparseAdamW's step each row is current to
# RowSparseAdamW's per-step scalar history (the same on every rank), whatever its length happens to be.
PER_STEP_STATE = ("row_history", "row_blocks", "row_meta")


def register_sharded_state_hooks(optimizer: torch.optim.Optimizer, tables: Sequence[RowShardedEmbedding]) -> None:
    by_param = {id(t.weight): t for t in tables}
    if not by_param:
        return

    def convert(opt: torch.optim.Optimizer, state_dict: dict, to_global: bool) -> dict:
        # The i-th parameter of the optimizer's groups is the i-th key of the state dict's groups: an int from
        # Optimizer.state_dict, a parameter name when get/set_optimizer_state_dict pass it through.
        params = [p for group in opt.param_groups for p in group["params"]]
        keys = [k for group in state_dict["param_groups"] for k in group["params"]]
        for param, key in zip(params, keys):
            table = by_param.get(id(param))
            if table is None or key not in state_dict["state"]:
                continue
            # A copy: Optimizer.state_dict() hands out the optimizer's own per-parameter dicts.
            state = state_dict["state"][key] = dict(state_dict["state"][key])
            for name, value in state.items():
                if _is_per_row(name, value, table):
                    state[name] = table.as_global(value) if to_global else table.as_block(value)
        return state_dict

    optimizer.register_state_dict_post_hook(lambda opt, state_dict: convert(opt, state_dict, True))
    optimizer.register_load_state_dict_pre_hook(lambda opt, state_dict: convert(opt, state_dict, False))


def _is_per_row(name: str, value, table: RowShardedEmbedding) -> bool:
    """A state tensor with one entry per table row: the moments (the weight's shape) and RowSparseAdamW's per-row
    step; not the per-step scalars, whose length may happen to equal the block's row count."""
    if name in PER_STEP_STATE or not torch.is_tensor(value) or value.dim() == 0 or \
            value.shape[0] not in (table.num_rows, table.weight.shape[0]):
        return False
    return value.shape[1:] == table.weight.shape[1:] or name in PER_ROW_STATE


def register_sharded_catch_up(optimizer: torch.optim.Optimizer, tables: Sequence[RowShardedEmbedding]) -> None:
    """RowSparseAdamW's row catch-up for sharded tables (its ``register_catch_up_hooks`` hooks whole
    ``nn.Embedding`` tables, whose lookups read global rows): the owner catches up the rows it is about to serve,
    and a table's state dict flushes its block first. A no-op for optimizers without ``catch_up`` (dense AdamW,
    or the lazy rule)."""
    catch_up, flush = getattr(optimizer, "catch_up", None), getattr(optimizer, "flush", None)
    if catch_up is None or flush is None:
        return
    for table in tables:
        table.before_serving.append(catch_up)
        table.register_state_dict_pre_hook(lambda module, prefix, keep_vars: flush(module.weight))
