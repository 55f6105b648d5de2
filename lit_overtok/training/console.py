"""What a run prints while it trains: one compact line per logging interval and per validation, and none of
Lightning's messages that say nothing about this run.

The line (as nanoGPT's and torchtitan's) carries what one looks for in a scrolled log: the step out of ``max_steps``,
training tokens, the training loss, the last validation loss, tokens per second, MFU, peak memory and an ETA::

    step 40/250 | 20.5k tok | loss 1.962 | val 1.950 | 1.6k tok/s | MFU 1.2% | mem 0.41 GiB | ETA 0:02:10

Speed, MFU and memory are the window ``callbacks.TokenThroughputMonitor`` logged last; the ETA extrapolates the wall
time per step of this fit (validation and evaluation included) to the steps left.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
import warnings
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelSummary
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

from lit_overtok.training.callbacks import TokenThroughputMonitor


def _count(value: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


class ConsoleLine(Callback):
    """Prints the line every ``log_every_n_steps`` optimizer steps and after each validation (rank 0)."""

    def __init__(self) -> None:
        super().__init__()
        self._start: Optional[tuple[float, int]] = None  # (wall time, step) when this fit's training began

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        stepped = not trainer.fit_loop._should_accumulate()
        if stepped and trainer.global_step % trainer.log_every_n_steps == 0:
            self.emit(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:  # `train.py validate` has its table
            self.emit(trainer, pl_module)

    def emit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        line = self.line(trainer, pl_module)
        bar = trainer.progress_bar_callback
        bar.print(line) if bar is not None and bar.is_enabled else print(line, flush=True)

    def line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        metrics = trainer.callback_metrics
        step, total = trainer.global_step, trainer.max_steps
        fields = [f"step {step}/{total}" if total > 0 else f"step {step}",
                  f"{_count(getattr(pl_module, 'tokens_seen', 0))} tok"]
        fields += [f"{label} {float(metrics[tag]):.3f}" for tag, label in (("train/loss", "loss"), ("val/loss", "val"))
                   if tag in metrics]
        window = next((c.last_window for c in trainer.callbacks if isinstance(c, TokenThroughputMonitor)), {})
        if "train/tokens_per_sec" in window:
            fields.append(f"{_count(window['train/tokens_per_sec'])} tok/s")
        if "train/mfu" in window:
            fields.append(f"MFU {100 * window['train/mfu']:.1f}%")
        if "train/peak_memory_gib" in window:
            fields.append(f"mem {window['train/peak_memory_gib']:.2f} GiB")
        eta = self.eta_seconds(step, total)
        if eta is not None:
            fields.append(f"ETA {datetime.timedelta(seconds=round(eta))}")
        return " | ".join(fields)

    def eta_seconds(self, step: int, total: int) -> Optional[float]:
        if self._start is None or total <= 0 or step <= self._start[1]:
            return None
        started, first_step = self._start
        return (time.perf_counter() - started) / (step - first_step) * max(total - step, 0)


class QuietModelSummary(ModelSummary):
    """Lightning's module table without its FLOPs column and "Total FLOPs: 0" line: Lightning counts FLOPs only
    for a module with an ``example_input_array``, so ours read 0; ``train/flops_per_sec_per_device`` and
    ``train/mfu`` carry the real figures."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **kwargs) -> None:
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info(
            "\n" + re.sub(r"\n[^\n]*Total FLOPs[^\n]*", "", table, flags=re.IGNORECASE))


class _DropTips(logging.Filter):
    """Lightning's advertisements for its cloud services ("💡 Tip: ... litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning() -> None:
    """Silences the known noise of a run, and nothing else: the cloud tips (by their text, on Lightning's
    rank-zero logger) and the deprecation of torch's ``LeafSpec`` that Lightning's own ``_pytree`` triggers."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
