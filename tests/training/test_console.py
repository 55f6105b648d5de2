"""What ``train.py fit`` prints, read as a newcomer reads it: a compact line per logging interval and validation,
a progress bar that moves (and estimates) from the first micro-batch and shows the last validation loss, none of
Lightning's known noise, and a plain word when a run stopped before anything was saved."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.init_args.model_config.preset=tiny", "--data.init_args.seq_len=32", "--data.init_args.batch_size=2",
        "--data.init_args.val_sentences=2", "--trainer.limit_val_batches=1"]


def train(root: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", "fit", f"--trainer.default_root_dir={root}", *TINY, *args],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> subprocess.CompletedProcess:
    """4 optimizer steps of 2 micro-batches each; a line every 2 steps, validation at 2 and 4."""
    done = train(tmp_path_factory.mktemp("console"), "--trainer.max_steps=4", "--trainer.accumulate_grad_batches=2",
                 "--trainer.log_every_n_steps=2", "--trainer.val_check_interval=4")  # in batches
    assert done.returncode == 0, done.stderr[-3000:]
    return done


LINE = re.compile(r"^step (\d+)/4 \| [\d.]+k? tok \| loss \d\.\d{3}( \| val \d\.\d{3})? \| [\d.]+k? tok/s \| "
                  r"MFU \d+\.\d% \| mem \d+\.\d\d GiB \| ETA \d+:\d\d:\d\d$", re.MULTILINE)


def test_a_compact_line_at_each_logging_step_and_validation(run):
    lines = LINE.findall(run.stdout)
    assert [step for step, _ in lines].count("2") == 2 and [step for step, _ in lines].count("4") == 2, run.stdout
    assert {step for step, val in lines if val} == {"2", "4"}  # the validation's line carries its loss


def test_the_bar_moves_by_micro_batches_with_an_eta_and_shows_the_validation_loss(run):
    out = run.stdout + run.stderr
    assert re.search(r"\| 0\.50/4 \[\d\d:\d\d<\d\d:\d\d,", out), out[-3000:]  # half a step in: a rate and an ETA
    assert re.search(r"\| 4\.00/4 \[.*val/loss=\d\.\d{3}", out), out[-3000:]


def test_lightnings_known_noise_is_gone_and_the_rest_stays(run):
    out = run.stdout + run.stderr
    for noise in ("Total FLOPs", "💡 Tip", "LeafSpec", "litlogger"):
        assert noise not in out, noise
    assert "Total params" in out and "Sanity Checking" in out  # the module table and Lightning's own bars remain


def test_a_stop_before_the_first_step_says_nothing_was_saved(tmp_path):
    stopped = train(tmp_path, "--trainer.max_steps=4", "--trainer.accumulate_grad_batches=2",
                    "--trainer.enable_progress_bar=false", "--trainer.val_check_interval=2",
                    "--trainer.callbacks+=tests.integration.fault_injection.SignalAt", "--trainer.callbacks.step=0")
    assert "stopped by SIGINT after step 0" in stopped.stdout + stopped.stderr, stopped.stderr[-3000:]
    assert re.search(r"stopped by SIGINT after step 0; nothing was saved", stopped.stdout + stopped.stderr)
    assert not list(tmp_path.rglob("*.ckpt"))
