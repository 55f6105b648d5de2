"""evaluation/sweep.py on real train.py runs: reproducible, parallel, resumable after a kill, through submitit, and
a failing point reported while the others finish."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lit_overtok.studies import provenance, report, sweep
from lit_overtok.studies.run_logs import event_folders, read_run_scalars
from lit_overtok.checkpointing.files import save_atomically
from lit_overtok.cli.main import main as cli_main
from lit_overtok.errors import exit_on_user_error
from tests.studies.sweep_grids import REPOSITORY, TINY_ARMS, write_grid

BAD_ARM = {"overrides": {"trainer.max_stepz": 5}}


def scalars(point: Path) -> dict:
    [version] = event_folders(str(point))
    return read_run_scalars(str(version))


def assert_same_losses(run_a: Path, run_b: Path) -> None:
    a, b = scalars(run_a), scalars(run_b)
    for tag in ("train/loss", "val/loss"):
        np.testing.assert_array_equal(a[tag][0], b[tag][0])
        assert a[tag][1].tobytes() == b[tag][1].tobytes(), f"{tag} differs between {run_a} and {run_b}"


def test_a_grid_run_twice_gives_the_same_losses_bit_for_bit_in_parallel_beside_a_failing_point(tiny_sweep, tmp_path, capsys):
    first = yaml.safe_load(tiny_sweep.read_text())["output"]
    # The same grid with a broken arm first, two points at a time: the broken one fails, the others finish.
    grid = write_grid(tmp_path / "grid.yaml", {"bad": BAD_ARM, **TINY_ARMS}, tmp_path / "out")
    assert sweep.main([str(grid), "--jobs", "2"]) == 1
    printed = capsys.readouterr().out
    assert "bad/seed1 FAILED (exit 2)" in printed and "Trainer has no argument 'max_stepz'" in printed
    assert "tiny: 2 done, 0 skipped, 1 failed: bad/seed1" in printed
    assert not (tmp_path / "out" / "bad" / "seed1" / "done.json").exists()
    for arm in TINY_ARMS:
        assert_same_losses(Path(first) / arm / "seed1", tmp_path / "out" / arm / "seed1")
    # The comparison can fail: the two arms' losses differ.
    assert scalars(Path(first) / "base" / "seed1")["train/loss"][1].tobytes() != \
        scalars(Path(first) / "oe" / "seed1")["train/loss"][1].tobytes()
    done = json.loads((Path(first) / "oe" / "seed1" / "done.json").read_text())
    last = Path(first) / "oe" / "seed1" / "version_0" / "checkpoints" / "last.ckpt"
    assert done["attempts"] == 1 and done["cpu_seconds"] > 0 and Path(done["checkpoint"]).resolve() == last.resolve()
    # Each attempt names the code and the CPU it ran on (the report's "Ran on" line).
    [attempt] = [json.loads(line) for line in (Path(first) / "oe" / "seed1" / "attempts.jsonl").read_text().splitlines()]
    assert attempt["commit"] == provenance.commit(Path.cwd()) and attempt["cpu"] == provenance.cpu()


def test_finished_points_are_skipped_and_changed_arguments_refused(tiny_sweep, capsys):
    assert sweep.main([str(tiny_sweep)]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 2
    output = Path(yaml.safe_load(tiny_sweep.read_text())["output"])
    assert len((output / "base" / "seed1" / "attempts.jsonl").read_text().splitlines()) == 1
    changed = yaml.safe_load(tiny_sweep.read_text())
    changed["overrides"]["trainer.max_steps"] = 6
    tiny_sweep.with_name("changed.yaml").write_text(yaml.safe_dump(changed))
    assert sweep.main([str(tiny_sweep.with_name("changed.yaml")), "--only", "base"]) == 1
    assert "was run with other arguments" in capsys.readouterr().out
    assert len((output / "base" / "seed1" / "attempts.jsonl").read_text().splitlines()) == 1


KILLER = '''
import os, signal
import lightning.pytorch as pl


class KillOnce(pl.Callback):
    """SIGKILL the run at ``step`` unless it was resumed: a crash after a checkpoint, without a timing race."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and trainer.ckpt_path is None:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_killed_point_resumes_from_its_last_checkpoint(tmp_path, capsys):
    (tmp_path / "killer.py").write_text(KILLER)
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 2}},
                 {"class_path": "killer.KillOnce", "init_args": {"step": 3}}]
    grid = write_grid(tmp_path / "grid.yaml", {"base": {"overrides": {"trainer.callbacks": callbacks}}}, tmp_path / "out",
                      env={"PYTHONPATH": str(tmp_path)})
    point = tmp_path / "out" / "base" / "seed1"
    assert sweep.main([str(grid)]) == 1
    assert "base/seed1 killed by signal 9" in capsys.readouterr().out
    checkpoint = point / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2 and not (point / "done.json").exists()
    assert sweep.main([str(grid), "--dry-run"]) == 0
    assert f"base/seed1: resume from {checkpoint}" in capsys.readouterr().out

    assert sweep.main([str(grid)]) == 0
    attempts = [json.loads(line) for line in (point / "attempts.jsonl").read_text().splitlines()]
    assert [a["returncode"] for a in attempts] == [-9, 0] and attempts[1]["ckpt_path"] == str(checkpoint)
    done = json.loads((point / "done.json").read_text())
    assert done["attempts"] == 2 and done["cpu_seconds"] == pytest.approx(sum(a["cpu_seconds"] for a in attempts))
    assert [v.name for v in event_folders(str(point))] == ["version_0"]  # the resumed run continued its folder
    assert len(list((point / "version_0").glob("events.out.tfevents*"))) == 2
    resumed = read_run_scalars(str(point / "version_0"))
    assert list(resumed["train/loss"][0]) == [1, 2, 3, 4, 5]  # at the optimizer step each completes, each once


