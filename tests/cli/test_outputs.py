"""One output root per run: evaluate, export, generate and speedup write under the run they read (or where told),
never into the current folder, and say so when they replace an earlier output; samples that span lines are
delimited."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lit_overtok.cli.generate import delimited
from lit_overtok.cli.main import main as cli_main
from lit_overtok.evaluation import score_checkpoints
from lit_overtok.studies import speedup
from tests.studies.test_speedup import write_run


@pytest.fixture
def run(trained_checkpoint, tmp_path, monkeypatch) -> Path:
    """A copy of a trained run (each test writes into its own), read from an empty current folder."""
    source = trained_checkpoint("dense").parents[1]
    shutil.copytree(source, tmp_path / "run")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path / "run"


def nothing_in_the_current_folder() -> bool:
    return not any(Path.cwd().iterdir())


def test_generate_writes_its_samples_into_the_run_and_says_when_it_replaces_them(run, capsys):
    checkpoint = str(run / "checkpoints" / "last.ckpt")
    samples = cli_main(["generate", "--checkpoint", checkpoint, "--num-samples", "2", "--max-new-tokens", "5"])
    assert (run / "samples.txt").read_text() == "".join(f"{s}\n" for s in samples) and nothing_in_the_current_folder()
    cli_main(["generate", "--checkpoint", checkpoint, "--num-samples", "2", "--max-new-tokens", "5"])
    assert f"replacing {run / 'samples.txt'}" in capsys.readouterr().err


def test_export_writes_into_the_run_by_default(run, capsys):
    cli_main(["export", "--checkpoint", str(run / "checkpoints" / "last.ckpt")])
    assert (run / "hf" / "config.json").is_file() and nothing_in_the_current_folder()
    cli_main(["export", "--checkpoint", str(run / "checkpoints" / "last.ckpt")])
    assert f"replacing {run / 'hf'}" in capsys.readouterr().err


def test_evaluate_writes_into_the_run_and_wants_a_folder_for_several_runs(run, tmp_path, capsys):
    score = ["--tasks", "cfg_next_token_validity", "--cfg-num-docs", "2", "--device", "cpu"]
    score_checkpoints.main(["--checkpoint", str(run / "checkpoints" / "last.ckpt"), *score])
    assert (run / "eval" / "summary.md").is_file() and (run / "eval" / "last.json").is_file()
    assert nothing_in_the_current_folder()
    shutil.copytree(run, tmp_path / "other")
    with pytest.raises(ValueError, match="give --output-dir"):
        score_checkpoints.main(["--checkpoint", str(run / "checkpoints" / "last.ckpt"),
                                str(tmp_path / "other" / "checkpoints" / "last.ckpt"), *score])


def test_speedup_writes_beside_the_treatment_and_says_when_it_replaces(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "base", rate=1.0)
    write_run(tmp_path / "oe", rate=2.0)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for _ in range(2):
        speedup.main(["--baseline", str(tmp_path / "base"), "--treatment", str(tmp_path / "oe"),
                      "--metrics", "train/loss_next1"])
    assert (tmp_path / "oe" / "speedup.md").is_file() and (tmp_path / "oe" / "speedup.png").is_file()
    assert nothing_in_the_current_folder()
    assert f"replacing {tmp_path / 'oe' / 'speedup.md'}" in capsys.readouterr().err


def test_samples_that_span_lines_are_delimited_and_one_line_samples_are_not():
    assert delimited(["^12$", "^3$"]) == "^12$\n^3$\n"
    assert delimited(["first line\nsecond", "one"]) == ("--- sample 1/2 ---\nfirst line\nsecond\n"
                                                       "--- sample 2/2 ---\none\n")
