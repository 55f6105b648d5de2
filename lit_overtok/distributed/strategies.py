"""Lightning strategies for runs with row-sharded tables (``over_encoding.sharded`` or ``engram.sharded: true``).

Both are Lightning's own strategies with one thing added each; nothing else changes:

- ``ShardedDDPStrategy``: ``DDPStrategy`` whose checkpoints are sharded. Plain DDP saves ``model.state_dict()`` from
  rank 0 only, which would keep rank 0's block of every table and drop the others' (silently: at the same world size
  rank 0's block would be loaded everywhere). Here every rank writes its own blocks and their optimizer state through
  torch.distributed.checkpoint (DCP), exactly as Lightning's ``ModelParallelStrategy`` does: a checkpoint is a folder
  (``*.distcp`` files, ``.metadata``, and ``meta.pt`` with the trainer state) that loads at any world size.
- ``FSDP2Strategy``: ``ModelParallelStrategy`` (FSDP2, sharded checkpoints) over a one-dimensional data-parallel mesh
  of every rank, which is what ``OverTokLM.configure_model`` shards over (Lightning's default is a 2-D mesh with
  tensor parallelism inside each node, which these models do not implement).

Both write a checkpoint folder under a temporary name, add ``checksums.json`` once every rank has written (the size
and CRC-32 of each file, ``checkpointing.integrity``) and only then give it its name (``checkpointing.files
.move_into_place``): a rank killed in the middle leaves no half-written checkpoint. Both verify a checkpoint before
loading it. Either way, a checkpoint folder loads at world size 1 without a process group (``lit_overtok.checkpointing.inference``), e.g.
for ``evaluation/evaluate.py``. Both are registered with Lightning by name, so ``--trainer.strategy
ddp_sharded_checkpoints`` / ``fsdp2`` work as ``ddp`` does (a YAML ``class_path`` works too).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry

from lit_overtok.checkpointing.files import move_into_place, staging_folder
from lit_overtok.checkpointing.inference import METADATA_NAME
from lit_overtok.checkpointing.integrity import is_sharded_checkpoint, verify_checkpoint, write_folder_checksums


class ShardedDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that saves and loads sharded checkpoints (see the module docstring); all DDP options apply."""

    strategy_name = "ddp_sharded_checkpoints"

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # optimizer states load in place, so the optimizer must exist

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # done in load_checkpoint

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, StateDictOptions

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        # Parameter names as keys (not positions): the same at every world size, as ModelParallelStrategy does.
        return get_optimizer_state_dict(self.lightning_module, optimizer, options=StateDictOptions(cpu_offload=True))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        import torch.distributed.checkpoint as dcp

        def write(folder: Path) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            state = {"state_dict": checkpoint.pop("state_dict")}
            state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
            dcp.save(state, checkpoint_id=folder)
            if self.is_global_zero:
                torch.save(checkpoint, folder / METADATA_NAME)

        save_whole_folder(self, filepath, write)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, \
            set_optimizer_state_dict

        path = Path(self.broadcast(checkpoint_path))
        verify_checkpoint(path)  # a file's zip structure and CRCs, a folder's recorded checksums
        module = self.lightning_module
        if not is_sharded_checkpoint(path):
            # One file (a replicated run's, or a converted one): every rank takes its rows from the full tables.
            checkpoint = super().load_checkpoint(path, weights_only=weights_only)
            module.load_state_dict(checkpoint.pop("state_dict"), strict=module.strict_loading)
            for optimizer, state in zip(self.optimizers, checkpoint.pop("optimizer_states", [])):
                optimizer.load_state_dict(state)
            return checkpoint
        model_state = {"state_dict": get_model_state_dict(module)}
        dcp.load(model_state, checkpoint_id=path)
        module.load_state_dict(model_state["state_dict"], strict=module.strict_loading)
        for i, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{i}": get_optimizer_state_dict(module, optimizer)}
            dcp.load(state, checkpoint_id=path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state[f"optimizer_{i}"])
        return torch.load(path / METADATA_NAME, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass  # done in load_checkpoint

    def load_optimizer_state_dict(self, checkpoint) -> None:
        pass  # done in load_checkpoint


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with a 1-D data-parallel mesh over all ranks (no tensor parallelism): FSDP2 for the
    backbone, sharded checkpoints. Options as ModelParallelStrategy's, less the two mesh sizes."""

    strategy_name = "fsdp2"

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        save_whole_folder(self, filepath, lambda folder: super(FSDP2Strategy, self).save_checkpoint(
            checkpoint, folder, storage_options))

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        verify_checkpoint(Path(self.broadcast(checkpoint_path)))
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


def save_whole_folder(strategy, filepath, write: Callable[[Path], None]) -> None:
    """A sharded checkpoint named ``filepath`` only once it is whole: every rank runs ``write(folder)`` into a
    temporary folder beside it, then rank 0 records the checksums and renames it (``files.move_into_place``)."""
    path = Path(strategy.broadcast(filepath))
    staging = Path(strategy.broadcast(staging_folder(path, os.getpid())))  # rank 0's pid: it renames the folder
    if strategy.is_global_zero and staging.exists():
        shutil.rmtree(staging)
    strategy.barrier()
    write(staging)
    if strategy.is_global_zero:
        write_folder_checksums(staging)  # after the writer's last collective: every rank's shards are written
        move_into_place(staging, path)
    strategy.barrier()


for _strategy in (ShardedDDPStrategy, FSDP2Strategy):
    if _strategy.strategy_name not in StrategyRegistry:
        StrategyRegistry.register(_strategy.strategy_name, _strategy, description=_strategy.__doc__.split(":")[0])