def test_a_point_resumes_from_its_newest_checkpoint_that_verifies(tmp_path, capsys):
    """The sweep finds a point's checkpoint as ``--ckpt_path auto`` does (``find_resume_checkpoint``): a damaged
    newest one (truncated by a crash) is skipped, not handed to the resumed fit."""
    grid = write_grid(tmp_path / "grid.yaml", {"base": {}}, tmp_path / "out")
    checkpoints = tmp_path / "out" / "base" / "seed1" / "version_0" / "checkpoints"
    for step in (2, 4):
        save_atomically({"global_step": step}, checkpoints / f"step={step}.ckpt")
    damaged = checkpoints / "step=4.ckpt"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="skipping it for resume"):
        assert sweep.main([str(grid), "--dry-run"]) == 0
    assert f"base/seed1: resume from {checkpoints / 'step=2.ckpt'}" in capsys.readouterr().out


def test_the_submitit_path_with_the_local_executor(tiny_sweep, tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", {"base": {}, "bad": BAD_ARM}, tmp_path / "out")
    assert sweep.main([str(grid), "--executor", "local", "--jobs", "2", "--time-min", "10"]) == 1
    printed = capsys.readouterr().out
    assert "submitted 2 local jobs" in printed and "bad/seed1 FAILED" in printed
    assert "tiny: 1 done, 0 skipped, 1 failed" in printed
    assert any((tmp_path / "out" / ".submitit").rglob("*_result.pkl"))  # the jobs really went through submitit
    assert_same_losses(Path(yaml.safe_load(tiny_sweep.read_text())["output"]) / "base" / "seed1",
                       tmp_path / "out" / "base" / "seed1")


def test_runs_get_their_thread_pools_pinned(tmp_path):
    grid = sweep.load_grid(write_grid(tmp_path / "grid.yaml", TINY_ARMS, tmp_path / "out", seeds=[3, 1]))
    points = sweep.grid_points(grid, threads=1)
    assert [p.label for p in points] == ["base/seed1", "oe/seed1", "base/seed3", "oe/seed3"]  # seed-major
    assert all(p.env[v] == "1" for p in points for v in sweep.THREAD_VARIABLES)
    # torch sizes its pool from these (capped at the cores): unpinned it would take every core.
    unpinned = {k: v for k, v in os.environ.items() if k not in sweep.THREAD_VARIABLES}
    threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             env={**unpinned, **points[0].env}, capture_output=True, text=True, check=True)
    assert threads.stdout.strip() == "1"
    assert sweep.parse_args([str(tmp_path / "grid.yaml"), "--jobs", "2"]).threads_per_job == max(1, os.cpu_count() // 2)
    assert "--model.init_args.model_config.over_encoding={\"m\": 343, \"n\": 3, \"k\": 1}" in points[1].args
    assert points[2].args[-2:] == ["--seed_everything=3", f"--trainer.default_root_dir={tmp_path / 'out' / 'base' / 'seed3'}"]


def test_a_point_another_sweep_is_running_is_not_started_twice(tmp_path):
    grid = sweep.load_grid(write_grid(tmp_path / "grid.yaml", TINY_ARMS, tmp_path / "out"))
    point = sweep.grid_points(grid, threads=1)[0]
    point.path.mkdir(parents=True)
    with open(point.path / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = sweep.run_point(point)
    assert result["status"] == "failed" and "is being run by another process" in result["error"]
    assert not (point.path / "point.json").exists() and not (point.path / "train.log").exists()


def test_dry_run_lists_the_commands_and_runs_nothing(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", TINY_ARMS, tmp_path / "out")
    assert sweep.main([str(grid), "--dry-run", "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "base/seed1: new" in printed and "oe/seed1: new" in printed and "OMP_NUM_THREADS=" in printed
    assert "-m lit_overtok fit --config=" in printed and not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown key(s) colour"),
    ({"seeds": [1, 1]}, "seeds: seeds repeat"),
    ({"seeds": "1"}, "seeds: a non-empty list of integer seeds"),
    ({"config": "missing.yaml"}, "config: missing.yaml does not exist"),
    ({"arms": {"a/b": {}}}, "arms.a/b: arm names must be folder-safe"),
    ({"arms": {"a": {"overides": {}}}}, "arms.a: an arm takes config, overrides, seeds"),
    ({"arms": {"a": {"overrides": {"--trainer.max_steps": 3}}}}, "write keys without '--'"),
])
def test_bad_grid_files_get_one_line_naming_the_field(tmp_path, capsys, change, message):
    path = write_grid(tmp_path / "grid.yaml", TINY_ARMS, tmp_path / "out")
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **change}))
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(sweep.main, [str(path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.startswith(f"error: {path}: ") and message in error and error.count("\n") == 1


@pytest.mark.parametrize("path", sorted((REPOSITORY / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_grid_loads_and_each_arm_parses_through_the_cli(path, monkeypatch, capsys):
    monkeypatch.chdir(REPOSITORY)  # grid paths are relative to the checkout, as its commands run there
    grid = sweep.load_grid(path)
    assert set(grid.report) <= report.REPORT_KEYS
    first_of_each_arm = {p.arm: p for p in reversed(sweep.grid_points(grid, threads=1))}
    for point in first_of_each_arm.values():
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*point.args, "--print_config"])
        assert exit_info.value.code in (0, None), f"{path}: arm {point.arm} does not parse"
        assert f"seed_everything: {point.seed}\n" in capsys.readouterr().out
