"""A run's summary in TensorBoard: the HPARAMS tab (config, the run's shape and budget, and parameter counts against
the final metrics) and the parameter counts as a text table, instead of lone scalar points.

TensorBoard's HPARAMS tab lists each run's hyperparameters beside the *last* value of the metric tags its
experiment declares, so declaring ``val/loss`` there shows the final validation loss without logging it twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

SUMMARY_METRICS = ("val/loss", "train/loss_next1", "eval/downstream", "eval/cfg_generation/acc",
                   "eval/cfg_next_token_validity/acc")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"model_config/over_encoding/m": 97}``, leaves as the scalars TensorBoard takes."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}/").items()}
    if isinstance(tree, (bool, int, float, str)):
        return {prefix.rstrip("/"): tree}
    return {prefix.rstrip("/"): str(tree)}  # None, lists: as text


def counts_table(counts: dict[str, int]) -> str:
    rows = "\n".join(f"| {name} | {count:,} |" for name, count in counts.items())
    return f"| parameters | count |\n|---|---|\n{rows}\n"


def run_shape(trainer: pl.Trainer) -> dict[str, Any]:
    """What a run is beside its model and optimizer: sequence length, sequences per optimizer step over all ranks,
    max steps, seed (``seed_everything``'s) and the token budget they make (``run/*`` in the HPARAMS tab)."""
    data = getattr(trainer.datamodule, "hparams", None) or {}
    seq_len, per_device = data.get("seq_len"), data.get("batch_size")
    shape: dict[str, Any] = {"max_steps": trainer.max_steps, "seed": os.environ.get("PL_GLOBAL_SEED")}
    if seq_len is not None and per_device is not None:
        sequences = per_device * trainer.accumulate_grad_batches * trainer.world_size
        shape.update(seq_len=seq_len, global_batch=sequences, tokens_per_step=sequences * seq_len,
                     token_budget=sequences * seq_len * trainer.max_steps if trainer.max_steps > 0 else None)
    return {key: int(value) if isinstance(value, str) and value.isdigit() else value for key, value in shape.items()}


@rank_zero_only
def log_hparams_tab(loggers: list[Logger], hparams: dict[str, Any], counts: dict[str, int], step: int,
                    run: dict[str, Any]) -> None:
    """Parameter counts and the run's shape (``run_shape``) into every logger's hyperparameters (``hparams.yaml``);
    for TensorBoard also the HPARAMS entry and a text table (tag ``parameter_counts``)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    for logger in loggers:
        logger.log_hyperparams({"parameter_counts": dict(counts), "run": dict(run)})
        if not isinstance(logger, TensorBoardLogger):
            continue
        # Lightning writes hparams.yaml only while it does not exist yet, i.e. before the counts were known.
        save_hparams_to_yaml(Path(logger.log_dir) / logger.NAME_HPARAMS_FILE, logger.hparams)
        values = flatten({**hparams, "run": run, "params": counts})
        experiment, start, end = hparams_summary(values, dict.fromkeys(SUMMARY_METRICS, 0.0))
        writer = logger.experiment._get_file_writer()
        for summary in (experiment, start, end):
            writer.add_summary(summary, step)
        logger.experiment.add_text("parameter_counts", counts_table(counts), step)
