"""The global batch of a run: sequences (or tokens) per optimizer step, stated once in the config and turned into
gradient accumulation for the hardware the run starts on.

A recipe's token budget is ``max_steps`` × its global batch (OLMo's ``global_train_batch_size``: 1024 sequences of
4096 tokens for OLMoE). What fits in memory per device is a property of the hardware, so the config states the
global batch and the per-device batch (``data.batch_size``), and at start the CLI sets

    trainer.accumulate_grad_batches = global batch / (devices × nodes × data.batch_size)

and stops with one line naming the fields when that is not a whole number. With a global batch an integer
``trainer.val_check_interval`` counts optimizer steps, as ``max_steps`` and ``log_every_n_steps`` do (Lightning
counts it in micro-batches, so the CLI multiplies it by the accumulation): the whole config then reads the same on
any hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

# Valid per-device batches listed in an error message, at most (the smallest ones).
_MAX_SUGGESTIONS = 12


class GlobalBatchError(ValueError):
    """A global batch the hardware cannot make; the CLI prints it as one line (it is raised after parsing)."""


@dataclass
class GlobalBatch:
    """Per optimizer step, over all ranks: give ``sequences`` or ``tokens``."""

    sequences: Optional[int] = None
    """Sequences (rows of ``data.seq_len`` tokens) per optimizer step."""
    tokens: Optional[int] = None
    """Tokens per optimizer step; a multiple of ``data.seq_len``."""

    def __post_init__(self) -> None:
        if (self.sequences is None) == (self.tokens is None):
            raise ValueError("global_batch: give exactly one of global_batch.sequences and global_batch.tokens "
                             "(or global_batch: null to set trainer.accumulate_grad_batches yourself)")
        for name in ("sequences", "tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"global_batch.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's sequences are made: ranks × per-device batch × accumulated micro-batches."""

    sequences: int
    devices: int
    nodes: int
    per_device: int
    accumulation: int
    seq_len: Optional[int]

    def describe(self) -> str:
        tokens = f" ({self.sequences * self.seq_len:,} tokens)" if self.seq_len else ""
        return (f"global batch {self.sequences} sequences{tokens} = {_count(self.devices, 'device')} × "
                f"{_count(self.nodes, 'node')} × {self.per_device} per device × {self.accumulation} accumulated")


def plan_global_batch(global_batch: GlobalBatch, devices: int, nodes: int, per_device: int,
                      seq_len: Optional[int]) -> BatchPlan:
    """The accumulation that makes ``global_batch`` from ``devices × nodes`` ranks of ``per_device`` sequences."""
    sequences = global_batch.sequences
    if global_batch.tokens is not None:
        if not seq_len or global_batch.tokens % seq_len:
            raise GlobalBatchError(f"global_batch.tokens={global_batch.tokens} is not a multiple of data.seq_len={seq_len}; "
                             "give a multiple of it, or global_batch.sequences")
        sequences = global_batch.tokens // seq_len
    ranks = devices * nodes
    if sequences % (ranks * per_device):
        given = "global_batch.tokens" if global_batch.tokens is not None else "global_batch.sequences"
        raise GlobalBatchError(f"{given} gives {sequences} sequences per step, not a multiple of trainer.devices × "
                         f"trainer.num_nodes × data.batch_size = {devices} × {nodes} × {per_device} = "
                         f"{ranks * per_device}; {_suggestion(sequences, ranks)}")
    return BatchPlan(sequences, devices, nodes, per_device, sequences // (ranks * per_device), seq_len)


def _suggestion(sequences: int, ranks: int) -> str:
    if sequences % ranks:
        return f"no data.batch_size fits {ranks} ranks: use a number of devices × nodes that divides {sequences}"
    per_rank = sequences // ranks
    valid = [b for b in range(1, per_rank + 1) if per_rank % b == 0]
    shown = ", ".join(map(str, valid[:_MAX_SUGGESTIONS])) + (", ..." if len(valid) > _MAX_SUGGESTIONS else "")
    return f"valid data.batch_size values with {_count(ranks, 'rank')}: {shown}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def apply_global_batch(trainer: pl.Trainer, datamodule: pl.LightningDataModule, global_batch: GlobalBatch,
                       configured_accumulation: int) -> BatchPlan:
    """Set the trainer's gradient accumulation (and step-counted validation interval) for ``global_batch``."""
    hparams = getattr(datamodule, "hparams", {})
    if "batch_size" not in hparams:
        raise GlobalBatchError(f"global_batch needs data.batch_size (sequences per device), which "
                         f"{type(datamodule).__name__} does not have; set global_batch: null")
    plan = plan_global_batch(global_batch, trainer.num_devices, trainer.num_nodes, hparams["batch_size"],
                             hparams.get("seq_len"))
    if configured_accumulation not in (1, plan.accumulation):
        raise GlobalBatchError(f"trainer.accumulate_grad_batches={configured_accumulation} contradicts global_batch, which "
                         f"needs {plan.accumulation} here ({plan.describe()}); remove one of them")
    trainer.accumulate_grad_batches = plan.accumulation
    if isinstance(trainer.val_check_interval, int):
        trainer.val_check_interval *= plan.accumulation
    rank_zero_info(plan.describe())
    return plan
