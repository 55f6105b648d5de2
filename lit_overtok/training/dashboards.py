"""A run's summary in TensorBoard: the HPARAMS tab (config and parameter counts against the final metrics) and the
parameter counts as a text table, instead of lone scalar points.

TensorBoard's HPARAMS tab lists each run's hyperparameters beside the *last* value of the metric tags its
experiment declares, so declaring ``val/loss`` there shows the final validation loss without logging it twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


@rank_zero_only
def log_hparams_tab(loggers: list[Logger], hparams: dict[str, Any], counts: dict[str, int], step: int) -> None:
    """Parameter counts into every logger's hyperparameters (``hparams.yaml``); for TensorBoard also the HPARAMS
    entry and a text table (tag ``parameter_counts``)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    for logger in loggers:
        logger.log_hyperparams({"parameter_counts": dict(counts)})
        if not isinstance(logger, TensorBoardLogger):
            continue
        # Lightning writes hparams.yaml only while it does not exist yet, i.e. before the counts were known.
        save_hparams_to_yaml(Path(logger.log_dir) / logger.NAME_HPARAMS_FILE, logger.hparams)
        values = flatten({**hparams, "params": counts})
        experiment, start, end = hparams_summary(values, dict.fromkeys(SUMMARY_METRICS, 0.0))
        writer = logger.experiment._get_file_writer()
        for summary in (experiment, start, end):
            writer.add_summary(summary, step)
        logger.experiment.add_text("parameter_counts", counts_table(counts), step)
