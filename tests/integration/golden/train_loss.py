"""Per-step ``train/loss`` of short fixed-seed CPU runs: the default config and its OE, MoE and OT variants.

    python tests/integration/golden/train_loss.py            # print the losses as JSON (float hex, exact)
    python tests/integration/golden/train_loss.py --write    # store them as the golden values (say why in the commit)

A refactor must reproduce the stored values bit for bit (``tests/integration/test_golden.py``). CPUs differ in their vector
units (AVX-512 or AVX2 only) and kernels of different widths round differently, so the runs pin the AVX2 kernels of
ATen, MKL and oneDNN and one thread: the same bits on every x86 machine CI may use.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
GOLDEN = Path(__file__).with_name("train_loss.json")
STEPS = 5
VARIANTS = {
    "default": {},
    "oe": {"over_encoding": {"m": 343, "n": 3, "k": 1}},
    "moe": {"preset": "moe-small"},
    "ot": {"over_encoding": {"m": 343, "n": 3, "k": 1}, "multi_token": {"mode": "mtp_ds", "n": 2}},
}


def run() -> dict[str, list[str]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout this file belongs to
    import lightning.pytorch as pl
    import torch

    from lit_overtok.data.cfg_datamodule import CFGDataModule
    from lit_overtok.training.lightning_module import OverTokLM

    torch.set_num_threads(1)

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))

    losses = {}
    for name, model_config in VARIANTS.items():
        pl.seed_everything(1234, verbose=False)
        data = CFGDataModule()  # the default run's data: cfg3f, seq 256, batch 8, seed 1234
        module = OverTokLM(model_config=model_config, vocab_size=data.vocab_size)
        recorder = Recorder()
        trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             gradient_clip_val=1.0, use_distributed_sampler=False, callbacks=[recorder])
        trainer.fit(module, datamodule=data)
        losses[name] = [value.hex() for value in recorder.losses]
    return losses


if __name__ == "__main__":
    if any(os.environ.get(key) != value for key, value in PINNED_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED_ENV})
    result = run()
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
