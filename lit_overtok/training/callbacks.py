"""Lightning callbacks shared by every run: speed and memory in ``train/``, and a progress bar counted in steps.

Both count optimizer steps, the step axis of every logged tag (``lightning_module``): with gradient accumulation a
step is several batches, and a resumed run starts at the checkpoint's step.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n, convert_inf


def measure_matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of a square matmul on the CPU with the current threads: the peak MFU is measured against where no
    vendor figure exists (benchmarks/throughput.py uses the same yardstick)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: CUDA's allocator peak on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib_or_bytes / (2**30 if sys.platform == "darwin" else 2**20)


class TokenThroughputMonitor(Callback):
    """Logs, every ``log_every_n_steps`` optimizer steps, over the steps since the previous log:

    * ``train/tokens_per_sec`` (all ranks together) and ``train/tokens_per_sec_per_device``;
    * ``train/flops_per_sec_per_device``: model FLOPs (``pl_module.flops_per_batch``; lookups excluded);
    * ``train/mfu``: those FLOP/s over the device's peak: ``peak_flops_per_sec`` if given, else Lightning's figure
      for known GPUs, else (CPU) a matmul measured at the start of fit in the run's dtype;
    * ``train/peak_memory_gib``: CUDA's allocator peak, or the process's peak RSS on the CPU.

    Time runs from each training batch's start to its end (forward, backward, optimizer step): data loading,
    validation and in-training evaluation are left out. The CLI puts this callback first so that no other
    callback's ``on_train_batch_end`` work is timed.
    """

    def __init__(self, peak_flops_per_sec: Optional[float] = None) -> None:
        super().__init__()
        if peak_flops_per_sec is not None and peak_flops_per_sec <= 0:
            raise ValueError(f"TokenThroughputMonitor: peak_flops_per_sec must be positive, got {peak_flops_per_sec}")
        self.peak_flops_per_sec = peak_flops_per_sec
        self._started: Optional[float] = None
        self._seconds = self._tokens = self._flops = 0.0
        self.last_window: dict[str, float] = {}  # the metrics last logged, for the console line (``console``)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        if self.peak_flops_per_sec is None:
            dtype = torch.bfloat16 if str(trainer.precision).startswith("bf16") else torch.float32
            self.peak_flops_per_sec = get_available_flops(device, dtype) or (
                measure_matmul_peak(dtype) if device.type == "cpu" else None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._seconds += time.perf_counter() - self._started
        self._tokens += batch["input_ids"].numel()
        self._flops += float(pl_module.flops_per_batch)
        stepped = not trainer.fit_loop._should_accumulate()
        if stepped and trainer.global_step % trainer.log_every_n_steps == 0 and self._seconds > 0:
            self.log_window(trainer)

    def log_window(self, trainer: pl.Trainer) -> None:
        per_device = self._tokens / self._seconds
        flops = self._flops / self._seconds
        metrics = {"train/tokens_per_sec": per_device * trainer.world_size, "train/tokens_per_sec_per_device": per_device,
                   "train/flops_per_sec_per_device": flops,
                   "train/peak_memory_gib": peak_memory_gib(trainer.strategy.root_device)}
        if self.peak_flops_per_sec:
            metrics["train/mfu"] = flops / self.peak_flops_per_sec
        self._seconds = self._tokens = self._flops = 0.0
        self.last_window = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


# tqdm's default layout with the count shown to two decimals (quarter steps and the like).
FRACTIONAL_BAR = "{desc}{percentage:3.0f}%|{bar}| {n:.2f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class StepProgressBar(TQDMProgressBar):
    """tqdm's bar over optimizer steps out of ``max_steps``, so it has a total and an ETA even for endless data
    streams; a resumed run starts at its checkpoint's step, and its rate and ETA count only the steps it ran.

    With gradient accumulation the bar also moves by micro-batches (``12.25/192000``): an optimizer step of many
    micro-batches can take minutes on a CPU, and a bar that waits for the first whole step shows no rate nor ETA."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *_) -> None:
        bar = self.train_progress_bar
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        bar.reset(convert_inf(total))
        bar.initial = bar.n = bar.last_print_n = trainer.global_step  # tqdm's rate is (n - initial) / elapsed
        bar.set_description("Training")
        bar.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step, bar, accumulate = trainer.global_step, self.train_progress_bar, trainer.accumulate_grad_batches
        micro_batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready % accumulate  # into the next step
        if micro_batches and self.is_enabled:
            bar.bar_format = FRACTIONAL_BAR
            _update_n(bar, step + micro_batches / accumulate)
        elif self._should_update(step, bar.total):
            _update_n(bar, step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
