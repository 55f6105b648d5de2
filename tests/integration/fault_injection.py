"""Faults injected into real training runs (callbacks a test adds with ``--trainer.callbacks+=tests.integration.fault_injection.X``).

Each fault is the real thing, raised at a chosen moment so that tests are deterministic: a signal sent to the
training process itself, a SIGKILL in the middle of writing a checkpoint, a file-size limit that makes the kernel
refuse a checkpoint's bytes (EFBIG, as a full disk refuses them with ENOSPC).
"""

from __future__ import annotations

import os
import resource
import signal

import torch
from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Send ``signum`` to this process once, after optimizer step ``step`` (or during its validation)."""

    def __init__(self, step: int, signum: int = int(signal.SIGINT), during_validation: bool = False) -> None:
        self.step, self.signum, self.during_validation, self.sent = step, signum, during_validation, False

    def _send(self, trainer) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.during_validation:
            self._send(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.during_validation and not trainer.sanity_checking:
            self._send(trainer)


class KillWhileSaving(Callback):
    """SIGKILL this process halfway through writing the checkpoint of step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def setup(self, trainer, pl_module, stage) -> None:
        save = torch.save

        def half_then_die(obj, stream, *args, **kwargs):
            if trainer.global_step == self.step:
                stream.write(b"PK\x03\x04" + b"\0" * 4096)  # the start of a zip, then nothing
                stream.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, stream, *args, **kwargs)

        torch.save = half_then_die


class FileSizeLimitAfter(Callback):
    """From optimizer step ``step`` on, the kernel refuses writes past ``limit_bytes`` in any file."""

    def __init__(self, step: int, limit_bytes: int = 4096) -> None:
        self.step, self.limit_bytes = step, limit_bytes

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write, not a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit_bytes, resource.RLIM_INFINITY))


class KillAfterSaving(Callback):
    """SIGKILL this process right after the checkpoint of step ``step`` is written (before anything else happens)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def setup(self, trainer, pl_module, stage) -> None:
        from lit_overtok.checkpointing import files

        save = files.save_atomically

        def save_then_die(checkpoint, path):
            save(checkpoint, path)
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)

        files.save_atomically = save_then_die


class FullDiskForEventsAfter(Callback):
    """From optimizer step ``step`` on, every write to the TensorBoard event file fails with ENOSPC (a full disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            import errno

            event_file = trainer.logger.experiment.file_writer.event_writer._general_file_writer

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            event_file.write = full
            event_file.flush = full
