"""Reading a checkpoint in one process: a Lightning ``.ckpt`` file, or the folder a sharded run writes
(torch.distributed.checkpoint: ``*.distcp`` shards, ``.metadata``, ``meta.pt`` with the trainer state; see
``strategies``), whatever the world size that wrote it. The folder's row-sharded tables come back whole, as a
replicated run's would, so any model of the same configuration (``sharded`` on or off) loads them; this needs the
whole model in host memory (OE-12.8M at d_model 1024: 53 GB of table weights), as evaluation at world size 1 does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

METADATA_NAME = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def read_checkpoint(path: str | Path, optimizer_states: bool = False) -> dict[str, Any]:
    """The checkpoint as one dict (``state_dict``, ``hyper_parameters``, ``global_step``, ...) without a process
    group; a folder's optimizer states (twice the weights again) only when asked for."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    keys = None if optimizer_states else {"state_dict"}
    checkpoint: dict[str, Any] = {}
    _load_state_dict(checkpoint, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys=keys),
                     no_dist=True)
    if (path / METADATA_NAME).is_file():
        checkpoint.update(torch.load(path / METADATA_NAME, map_location="cpu", weights_only=False))
    return checkpoint
