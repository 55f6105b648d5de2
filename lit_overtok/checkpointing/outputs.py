"""Where the commands that read a run put what they make: under that run's folder, never silently in the current one.

A run folder is what ``train.py fit`` writes (``<default_root_dir>/version_N``: events, ``config.yaml``,
``checkpoints/``). ``evaluate.py`` writes ``<run>/eval/``, ``train.py export`` ``<run>/hf/``, ``train.py generate``
``<run>/samples.txt`` and ``speedup.py`` ``<treatment run>/speedup.md`` and ``.png``, unless given an explicit path;
replacing an earlier output is said on stderr, never done silently. ``train.py validate`` and ``test`` log into
``<run>/validate`` and ``<run>/test``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, Path]


def run_folder(path: PathLike) -> Path:
    """The run a checkpoint belongs to (``<run>/checkpoints/x.ckpt``, a file or a sharded folder -> ``<run>``); a run
    folder given as such is itself; a checkpoint kept elsewhere (e.g. a stripped copy) has its own folder."""
    path = Path(path)
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return path if path.is_dir() and not path.suffix == ".ckpt" else path.parent


def output_path(explicit: Optional[PathLike], source: PathLike, name: str) -> Path:
    """``explicit`` if given, else ``name`` inside the run folder of ``source``; says so when it replaces something."""
    path = Path(explicit) if explicit is not None else run_folder(source) / name
    say_if_replacing(path)
    return path


def say_if_replacing(path: Path) -> None:
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        print(f"replacing {path}", file=sys.stderr)


def evaluation_logger_kwargs(checkpoint: Optional[PathLike], root: PathLike, stage: str) -> dict[str, str]:
    """TensorBoardLogger arguments for ``train.py validate|test``: the ``<stage>`` sub-folder of the checkpoint's run
    (``<run>/test``; ``<root>/<stage>`` without a checkpoint), so an evaluation is never a new ``version_N`` that
    TensorBoard shows as another training run, and it leaves the run's own ``config.yaml`` alone."""
    return {"save_dir": str(run_folder(checkpoint) if checkpoint else Path(root)), "name": "", "version": stage}
