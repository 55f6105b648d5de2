"""Checkpoint files that are whole or refused, and found again: the file-level half of resuming a run.

* **Integrity** (``integrity.verify_checkpoint``: the zip structure and every member's CRC-32 of a file, the
  recorded checksums of a sharded folder): a flipped bit, a truncated or empty file, or a file that is not a
  checkpoint is a ``CheckpointError`` naming the file, never a model that trains or scores on damaged weights.
  ``load_verified`` is the one way to open a checkpoint file: Lightning's resume (through ``AtomicCheckpointIO``),
  ``evaluation/evaluate.py`` and, through ``inference.read_checkpoint``, export, generate, strip and the lm-eval
  model all call it.
* **Atomic writes.** ``AtomicCheckpointIO`` writes to a temporary file beside the target, fsyncs it and renames it
  into place: a crash or a full disk leaves the previous checkpoints and never a partial one under a real name. A
  sharded checkpoint folder is written under a temporary name by all ranks and renamed once complete
  (``staging_folder``, ``move_into_place``).
  ``link_atomically`` points ``last.ckpt`` at a step file the same way (a symlink; a hard link or a copy where the
  filesystem has no symlinks).
* **Finding the checkpoint to resume from** (``--ckpt_path auto`` or a run folder): ``find_resume_checkpoint``.

The training-loop half (when to save, saving on Ctrl-C / SIGTERM / SLURM's requeue signal) is ``run_checkpoint``;
what is inside a checkpoint (the network, the small inference checkpoint) is ``checkpoints``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from lit_overtok.checkpointing.integrity import CheckpointError, is_sharded_checkpoint, verify_checkpoint

PathLike = Union[str, os.PathLike]
LAST_NAME = "last.ckpt"
_STEP = re.compile(r"step=(\d+)")


def load_verified(path: PathLike, map_location: Any = "cpu", weights_only: Optional[bool] = False,
                  mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` after ``verify_checkpoint``; any failure is one ``CheckpointError`` naming it."""
    verify_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as error:  # the bytes are as written, so this is a checkpoint of another kind
        raise CheckpointError(f"{path} cannot be loaded ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


# ---------------------------------------------------------------------------------------------------- writing
def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def _temporary_beside(path: Path, kind: str):
    """A temporary name in ``path``'s folder (same filesystem, so the rename is atomic), removed on failure."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{kind}")
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: PathLike) -> None:
    """Delete temporary files and folders that a process killed mid-write left in ``folder`` (its pid is in their
    name)."""
    for path in Path(folder).glob(".*"):
        *_, pid, kind = path.name.rsplit(".", 2)
        if kind in ("partial", "link", "old") and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_atomically(checkpoint: dict[str, Any], path: PathLike) -> None:
    """``torch.save`` to a temporary file, fsync, rename: ``path`` is the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)  # the CRCs are what verify_checkpoint checks
    try:
        with _temporary_beside(path, "partial") as temporary:
            with open(temporary, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch reports a failed write as RuntimeError
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {path} ({reason}); nothing was written under that name, "
                              "and the checkpoints written before are intact") from error
    finally:
        torch.serialization.set_crc32_options(crc32)
    _fsync_directory(path.parent)


def link_atomically(target: PathLike, link: PathLike) -> str:
    """Make ``link`` name ``target``'s checkpoint in one rename: a relative symlink, else a hard link, else a copy.

    Returns which of the three it made.
    """
    target, link = Path(target), Path(link)
    with _temporary_beside(link, "link") as temporary:
        temporary.unlink(missing_ok=True)
        try:
            os.symlink(os.path.relpath(target, link.parent), temporary)
            kind = "symlink"
        except OSError:
            try:
                os.link(target, temporary)
                kind = "hardlink"
            except OSError:
                shutil.copyfile(target, temporary)
                kind = "copy"
        os.replace(temporary, link)
    _fsync_directory(link.parent)
    return kind


