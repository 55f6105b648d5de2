"""Real fits stopped by real faults, then resumed with ``--ckpt_path auto``: Ctrl-C, SIGTERM and SLURM's requeue
signal save the step in flight, a SIGKILL while writing a checkpoint or a refused write leaves the earlier ones
whole, and the resumed run reads, in its one log folder and through ``speedup.py``, as the run never interrupted."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_overtok.studies import speedup
from lit_overtok.checkpointing.files import verify_checkpoint
from lit_overtok.cli.main import main as cli_main
from lit_overtok.studies.run_logs import read_run_scalars

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
TAGS = ("train/loss", "train/tokens_seen", "val/loss")


def fit_args(root: Path, corpus: Path, *extra: str) -> list[str]:
    """8 steps of a tiny model on prepared shards; validation every 4 steps, a checkpoint every 2."""
    return [
        "fit", f"--trainer.default_root_dir={root}", f"--trainer.max_steps={STEPS}", "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--model.init_args.model_config.preset=tiny",
        "--data=lit_overtok.data.webdataset_datamodule.WebDatasetDataModule",
        f"--data.init_args.train_shards={corpus}", "--data.init_args.seq_len=16", "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0", "--data.init_args.val_batches=2", "--data.init_args.shuffle_buffer=4",
        "--trainer.callbacks+=lit_overtok.checkpointing.run_checkpoint.RunCheckpoint", "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_top_k=-1", *extra,
    ]


def fit_in_subprocess(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=600)


def fault(name: str, **options) -> list[str]:
    return [f"--trainer.callbacks+=tests.integration.fault_injection.{name}", *(f"--trainer.callbacks.{k}={v}" for k, v in
                                                                   options.items())]


def curves(run: Path) -> dict[str, dict[float, float]]:
    scalars = read_run_scalars(str(run))
    return {tag: dict(zip(*map(list, scalars[tag]))) for tag in TAGS}


def logged_steps(run: Path, tag: str) -> list[int]:
    """Every event of ``tag`` in the run's folder (after TensorBoard's purge), duplicates included, by step: the order
    in which the accumulator reads a killed run's and its resumption's event files is not fixed (a CI run read
    [8, 4]), and readers order by step."""
    events = EventAccumulator(str(run / "version_0"), size_guidance={"scalars": 0}).Reload()
    return sorted(event.step for event in events.Scalars(tag))


def checkpoint_files(run: Path) -> dict[str, str]:
    folder = run / "version_0" / "checkpoints"
    return {p.name: os.readlink(p) if p.is_symlink() else "file" for p in sorted(folder.glob("*.ckpt"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, text_corpus) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    cli_main(fit_args(root, text_corpus))
    return root


def test_ctrl_c_saves_the_step_in_flight_and_the_resumed_run_is_the_uninterrupted_one(tmp_path, text_corpus,
                                                                                      uninterrupted):
    run = tmp_path / "run"
    stopped = fit_in_subprocess(fit_args(run, text_corpus, *fault("SignalAt", step=5)))
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-3000:]
    assert "SIGINT: saving a checkpoint after the current step" in stopped.stderr
    assert checkpoint_files(run) == {"epoch=0-step=2.ckpt": "file", "epoch=0-step=4.ckpt": "file",
                                     "epoch=0-step=5.ckpt": "file", "last.ckpt": "epoch=0-step=5.ckpt"}

    cli_main(fit_args(run, text_corpus, "--ckpt_path=auto"))
    assert [p.name for p in run.iterdir()] == ["version_0"]  # the resumed run continued its own log folder
    assert curves(run) == curves(uninterrupted)  # bit for bit, every step, once
    assert logged_steps(run, "val/loss") == logged_steps(uninterrupted, "val/loss") == [4, 8]  # after steps 4 and 8
    # speedup.py reads the resumed run exactly as the uninterrupted one (against the same baseline, the same
    # readings; on these 8-step curves a run against itself need not read 1.0).
    readings = [[(r.metric, r.ratio) for r in speedup.main(
        ["--baseline", str(uninterrupted), "--treatment", str(treatment), "--metrics", "train/loss_next1,val/loss",
         "--output", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png")])] for treatment in (run, uninterrupted)]
    assert readings[0] == readings[1] and len(readings[0]) == 2


def test_sigkill_while_writing_a_checkpoint_leaves_the_earlier_ones_and_resume_loses_nothing(tmp_path, text_corpus,
                                                                                           uninterrupted):
    run = tmp_path / "run"
    killed = fit_in_subprocess(fit_args(run, text_corpus, *fault("KillWhileSaving", step=6)))
    assert killed.returncode == -signal.SIGKILL
    folder = run / "version_0" / "checkpoints"
    assert checkpoint_files(run) == {"epoch=0-step=2.ckpt": "file", "epoch=0-step=4.ckpt": "file",
                                     "last.ckpt": "epoch=0-step=4.ckpt"}  # the half-written file kept its temp name
    partial = [p for p in folder.glob(".*") if p.name.endswith(".partial")]
    assert len(partial) == 1 and partial[0].name.startswith(".epoch=0-step=6.ckpt.")
    for path in folder.glob("*.ckpt"):
        verify_checkpoint(path)

    cli_main(fit_args(run, text_corpus, "--ckpt_path=auto"))
    assert not partial[0].exists()  # the dead writer's temporary file is cleaned up
    assert curves(run) == curves(uninterrupted)
    assert logged_steps(run, "val/loss") == [4, 8]


def test_a_refused_write_stops_with_one_line_and_keeps_every_earlier_checkpoint(tmp_path, text_corpus, capsys):
    run = tmp_path / "run"
    limit, on_xfsz = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)
    try:  # in this process, to spare a subprocess's start; the limit and SIGXFSZ are handed back below
        with pytest.raises(SystemExit) as failed:
            cli_main(fit_args(run, text_corpus, *fault("FileSizeLimitAfter", step=5, limit_bytes=65536)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, on_xfsz)
    assert failed.value.code == 2
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error: could not write checkpoint ") and "epoch=0-step=6.ckpt" in last_line
    assert "Traceback" not in err
    folder = run / "version_0" / "checkpoints"
    assert checkpoint_files(run) == {"epoch=0-step=2.ckpt": "file", "epoch=0-step=4.ckpt": "file",
                                     "last.ckpt": "epoch=0-step=4.ckpt"}  # nothing partial, under any name
    for path in folder.glob("*.ckpt"):
        verify_checkpoint(path)


def test_slurm_requeue_signal_during_validation_saves_after_it_requeues_and_logs_it_once(tmp_path, text_corpus,
                                                                                       uninterrupted, monkeypatch):
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "overtok", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        cli_main(fit_args(run, text_corpus, *fault("SignalAt", step=4, signum=int(signal.SIGUSR1),
                                                   during_validation="true")))
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert calls.read_text().split() == ["requeue", "4242"]
    assert checkpoint_files(run)["last.ckpt"] == "epoch=0-step=4.ckpt"
    assert logged_steps(run, "val/loss") == [4]  # the interrupted validation ran to its end first

    cli_main(fit_args(run, text_corpus, "--ckpt_path=auto"))  # what the requeued job runs
    assert curves(run) == curves(uninterrupted)
    assert logged_steps(run, "val/loss") == [4, 8]


def test_sigterm_saves_the_step_and_exits_with_its_code(tmp_path, text_corpus):
    run = tmp_path / "run"
    # The handlers found before the run (SIGINT's is SIG_IGN, not Python's default, in a process started in the
    # background by a shell without job control) are the ones handed back.
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit) as stopped:
        cli_main(fit_args(run, text_corpus, *fault("SignalAt", step=3, signum=int(signal.SIGTERM))))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert checkpoint_files(run)["last.ckpt"] == "epoch=0-step=3.ckpt"
    assert {signum: signal.getsignal(signum) for signum in before} == before  # handlers are handed back


def test_ckpt_path_auto_starts_a_new_run_when_there_is_nothing_to_resume(tmp_path, text_corpus, capsys):
    cli_main(fit_args(tmp_path / "run", text_corpus, "--ckpt_path=auto", "--trainer.max_steps=2"))
    assert "no checkpoint under" in capsys.readouterr().err
    assert checkpoint_files(tmp_path / "run")["last.ckpt"] == "epoch=0-step=2.ckpt"


def test_a_finished_run_saves_its_final_step_whatever_the_interval(tmp_path, text_corpus):
    # A checkpoint every 2 steps and max_steps 5: the periodic saves fall on 2 and 4, and the end of fit saves 5, so
    # last.ckpt is the final model (it used to stay at step 4, silently one step behind the finished run).
    run = tmp_path / "run"
    cli_main(fit_args(run, text_corpus, "--trainer.max_steps=5"))
    files = checkpoint_files(run)
    final = files.pop("last.ckpt")  # Lightning's epoch counter has moved on by the end of fit: epoch=1-step=5
    assert final.endswith("-step=5.ckpt") and files == {"epoch=0-step=2.ckpt": "file", "epoch=0-step=4.ckpt": "file",
                                                         final: "file"}
    assert torch.load(run / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5
