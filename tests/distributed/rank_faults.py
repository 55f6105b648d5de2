"""Faults across ranks, made deterministic: every rank of a real ``train.py fit`` (the CLI, in forked processes with
a launcher's environment) holds at a chosen step until the test has delivered its signals, so a SIGTERM to all ranks
or a SIGKILL of one arrives at a known point of the run."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from tests.distributed.harness import free_port, launcher_env

HOLD_TIMEOUT_S = 120.0


class HoldAt(Callback):
    """After optimizer step ``step`` (its batch end, after any checkpoint due there), write ``held.<rank>`` in
    ``folder`` and wait for ``release`` there (the test's signals arrive meanwhile). ``ranks``: which ranks hold
    ("all", or a comma-separated list): a rank that does not hold runs on into the next step's collectives."""

    def __init__(self, step: int, folder: str, ranks: str = "all") -> None:
        self.step, self.folder, self.ranks, self.done = step, Path(folder), ranks, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        mine = self.ranks == "all" or str(trainer.global_rank) in self.ranks.split(",")
        if trainer.global_step != self.step or self.done or not mine:
            return
        self.done = True
        (self.folder / f"held.{trainer.global_rank}").write_text(str(os.getpid()))
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        while not (self.folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)


def _rank_main(rank: int, world: int, port: int, args: list[str], logs: str) -> None:
    os.environ.update(launcher_env(world, rank, port))
    log = open(os.path.join(logs, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log  # not the test's captured streams
    torch.set_num_threads(1)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from lit_overtok.cli.main import main

    rank_zero_only.rank = rank  # what a fresh interpreter of this rank reads from the environment at import

    code = 0
    try:
        main(args)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_ranks(world: int, args: list[str], logs: Path) -> list:
    """``train.py fit`` ``args`` on ``world`` forked ranks (gloo, as torchrun would start them); their processes."""
    import multiprocessing

    logs.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("fork")
    port = free_port()
    processes = [context.Process(target=_rank_main, args=(rank, world, port, args, str(logs))) for rank in range(world)]
    for process in processes:
        process.start()
    return processes


def end_all(processes: list, timeout: float) -> list[int]:
    """The ranks' exit codes, once every one has ended; an AssertionError naming the ranks still running after
    ``timeout`` s (a hang), which are killed then, so that no test leaves processes behind."""
    try:
        wait_for(lambda: all(p.exitcode is not None for p in processes), timeout, "every rank to end")
    except AssertionError:
        running = [rank for rank, p in enumerate(processes) if p.exitcode is None]
        kill_all(processes)
        raise AssertionError(f"ranks {running} still running {timeout:.0f} s after the fault (a hang)") from None
    for p in processes:
        p.join()
    return [p.exitcode for p in processes]


def kill_all(processes: list) -> None:
    for p in processes:
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGKILL)
        p.join()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


class KillInShardedSave(Callback):
    """SIGKILL rank ``rank`` inside the sharded checkpoint save of step ``step``: after torch.distributed.checkpoint
    has written every rank's shards and the index, before the folder is complete (its metadata and checksums)."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step, self.rank = step, rank

    def setup(self, trainer, pl_module, stage) -> None:
        import torch.distributed.checkpoint as dcp

        if trainer.global_rank != self.rank:
            return
        save = dcp.save

        def save_then_die(*args, **kwargs):
            result = save(*args, **kwargs)
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        dcp.save = save_then_die