def staging_folder(path: PathLike, pid: int) -> Path:
    """Where the ranks write a sharded checkpoint folder before ``move_into_place`` names it ``path`` (``pid``: the
    process that moves it, so that a folder left by a killed run is removed at the next start)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{pid}.partial")


def move_into_place(staging: PathLike, path: PathLike) -> None:
    """Give the complete sharded checkpoint folder ``staging`` its name ``path`` in one rename (replacing what had
    that name): a rank killed while the ranks write leaves a hidden ``.partial`` folder, never a half-written
    checkpoint that ``--ckpt_path auto`` or ``evaluate.py`` would take."""
    staging, path = Path(staging), Path(path)
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        os.replace(path, old)  # a folder cannot be renamed over a folder: the old one steps aside first
        os.replace(staging, path)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(staging, path)
    _fsync_directory(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic local writes and verified loads (remote URLs: Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path: PathLike, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if _is_local_file_protocol(path):
            verify_checkpoint(path)
        location = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=weights_only, **location)


# ------------------------------------------------------------------------------------------------- resuming
def checkpoint_step(path: PathLike) -> int:
    """The optimizer step a checkpoint was saved at (from its name ``...step=N...``, else from its contents)."""
    path = Path(path)
    match = _STEP.search(path.resolve().name)
    if match:
        return int(match.group(1))
    return int(load_verified(path, mmap=True).get("global_step", 0))


def _version_number(folder: Path) -> int:
    suffix = folder.name.removeprefix("version_")
    return int(suffix) if suffix.isdigit() else -1


def find_resume_checkpoint(folder: PathLike) -> Optional[Path]:
    """The newest sound checkpoint of the latest run under ``folder`` (a run root with ``version_*`` folders, or one
    version folder); None when there is none. Damaged checkpoints are skipped with a warning naming them."""
    folder = Path(folder)
    versions = sorted((p for p in folder.glob("version_*") if p.is_dir()), key=_version_number, reverse=True)
    for run in versions or [folder]:
        candidates = [p for p in (run / "checkpoints").glob("*.ckpt") if p.name != LAST_NAME or not p.is_symlink()]
        named = sorted(candidates, key=lambda p: (checkpoint_step_or_none(p), p.name == LAST_NAME), reverse=True)
        for path in named:
            try:
                verify_checkpoint(path)
            except CheckpointError as error:
                warnings.warn(f"skipping it for resume: {error}")
                continue
            return path
    return None


def checkpoint_step_or_none(path: Path) -> int:
    """``checkpoint_step`` for ordering candidates: -1 for a file that cannot be read (it sorts last)."""
    try:
        return checkpoint_step(path)
    except CheckpointError:
        return -1


def run_version(checkpoint: PathLike, root: PathLike) -> Optional[int]:
    """N when ``checkpoint`` lies in ``<root>/version_N/checkpoints/``: the log folder its run writes to."""
    checkpoint, root = Path(checkpoint).absolute(), Path(root).absolute()
    run = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and run.parent == root and _version_number(run) >= 0:
        return _version_number(run)
    return None


def resolve_ckpt_path(spec: Optional[str], root: PathLike) -> Optional[str]:
    """``--ckpt_path`` as the CLI passes it to Lightning, verified before Lightning opens it: ``auto`` is the newest
    sound checkpoint of the latest run under ``root`` (None, a fresh run, when there is none yet: the first start of a
    requeued job); a run folder is the same search inside it (an error when it holds none); a checkpoint file or
    sharded checkpoint folder must verify (``integrity.verify_checkpoint``). Lightning's names (``last``, ``hpc``...)
    are left to it."""
    if spec is None or spec in ("last", "best", "hpc", "registry"):
        return spec
    if spec != "auto" and (Path(spec).is_file() or is_sharded_checkpoint(spec) or not Path(spec).exists()):
        verify_checkpoint(spec)
        return spec
    folder = Path(root) if spec == "auto" else Path(spec)
    found = find_resume_checkpoint(folder)
    if found is None and spec != "auto":
        raise CheckpointError(f"--ckpt_path {spec}: no checkpoint (checkpoints/*.ckpt) in any run under it")
    print(f"--ckpt_path {spec}: " + (f"resuming from {found}" if found else f"no checkpoint under {folder} yet; "
                                      "starting a new run"), file=sys.stderr)
    return None if found is None else str(found)


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """The Trainer's ``plugins`` plus ``AtomicCheckpointIO``, unless a checkpoint I/O plugin is given already."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins
