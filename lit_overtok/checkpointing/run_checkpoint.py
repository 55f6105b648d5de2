"""When a run saves: ``RunCheckpoint``, the ModelCheckpoint every ``train.py`` run gets.

* ``last.ckpt`` is a link to the newest step file, replaced in one rename right after that file is written and
  before an older step file is removed, so it is never behind and never dangles (``checkpoint_files.link_atomically``).
  Names are never versioned (no ``-v1`` files): a resume under another spelling of the run's path, or a rerun that
  repairs a damaged step file, replaces the file of that name.
* Step checkpoints are kept as a series (``keep_last_k``: -1, all, by default), so evaluating the run's checkpoint
  folder scores its training curve.
* Every logger is flushed, with the step's training values already sent, before a step checkpoint is written: a
  kill after the checkpoint loses no logged value that the checkpoint's state includes.
* A step checkpoint due at a step with a validation is written after that validation, so everything logged at the
  step (train metrics, in-training evaluation, validation) happened before it: a resumed run repeats none of it and
  misses none of it.
* Ctrl-C (SIGINT), SIGTERM and SLURM's requeue signal (SIGUSR1 unless the SLURM environment says otherwise) stop
  the run after the current optimizer step, save it, and exit with 128 + the signal number (with several ranks, all
  stop at the same step, whichever ranks got the signal and wherever each was when it came); the requeue signal also
  requeues the job (``scontrol requeue``), which continues with ``--ckpt_path auto``. A second Ctrl-C stops at once
  without saving (the step in flight may be half applied). Any other exception saves nothing: its state may be
  half a step, so the last periodic checkpoint stands.
* The end of ``fit`` saves the final step when no periodic checkpoint fell on it (``max_steps`` not a multiple of
  ``every_n_train_steps``), so ``last.ckpt`` of a finished run is always its final model.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lit_overtok.checkpointing.files import checkpoint_step_or_none, link_atomically, remove_stale_temporaries
from lit_overtok.errors import InputError


def _validation_follows(trainer: pl.Trainer) -> bool:
    """Whether the training loop validates right after the current batch (Lightning's own rule)."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return loop._should_check_val_fx(trainer.fit_loop._data_fetcher) and not loop._skip_next_val
    except AttributeError:  # another Lightning layout: save at the batch end as ModelCheckpoint does
        return False


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with ``last.ckpt`` as a link, saves after the step's validation, and saves on a stop signal.

    Args (besides ModelCheckpoint's):
        keep_last_k: how many periodic step checkpoints to keep, newest first (-1: all, the default, so that
            ``evaluate.py`` over the run's folder scores its whole training curve; a 250-step run saving every 100
            steps keeps 3). Older ones are removed once a newer one is written; ``last.ckpt`` is always the newest.
    """

    def __init__(self, *args: Any, save_last: Any = "link", save_top_k: int = -1, keep_last_k: int = -1,
                 enable_version_counter: bool = False, **kwargs: Any) -> None:
        # No version counter: a name that exists is the same step of the same run (a resume under another spelling
        # of the path, a step repaired by a rerun), so it is replaced, never shadowed by a ``-v1`` twin.
        super().__init__(*args, save_last=save_last, save_top_k=save_top_k,
                         enable_version_counter=enable_version_counter, **kwargs)
        if keep_last_k == 0 or keep_last_k < -1:
            raise InputError(f"RunCheckpoint keep_last_k={keep_last_k}: give a positive number of step checkpoints "
                             "to keep, or -1 for all")
        self.keep_last_k = keep_last_k
        self._stop_signal: Optional[int] = None
        self._requeue = False
        self._agreed = False
        self._in_batch_end = False
        self._step_file_step = -1
        self._trainer: Optional[pl.Trainer] = None
        self._previous_handlers: dict[int, Any] = {}
        self._user_sigterm: Any = None

    # ------------------------------------------------------------------------------------------ last.ckpt
    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link_atomically(filepath, linkpath)
        trainer.strategy.barrier()

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        is_last = os.path.basename(filepath).startswith(self.CHECKPOINT_NAME_LAST)
        if not is_last:  # everything the checkpoint's state includes is on disk before it
            flush_step_metrics(trainer, send_step=self._in_batch_end)
        super()._save_checkpoint(trainer, filepath)
        if not is_last:
            self._step_file_step = trainer.global_step
        if self.save_last == "link" and self.save_top_k != 0 and not is_last:
            # Link now: ModelCheckpoint removes the previous step file before it links, leaving last.ckpt dangling.
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            if self.keep_last_k > 0 and trainer.is_global_zero:
                remove_older_steps(self.dirpath, self.keep_last_k, keep=filepath)
            trainer.strategy.barrier()

    # ------------------------------------------------------------------------- after the step's validation
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._defer_save_until_validation and not trainer.validating:
            self._defer_save_until_validation = False  # the validation we waited for did not come: save now
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and not self._should_skip_saving_checkpoint(trainer) and _validation_follows(trainer):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves it
            return
        self._agree_to_stop(trainer)
        self._in_batch_end = True  # the step's training values are not sent to the loggers yet
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._in_batch_end = False

    # ---------------------------------------------------------------------------------------- stop signals
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.dirpath is not None and os.path.isdir(self.dirpath):
            remove_stale_temporaries(self.dirpath)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning installed its handlers (it restores the ones it found when the fit ends, so ours must be
        # handed back before that: on_train_end / on_exception). Lightning's SIGTERM handler is replaced, not called:
        # it broadcasts from inside the handler, a collective at whatever point each rank happens to be, which
        # deadlocks ranks that are not at the same point (one still in a step, another already in the next one's
        # collectives). Its SLURM handler, which saves in the middle of a step, is replaced too.
        self._trainer, self._stop_signal, self._requeue, self._agreed = trainer, None, False, False
        signals = [signal.SIGINT, signal.SIGTERM]
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            signals.append(environment.requeue_signal or signal.SIGUSR1)
        # A SIGTERM handler of the user's that Lightning found (and would have called) is called by ours instead.
        self._user_sigterm = getattr(trainer._signal_connector, "_original_handlers", {}).get(signal.SIGTERM)
        for signum in signals:
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave signals to Lightning
                break

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only notes the signal (and passes it on): the ranks agree to stop at the next step end or validation end,
        # ``_agree_to_stop``; nothing here may be a collective.
        trainer = self._trainer
        if trainer is None or (signum == signal.SIGINT and self._stop_signal == signal.SIGINT):
            previous = self._previous_handlers.get(signum)
            self._restore_handlers()
            return _forward(previous, signum, frame)
        if signum == signal.SIGTERM and callable(self._user_sigterm):
            self._user_sigterm(signum, frame)
        elif signum != signal.SIGINT:
            self._requeue = True
        if self._stop_signal is None:
            self._stop_signal = signum
            launcher = trainer.strategy.launcher
            if launcher is not None:  # ranks Lightning started itself hear it too (as its own handler does)
                launcher.kill(signum)
            if trainer.is_global_zero:
                again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
                print(f"\n{signal.Signals(signum).name}: saving a checkpoint after the current step{again}",
                      file=sys.stderr)

    def _agree_to_stop(self, trainer: pl.Trainer) -> None:
        """Stop all ranks at the same step when any of them got a stop signal: every rank calls this at the same
        point (a step's batch end, a validation's end), so one small all-reduce says whether any rank has one (a
        signal may reach the ranks at different steps, or only some of them). Lightning's loop then raises
        SIGTERMException at the end of this step on every rank, and ``on_exception`` saves the step."""
        if self._trainer is None or self._agreed:
            return
        signum, requeue = self._stop_signal or 0, int(self._requeue)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flags = torch.tensor([signum, requeue], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            signum, requeue = flags.tolist()
        if signum:
            self._agreed, self._stop_signal, self._requeue = True, signum, bool(requeue)
            trainer._signal_connector.received_sigterm = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # A signal during a validation lets it finish (its values are logged at the step the checkpoint saves).
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._agree_to_stop(trainer)

    def _restore_handlers(self) -> None:
        self._trainer = None
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers, self._user_sigterm = {}, None

    def _save_current_step(self, trainer: pl.Trainer) -> None:
        # A step file even where a validation end already wrote last.ckpt as a file at this step: the series ends
        # with the final model, and last.ckpt links to it.
        if self._step_file_step != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_checkpoint(trainer, self._get_metric_interpolated_filepath_name(candidates, trainer))
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.global_step > 0 and self._every_n_train_steps >= 1 and self.save_top_k != 0:
            self._save_current_step(trainer)  # the final model, whatever the interval
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and not trainer.sanity_checking:
            signum = self._stop_signal or signal.SIGTERM
            if trainer.global_step > 0:  # before the first optimizer step there is nothing to continue from
                self._save_current_step(trainer)
            saved = self.last_model_path or self._last_checkpoint_saved
            rank_zero_info(f"stopped by {signal.Signals(signum).name} after step {trainer.global_step}; "
                           + (f"checkpoint {saved}" if saved else "nothing was saved (no optimizer step had completed)"))
            exception.code = 128 + signum
            if self._requeue and trainer.is_global_zero:
                requeue_slurm_job()
        self._restore_handlers()


def flush_step_metrics(trainer: pl.Trainer, send_step: bool) -> None:
    """Flush every logger, so a kill after the checkpoint loses no value logged up to it.

    ``send_step``: called from the batch-end hooks, where ModelCheckpoint saves before the loop sends the step's
    training values to the loggers; they are sent here first, and the loop's own send for this step is skipped
    (each step once).
    """
    connector = trainer._logger_connector
    if send_step and not getattr(connector, "_sent_early", False):
        send = connector.update_train_step_metrics
        send()

        def skip_once() -> None:  # the loop's call for this step; the next step sends as usual
            del connector.update_train_step_metrics
            connector._sent_early = False

        connector.update_train_step_metrics, connector._sent_early = skip_once, True
    for logger in trainer.loggers:
        logger.save()


def remove_older_steps(folder: Any, keep_last_k: int, keep: str) -> None:
    """Delete all but the newest ``keep_last_k`` step checkpoints in ``folder`` (never ``keep``, the newest)."""
    steps = []
    for path in Path(folder).glob("*.ckpt"):
        if path.name.startswith(RunCheckpoint.CHECKPOINT_NAME_LAST) or path.is_symlink():
            continue
        step = checkpoint_step_or_none(path)
        steps.append((step, path))
    for _, path in sorted(steps, reverse=True)[keep_last_k:]:
        if os.path.abspath(path) == os.path.abspath(keep):
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _forward(handler: Any, signum: int, frame: Any) -> None:
    """Do what ``handler`` (a previous signal disposition) would have done with the signal."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue; its next start resumes with ``--ckpt_path auto``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    if not job:
        rank_zero_warn("the requeue signal came without SLURM_JOB_ID; not requeueing")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        rank_zero_warn(f"cannot requeue SLURM job {job}: no scontrol on PATH")
        return
    if result.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")
    else:
        rank_zero_info(f"requeued SLURM job {job}")
