"""The shipped SLURM script resumes a requeued job: its command, run twice outside SLURM with a SIGTERM stopping the
first run (as SLURM's signal before the time limit or a preemption does), continues the first run's steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_the_sbatch_script_resumes_its_run_when_started_again(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')  # one task, here
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for tool in ("srun", "python"):
        (bin_dir / tool).chmod(0o755)
    root = tmp_path / "runs"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"default_root_dir": str(root), "max_steps": 6, "val_check_interval": 3, "limit_val_batches": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1},
        "model": {"init_args": {"model_config": {"preset": "tiny"}}},
        "data": {"init_args": {"seq_len": 32, "batch_size": 2, "val_sentences": 2}},
    }))
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
                   "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "1"}
    script = ["bash", "configs/slurm/train.sbatch", str(config), "--trainer.accelerator", "cpu"]
    stop = ["--trainer.callbacks+=tests.integration.fault_injection.SignalAt", "--trainer.callbacks.step=4",
            f"--trainer.callbacks.signum={int(signal.SIGTERM)}"]

    first = subprocess.run([*script, *stop], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert "no checkpoint under" in first.stderr  # --ckpt_path auto on a first start: a new run
    second = subprocess.run(script, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from " + str(root / "version_0" / "checkpoints" / "epoch=0-step=4.ckpt") in second.stderr
    assert [p.name for p in root.iterdir()] == ["version_0"]
    last = torch.load(root / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6
