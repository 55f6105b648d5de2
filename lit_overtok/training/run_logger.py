"""The run's TensorBoard logger: one claimed version folder per run, continued by its resumption, each value once.

* A resumed run logs into the version folder of its checkpoint; what the interrupted run logged after the
  checkpoint's step is dropped by TensorBoard's ``purge_step`` (a restart marker: readers discard the folder's
  earlier events at or after that step), so every reader sees one run, each step once.
* That marker works on the step axis of every tag, but the ``*_by_tokens`` twins (``lm_eval_callback.log_by_tokens``)
  have training tokens as their step, always past it: the purge would drop all of them. ``RunLogger`` reads them
  before the new event file exists and writes again, after the marker, those logged up to the checkpoint's tokens.
* The folder is claimed before the logger is made (``checkpointing.version_claim``), so concurrent fits never share
  one.
* A write the disk refuses (full, or a file-size limit) happens in TensorBoard's writer thread, which printed its
  traceback and let Lightning report "you tried to log ... which is not supported". ``RunLogger`` keeps the error
  where the writer meets it and raises it on the training thread as one ``InputError`` naming the folder; the
  checkpoints written before it are whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lit_overtok.errors import InputError

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
        self._disk: Optional[_RefusedWrites] = None
        self._carried = (token_twins(Path(self.log_dir), resumed_tokens or 0)
                         if resumed_step is not None and rank_zero_only.rank == 0 else [])

    @property
    def experiment(self) -> Any:
        new = self._experiment is None
        experiment = super().experiment
        if new and rank_zero_only.rank == 0:
            self._disk = _guard_writes(experiment)
        if self._carried:  # right after the writer's restart marker, so the purge does not reach them
            carried, self._carried = self._carried, []
            for wall_time, tokens, tag, value in carried:
                experiment.add_scalar(tag, value, global_step=tokens, walltime=wall_time)
        return experiment

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self._raise_refused_write()
        super().log_metrics(metrics, step)

    def save(self) -> None:
        super().save()
        self._raise_refused_write()

    def finalize(self, status: str) -> None:
        if self._disk is not None and self._disk.error is not None:
            return  # reported already (or being reported): nothing more can be written
        super().finalize(status)
        self._raise_refused_write()

    def _raise_refused_write(self) -> None:
        if self._disk is not None and self._disk.error is not None and not self._disk.reported:
            self._disk.reported = True
            error = self._disk.error
            raise InputError(f"could not write the TensorBoard events in {self.log_dir} "
                             f"({error.strerror or error}); free disk space and resume with --ckpt_path auto (the "
                             "checkpoints written before are intact)")


class _RefusedWrites:
    """TensorBoard's record writer, keeping the first OSError of its writes instead of raising it in its thread."""

    def __init__(self, writer: Any) -> None:
        self._writer, self.error, self.reported = writer, None, False

    def _call(self, name: str, *args: Any) -> None:
        if self.error is None:
            try:
                getattr(self._writer, name)(*args)
            except OSError as error:
                self.error = error

    def write(self, data: bytes) -> None:
        self._call("write", data)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")


def _guard_writes(experiment: Any) -> Optional[_RefusedWrites]:
    """Put ``_RefusedWrites`` between TensorBoard's writer (and its thread) and the event file; None if the writer
    is laid out otherwise (another TensorBoard version: its own behaviour then)."""
    try:
        writer = experiment.file_writer.event_writer._async_writer
        guard = _RefusedWrites(writer._writer)
        writer._writer = writer._worker._record_writer = guard
    except AttributeError:
        return None
    return guard
