"""Lightning callbacks shared by every run: throughput in tokens and model FLOPs."""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor for our dict batches; FLOPs come from ``pl_module.flops_per_batch``.

    Logs ``train/device/tokens_per_sec``, ``train/device/flops_per_sec`` and friends (and ``mfu`` on GPUs whose peak
    Lightning knows). The window is short so that CPU-sized runs report too.
    """

    def __init__(self, window_size: int = 10) -> None:
        super().__init__(
            batch_size_fn=lambda batch: batch["input_ids"].shape[0],
            length_fn=lambda batch: batch["input_ids"].numel(),
            window_size=window_size,
        )
