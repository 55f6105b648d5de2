"""Resuming checks before it writes, and keeps the run whole (issue 22 items 2, 2b, 2c, 2d, 3; issue 23 item 2).

* A checkpoint's zip structure is verified, not only its member CRCs: central-directory damage that torch cannot
  load is refused, and ``auto`` falls back past it.
* A resume whose architecture or optimizer differs from the checkpoint's is one line naming the field and both
  values, by ``auto`` or an explicit file alike, and writes nothing into the run; a longer ``max_steps`` is applied
  (the schedule is recomputed) and said at start; a damaged explicit file is one line.
* ``last.ckpt`` is the newest model whatever spelling of the path resumed the run (a relative path, a copied
  folder), with no ``-v1`` files; a damaged step file is replaced by the rerun that repairs it.
* The ``*_by_tokens`` twins survive the resume's purge; a kill right after a checkpoint loses no logged value.
* Step checkpoints are a series by default (``keep_last_k`` keeps the newest k).
* Concurrent fits never share a version folder.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_overtok.checkpointing.files import AtomicCheckpointIO, CheckpointError, save_atomically, verify_checkpoint
from lit_overtok.checkpointing.run_checkpoint import RunCheckpoint
from lit_overtok.cli.main import main as cli_main
from lit_overtok.data.cfg_datamodule import CFGDataModule
from lit_overtok.nn.config import ModelConfig
from lit_overtok.optim.schedule import warmup_cosine
from lit_overtok.training.lightning_module import OverTokLM

ROOT = Path(__file__).resolve().parents[2]
B, T = 2, 32


def fit_args(root, *extra: str, steps: int = 4, every: int = 2) -> list[str]:
    """A tiny grammar run: validation and a checkpoint every 2 steps, every step logged."""
    return ["fit", f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}",
            "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--model.init_args.model_config.preset=tiny", f"--data.init_args.seq_len={T}",
            f"--data.init_args.batch_size={B}", "--data.init_args.val_sentences=2",
            "--trainer.callbacks+=lit_overtok.checkpointing.run_checkpoint.RunCheckpoint",
            f"--trainer.callbacks.every_n_train_steps={every}", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guarded") / "run"
    cli_main(fit_args(root))
    return root


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and modification time: what a refused resume must keep."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def checkpoints(root: Path) -> dict[str, str]:
    folder = root / "version_0" / "checkpoints"
    return {p.name: os.readlink(p) if p.is_symlink() else "file" for p in sorted(folder.glob("*.ckpt"))}


def refused(args: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli_main(args)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------ 2b: zip structure
def central_directory_flips(data: bytes):
    """Every single-bit flip of the central directory and end record of a zip file's bytes."""
    start = zipfile.ZipFile(io.BytesIO(data)).start_dir
    for position in range(start, len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            yield bytes(damaged)


def crc_only_check(path: Path) -> bool:
    """The check before issue 22: a zip with data.pkl whose members match their CRCs."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/data.pkl") for n in archive.namelist()) and archive.testzip() is None
    except Exception:
        return False


def test_central_directory_damage_that_passes_the_member_crcs_is_refused(tmp_path):
    saved = {"weights": torch.arange(40.0), "step": 3}
    path = tmp_path / "small.ckpt"
    save_atomically(saved, path)
    data = path.read_bytes()
    passed_crc_only_then_failed, accepted = 0, 0
    for damaged in central_directory_flips(data):
        path.write_bytes(damaged)
        try:
            loaded = torch.load(path, weights_only=False)
        except Exception:
            loaded = None
        if loaded is None and crc_only_check(path):
            passed_crc_only_then_failed += 1
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            assert str(path) in str(error) and "\n" not in str(error)
            continue
        accepted += 1  # a field torch does not read (attributes, the writer's version): the same checkpoint
        assert loaded is not None and torch.equal(loaded["weights"], saved["weights"]) and loaded["step"] == 3
    assert passed_crc_only_then_failed > 0  # the old check let these through to a torch.load traceback
    assert accepted < len(data) * 8


def torch_refused_flip(data: bytes) -> bytes:
    for damaged in central_directory_flips(data):
        buffer = io.BytesIO(damaged)
        try:
            torch.load(buffer, weights_only=False)
        except Exception:
            if crc_only_check_bytes(damaged):
                return damaged
    raise AssertionError("no such flip")


def crc_only_check_bytes(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.testzip() is None
    except Exception:
        return False


def test_auto_falls_back_past_a_newest_checkpoint_with_central_directory_damage(run, tmp_path, capsys):
    root = copy_of(run, tmp_path)
    newest = root / "version_0" / "checkpoints" / "epoch=0-step=4.ckpt"
    newest.write_bytes(torch_refused_flip(newest.read_bytes()))
    with pytest.warns(UserWarning, match=r"skipping it for resume: .*step=4.ckpt is damaged"):
        cli_main(fit_args(root, "--ckpt_path=auto", steps=5))
    assert "resuming from " + str(root / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt") in capsys.readouterr().err
    assert torch.load(root / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5


# ------------------------------------------------------------------------------------- 2: resume a changed config
CHANGES = {
    "width": ("--model.init_args.model_config.d_model=64", "model_config.d_model is 32 in the checkpoint but 64"),
    "learning rate": ("--model.init_args.optimizer.lr=0.002", "optimizer.lr is 0.001 in the checkpoint but 0.002"),
}


@pytest.mark.parametrize("how", ["auto", "file"])
@pytest.mark.parametrize("change", CHANGES)
def test_a_resume_with_another_model_or_optimizer_is_refused_and_writes_nothing(run, tmp_path, capsys, how, change):
    root = copy_of(run, tmp_path)
    before = tree(root)
    spec = "auto" if how == "auto" else str(root / "version_0" / "checkpoints" / "last.ckpt")
    option, message = CHANGES[change]
    last = refused(fit_args(root, f"--ckpt_path={spec}", option, steps=6), capsys)
    assert last.startswith("error: cannot resume ") and message in last, last
    assert tree(root) == before  # no config.yaml, hparams.yaml, event file or version folder


def test_a_longer_run_recomputes_the_schedule_and_says_so(run, tmp_path, capsys):
    root = copy_of(run, tmp_path)
    cli_main(fit_args(root, "--ckpt_path=auto", steps=6))
    assert "the learning-rate schedule is recomputed for 6 steps and continues from step 4" in capsys.readouterr().err
    events = EventAccumulator(str(root / "version_0"), size_guidance={"scalars": 0}).Reload()
    logged = {e.step: e.value for e in events.Scalars("train/lr")}
    # OptimizerConfig's defaults: lr 1e-3, warmup 30 steps (from 0), min_lr_ratio 0.1; step s logs the rate of s-1
    assert logged[5] == pytest.approx(1e-3 * warmup_cosine(4, 30, 6, 0.1, 0.0), rel=1e-6)


DAMAGED = {"truncated": lambda p: p.write_bytes(p.read_bytes()[:1000]), "empty": lambda p: p.write_bytes(b""),
           "text": lambda p: p.write_text("101\n")}


@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_explicit_checkpoint_is_one_line_before_lightning_reads_it(run, tmp_path, capsys, kind):
    root = copy_of(run, tmp_path)
    path = root / "version_0" / "checkpoints" / "epoch=0-step=4.ckpt"
    DAMAGED[kind](path)
    before = tree(root)
    last = refused(fit_args(root, f"--ckpt_path={path}", steps=6), capsys)
    assert last.startswith(f"error: {path} is not a complete checkpoint"), last
    assert tree(root) == before


# ------------------------------------------------------------------------------------------ 2c: last.ckpt, no -v1
def test_a_resume_under_another_spelling_of_a_copied_runs_path_keeps_last_ckpt_the_newest(run, tmp_path,
                                                                                       monkeypatch):
    root = copy_of(run, tmp_path)  # the checkpoint records the original folder
    monkeypatch.chdir(tmp_path)
    cli_main(fit_args("run", "--ckpt_path=run/version_0/checkpoints/last.ckpt", steps=6))  # relative spellings
    assert checkpoints(root) == {"epoch=0-step=2.ckpt": "file", "epoch=0-step=4.ckpt": "file",
                                 "epoch=0-step=6.ckpt": "file", "last.ckpt": "epoch=0-step=6.ckpt"}
    assert torch.load(root / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_a_damaged_step_file_is_replaced_by_the_rerun_that_repairs_it(run, tmp_path):
    root = copy_of(run, tmp_path)
    damaged = root / "version_0" / "checkpoints" / "epoch=0-step=4.ckpt"
    damaged.write_bytes(damaged.read_bytes()[:5000])
    with pytest.warns(UserWarning, match="skipping it for resume"):
        cli_main(fit_args(root, "--ckpt_path=auto", steps=4))  # from step 2, steps 3 and 4 again
    assert checkpoints(root) == {"epoch=0-step=2.ckpt": "file", "epoch=0-step=4.ckpt": "file",
                                 "last.ckpt": "epoch=0-step=4.ckpt"}
    verify_checkpoint(damaged)


# ------------------------------------------------------------------------------------------------------ 2d: logs
def test_the_token_axis_twins_survive_the_resumes_purge(run, tmp_path):
    root = copy_of(run, tmp_path)
    cli_main(fit_args(root, "--ckpt_path=auto", steps=6))
    events = EventAccumulator(str(root / "version_0"), size_guidance={"scalars": 0}).Reload()
    assert sorted(e.step for e in events.Scalars("val/loss")) == [2, 4, 6]
    assert sorted(e.step for e in events.Scalars("val/loss_by_tokens")) == [2 * B * T, 4 * B * T, 6 * B * T]


def test_a_kill_right_after_a_checkpoint_loses_no_value_logged_up_to_it(tmp_path):
    root = tmp_path / "run"
    args = fit_args(root, "--trainer.callbacks+=tests.integration.fault_injection.KillAfterSaving",
                    "--trainer.callbacks.step=3", steps=8, every=1)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = root / "version_0" / "checkpoints" / "epoch=0-step=3.ckpt"  # killed before last.ckpt was linked to it
    assert torch.load(saved, weights_only=False)["global_step"] == 3
    events = EventAccumulator(str(root / "version_0"), size_guidance={"scalars": 0}).Reload()
    assert sorted(e.step for e in events.Scalars("train/loss")) == [1, 2, 3]  # every step the checkpoint holds
    assert sorted(e.step for e in events.Scalars("val/loss")) == [2]


# ------------------------------------------------------------------------------------------ keep_last_k (issue 23)
@pytest.mark.parametrize("keep_last_k, kept", [(-1, [1, 2, 3, 4]), (2, [3, 4])])
def test_step_checkpoints_are_a_series_of_the_newest_keep_last_k(tmp_path, keep_last_k, kept):
    folder = tmp_path / "checkpoints"
    callback = RunCheckpoint(dirpath=folder, every_n_train_steps=1, keep_last_k=keep_last_k)
    trainer = pl.Trainer(max_steps=4, logger=False, callbacks=[callback], enable_progress_bar=False,
                         limit_val_batches=0, use_distributed_sampler=False, enable_model_summary=False,
                         plugins=[AtomicCheckpointIO()])
    trainer.fit(OverTokLM(model_config=ModelConfig(preset="tiny", max_seq_len=1024), vocab_size=7),
                CFGDataModule(seq_len=T, batch_size=B, val_sentences=4))
    assert sorted(p.name for p in folder.glob("*.ckpt")) == sorted(
        [f"epoch=0-step={s}.ckpt" for s in kept] + ["last.ckpt"])
    assert os.readlink(folder / "last.ckpt") == "epoch=0-step=4.ckpt"


# ----------------------------------------------------------------------------------------------- 3: concurrent runs
def _claim(root: str, start, results) -> None:
    from lit_overtok.checkpointing.version_claim import claim_version

    start.wait()
    results.put(claim_version(root))


def test_runs_started_together_claim_different_version_folders(tmp_path):
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(6), context.Queue()
    workers = [context.Process(target=_claim, args=(str(tmp_path), start, results)) for _ in range(6)]
    for worker in workers:
        worker.start()
    versions = sorted(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert versions == list(range(6))


def test_a_second_fit_on_a_run_in_use_is_one_line(run, tmp_path, capsys):
    root = copy_of(run, tmp_path)
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (root / "version_0" / ".claim").write_text(f"{holder.pid}\n")
        last = refused(fit_args(root, "--ckpt_path=auto", steps=6), capsys)
    finally:
        holder.kill()
        holder.wait()
    assert last == f"error: {root / 'version_0'} is in use by another fit (pid {holder.pid}); wait for it to end, " \
                   "or give this run another trainer.default_root_dir"
    (root / "version_0" / ".claim").write_text(f"{holder.pid}\n")  # its holder is gone: taken over
    cli_main(fit_args(root, "--ckpt_path=auto", steps=6))
    assert checkpoints(root)["last.ckpt"] == "epoch=0-step=6.ckpt"
    assert math.isfinite(torch.load(root / "version_0" / "checkpoints" / "last.ckpt",
                                    weights_only=False)["tokens_seen"])


def test_a_full_disk_under_the_event_file_is_one_line_and_keeps_the_checkpoints(tmp_path, capsys):
    root = tmp_path / "run"
    last = refused(fit_args(root, "--trainer.callbacks+=tests.integration.fault_injection.FullDiskForEventsAfter",
                            "--trainer.callbacks.step=3", steps=8), capsys)
    assert last == (f"error: could not write the TensorBoard events in {root / 'version_0'} (No space left on device); "
                    "free disk space and resume with --ckpt_path auto (the checkpoints written before are intact)")
    for path in (root / "version_0" / "checkpoints").glob("*.ckpt"):
        verify_checkpoint(path)
