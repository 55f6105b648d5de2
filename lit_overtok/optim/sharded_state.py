"""Optimizer state of row-sharded tables in checkpoints: each rank's moments as ``Shard(0)`` DTensors.

The optimizer holds a table's block as an ordinary parameter, so its moments (``exp_avg``, ``exp_avg_sq``) have the
block's shape. ``register_sharded_state_hooks`` makes ``optimizer.state_dict()`` show every row-shaped state tensor of
a sharded table as a ``Shard(0)`` DTensor of the whole table's shape (a view, no copy), and ``load_state_dict`` take
those back, or full-table tensors (a replicated run's optimizer state): then torch.distributed.checkpoint saves
each rank's rows and reshards them on load at any world size, as it does for FSDP2's parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_overtok.nn.sharded_table import RowShardedEmbedding


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
                if torch.is_tensor(value) and value.dim() > 0 and (
                        value.shape[0] in (table.num_rows, table.row_end - table.row_start)):
                    state[name] = table.as_global(value) if to_global else table.as_block(value)
        return state_dict

    optimizer.register_state_dict_post_hook(lambda opt, state_dict: convert(opt, state_dict, True))
    optimizer.register_load_state_dict_pre_hook(lambda opt, state_dict: convert(opt, state_dict, False))
