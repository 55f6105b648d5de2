"""Lanes of a training stream and the DataLoader's worker rotation over them (both data modules' exact resume).

A *lane* is one (rank, DataLoader worker) pair: rank ``r`` of ``R`` with worker ``w`` of ``W`` is lane ``r·W + w``.
The DataLoader takes batches from its workers in strict rotation, starting at worker 0 each time it starts an
iterator; after ``C`` batches of a rank were consumed, the worker that delivers the next one must be lane
``(C mod W)``'s, so a new iterator renumbers its workers by ``C`` and the rotation over the lanes continues where it
stopped (docs/method.md §6).
"""

from __future__ import annotations

from torch.utils.data import get_worker_info


def current_lane(rank: int, workers: int, consumed: int, stream: str) -> tuple[int, int]:
    """``(lane, worker)`` that the DataLoader worker running this call plays, after ``consumed`` batches of this rank.

    ``workers`` is the count the stream was built for (``max(1, num_workers)``); a loader with another count would
    deal the lanes differently, so it is an error naming ``stream``.
    """
    info = get_worker_info()
    running = info.num_workers if info is not None else 1
    if running != workers:
        raise RuntimeError(f"{stream} built for {workers} workers runs in a DataLoader with {running}")
    worker = ((info.id if info is not None else 0) + consumed) % workers
    return rank * workers + worker, worker
