"""One run per version folder: an exclusive claim on ``<default_root_dir>/version_N`` before anything is written.

Lightning picks a new run's version by listing the folders (``max + 1``), so fits started together on one
``default_root_dir`` can pick the same ``version_N`` and interleave their checkpoints and events. Here a new run's
folder is made with ``mkdir`` (which fails when another process made it first: the next number is tried), and every
run, new or resumed, then creates ``version_N/.claim`` with ``O_EXCL`` holding its pid. A second fit resuming the same
folder while the first is alive stops with one line naming it; a claim left by a killed process (its pid gone) is
taken over. The claim is handed back when the command ends (``release_claims``) or the process exits.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import Optional, Union

from lit_overtok.checkpointing.files import process_alive
from lit_overtok.errors import InputError

CLAIM_NAME = ".claim"
_held: list[Path] = []  # this process's claims


def _number(folder: Path) -> int:
    suffix = folder.name.removeprefix("version_")
    return int(suffix) if suffix.isdigit() else -1


def claim_version(root: Union[str, os.PathLike], version: Optional[int] = None) -> int:
    """Claim ``root/version_<version>`` (a resumed run's), or a new ``version_N`` after the highest one."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise InputError(f"trainer.default_root_dir={root} is a file; give a folder for the run's logs and checkpoints")
    root.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = max((_number(p) for p in root.glob("version_*")), default=-1) + 1
        while True:
            try:
                (root / f"version_{version}").mkdir()
                break
            except FileExistsError:  # another run made it since we listed: the next one
                version += 1
    folder = root / f"version_{version}"
    folder.mkdir(exist_ok=True)
    _claim(folder / CLAIM_NAME)
    return version


def _claim(path: Path) -> None:
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = path.read_text().strip()
            if holder.isdigit() and int(holder) != os.getpid() and process_alive(int(holder)):
                raise InputError(f"{path.parent} is in use by another fit (pid {holder}); wait for it to end, or "
                                 "give this run another trainer.default_root_dir") from None
            path.unlink(missing_ok=True)  # left by a process that is gone
            continue
        with os.fdopen(descriptor, "w") as stream:
            stream.write(f"{os.getpid()}\n")
        _held.append(path)
        atexit.register(_release, path, os.getpid())
        return
    raise InputError(f"{path.parent}: could not claim it for this run (another fit claimed it at the same moment)")


def _release(path: Path, pid: int) -> None:
    if os.getpid() == pid and path.is_file() and path.read_text().strip() == str(pid):
        path.unlink(missing_ok=True)


def abandon_version(root: Union[str, os.PathLike], version: Optional[int]) -> None:
    """Hand back this process's claim on ``root/version_<version>``, and the folder itself if nothing was written."""
    if version is None:
        return
    folder = Path(root) / f"version_{version}"
    _release(folder / CLAIM_NAME, os.getpid())
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def release_claims() -> None:
    """Hand back every claim this process holds (the end of a command run in a longer-lived process)."""
    while _held:
        _release(_held.pop(), os.getpid())
