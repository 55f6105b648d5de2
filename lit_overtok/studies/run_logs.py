"""Reading a run's folder: its TensorBoard scalars as one run, however often it was resumed (docs/method.md §6).

The one reader of run folders for the studies (``speedup``, ``report``, ``sweep``; the checkpoint to resume or score
is ``checkpointing.files.find_resume_checkpoint``'s).

A run resumed by ``train.py`` continues in its own version folder, and TensorBoard's ``purge_step`` drops what the
interrupted run logged after the checkpoint it resumed from. A run resumed into a new version folder (another
logger, an older version of this template) leaves ``version_0``, ``version_1``, ... side by side; those are stitched
here the same way: each later version replaces everything the earlier ones logged after its first step, every tag
alike (a tag it has not logged again yet included: those values belong to the discarded stretch), and at its first
step its own values win. A later version that starts again at step 0 (a rerun, not a resume) therefore replaces its
predecessors entirely. Tags whose step axis is training tokens (``*_by_tokens``) are cut the same way on their own
axis: at the later version's first token count.
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


TOKENS_AXIS_SUFFIX = "_by_tokens"  # training/lm_eval_callback.py's twins, logged with step = tokens seen


def _first_steps(scalars: dict[str, dict[int, float]]) -> dict[bool, int]:
    """The first logged step on each axis: ``{False: optimizer steps, True: tokens}`` (absent: nothing logged)."""
    first: dict[bool, int] = {}
    for tag, by_step in scalars.items():
        axis = tag.endswith(TOKENS_AXIS_SUFFIX)
        if by_step:
            first[axis] = min(first.get(axis, min(by_step)), min(by_step))
    return first


def read_run_scalars(path: str) -> Scalars:
    """``{tag: (steps, values)}`` of a run's scalars, sorted by step, its version folders stitched into one run
    (see the module docstring; the last value of a repeated step wins)."""
    merged: dict[str, dict[int, float]] = {}
    folders = event_folders(path)
    for folder in folders:
        scalars = _folder_scalars(folder)
        first = _first_steps(scalars)
        if not first:
            continue
        steps_so_far = [s for tag, by_step in merged.items() if not tag.endswith(TOKENS_AXIS_SUFFIX) for s in by_step]
        if steps_so_far and False in first:
            print(f"{path}: {folder.name} continues from step {first[False]} (the run before it reached step "
                  f"{max(steps_so_far)}); reading them as one run", file=sys.stderr)
        for tag, by_step in merged.items():
            cut = first.get(tag.endswith(TOKENS_AXIS_SUFFIX))
            for step in [s for s in by_step if cut is not None and s > cut]:
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
