"""Reading a run's TensorBoard scalars as one run, however often it was resumed.

A run resumed by ``train.py`` continues in its own version folder, and TensorBoard's ``purge_step`` drops what the
interrupted run logged after the checkpoint it resumed from. A run resumed into a new version folder (another
logger, an older version of this template) leaves ``version_0``, ``version_1``, ... side by side; those are stitched
here the same way: each later version replaces everything the earlier ones logged after its first step, and at its
first step its own values win. A later version that starts again at step 0 (a rerun, not a resume) therefore
replaces its predecessors entirely. ``evaluation/speedup.py`` reads runs through ``read_run_scalars``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

Scalars = dict[str, tuple[np.ndarray, np.ndarray]]


def event_folders(path: str) -> list[Path]:
    """The folders under ``path`` that hold TensorBoard event files: one run's, in the order they were written.

    Several folders are one run only when they are its ``version_<N>`` folders (ordered by N); anything else is an
    error listing them.
    """
    folders = sorted({Path(root) for root, _, files in os.walk(path)
                      if any(f.startswith("events.out.tfevents") for f in files)})
    if not folders:
        raise FileNotFoundError(f"{path}: no TensorBoard event files (events.out.tfevents.*) found")
    parents = {f.parent for f in folders}
    versions = all(f.name.startswith("version_") and f.name[len("version_"):].isdigit() for f in folders)
    if len(folders) > 1 and not (versions and len(parents) == 1):
        raise ValueError(f"{path} holds several runs; pass one of: " + ", ".join(str(f) for f in folders))
    return sorted(folders, key=lambda f: int(f.name[len("version_"):]) if versions else 0)


def _folder_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # TensorBoard's own reader: within a folder it applies purge_step and drops events a restart logged again.
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()["scalars"]}


def read_run_scalars(path: str) -> Scalars:
    """``{tag: (steps, values)}`` of a run's scalars, sorted by step, its version folders stitched into one run
    (the last value of a repeated step wins)."""
    merged: dict[str, dict[int, float]] = {}
    folders = event_folders(path)
    for folder in folders:
        scalars = _folder_scalars(folder)
        first = min((step for by_step in scalars.values() for step in by_step), default=None)
        if first is None:
            continue
        if merged:
            last = max(step for by_step in merged.values() for step in by_step)
            print(f"{path}: {folder.name} continues from step {first} (the run before it reached step {last}); "
                  f"reading them as one run", file=sys.stderr)
        for by_step in merged.values():
            for step in [s for s in by_step if s > first]:
                del by_step[step]
        for tag, by_step in scalars.items():
            merged.setdefault(tag, {}).update(by_step)
    result = {}
    for tag, by_step in merged.items():
        if not by_step:
            continue
        steps = sorted(by_step)
        result[tag] = (np.array(steps, dtype=np.float64), np.array([by_step[s] for s in steps], dtype=np.float64))
    return result
