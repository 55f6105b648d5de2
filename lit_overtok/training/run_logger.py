"""The run's TensorBoard logger: one claimed version folder per run, continued by its resumption, each value once.

* A resumed run logs into the version folder of its checkpoint; what the interrupted run logged after the
  checkpoint's step is dropped by TensorBoard's ``purge_step`` (a restart marker: readers discard the folder's
  earlier events at or after that step), so every reader sees one run, each step once.
* That marker works on the step axis of every tag, but the ``*_by_tokens`` twins (``lm_eval_callback.log_by_tokens``)
  have training tokens as their step, always past it: the purge would drop all of them. ``RunLogger`` reads them
  before the new event file exists and writes again, after the marker, those logged up to the checkpoint's tokens.
* The folder is claimed before the logger is made (``checkpointing.version_claim``), so concurrent fits never share
  one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

TOKEN_AXIS_SUFFIX = "_by_tokens"


def token_twins(folder: Path, up_to_tokens: int) -> list[tuple[float, int, str, float]]:
    """``(wall_time, tokens, tag, value)`` of every token-axis twin logged in ``folder`` up to ``up_to_tokens``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not any(folder.glob("events.out.tfevents.*")):
        return []
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return sorted((event.wall_time, event.step, tag, event.value) for tag in events.Tags()["scalars"]
                  if tag.endswith(TOKEN_AXIS_SUFFIX) for event in events.Scalars(tag) if event.step <= up_to_tokens)


class RunLogger(TensorBoardLogger):
    """TensorBoard in ``root/version_<version>``, no placeholder ``hp_metric``; a resumed run (``resumed_step``,
    ``resumed_tokens`` of its checkpoint) purges what was logged after the checkpoint and keeps the token twins."""

    def __init__(self, root: str, version: Optional[int], resumed_step: Optional[int] = None,
                 resumed_tokens: Optional[int] = None, **kwargs: Any) -> None:
        purge = {} if resumed_step is None else {"purge_step": resumed_step + 1}
        super().__init__(root, name="", version=version, default_hp_metric=False, **purge, **kwargs)
        self._carried = (token_twins(Path(self.log_dir), resumed_tokens or 0)
                         if resumed_step is not None and rank_zero_only.rank == 0 else [])

    @property
    def experiment(self) -> Any:
        experiment = super().experiment
        if self._carried:  # right after the writer's restart marker, so the purge does not reach them
            carried, self._carried = self._carried, []
            for wall_time, tokens, tag, value in carried:
                experiment.add_scalar(tag, value, global_step=tokens, walltime=wall_time)
        return experiment
