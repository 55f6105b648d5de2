"""User mistakes end our scripts in one line (``error: ...``, exit status 2), not a traceback: evaluate.py,
speedup.py and prepare, for a missing or wrong file, a task the tokenizer cannot spell, a metric a run lacks; and
every console script (pyproject.toml) and ``prepare_jobs`` the same way, with ``LIT_OVERTOK_TRACEBACK=1`` showing the
traceback."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_overtok.evaluation import score_checkpoints as evaluate
from lit_overtok.studies import speedup
from lit_overtok.data import prepare
from lit_overtok.errors import exit_on_user_error, USER_ERRORS

REPO = Path(__file__).resolve().parents[1]


def one_line_error(main, argv, capsys) -> str:
    capsys.readouterr()  # what fixtures printed
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(main, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    # One error line, last, and no traceback (progress bars drawn before the mistake surfaced may precede it).
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, err
    return lines[-1]


def test_evaluate_py_with_a_missing_checkpoint_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "evaluation" / "evaluate.py"), "--checkpoint",
                           str(tmp_path / "missing.ckpt"), "--tasks", "grammar"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path / 'missing.ckpt'} does not exist (a .ckpt file or a sharded checkpoint folder)"]


def test_evaluate_a_task_the_tokenizer_cannot_spell_and_a_file_that_is_no_checkpoint(trained_checkpoint, paper_data,
                                                                                      tmp_path, capsys):
    err = one_line_error(evaluate.main, ["--checkpoint", str(trained_checkpoint("dense")), "--tasks", "arc_easy",
                                         "--data-dir", str(paper_data), "--limit", "1", "--output-dir",
                                         str(tmp_path)], capsys)
    assert "alphabet" in err and "grammar:cfg3f" in err
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("not a checkpoint")
    err = one_line_error(evaluate.main, ["--checkpoint", str(not_a_checkpoint), "--tasks", "grammar",
                                         "--output-dir", str(tmp_path)], capsys)
    assert str(not_a_checkpoint) in err


def test_speedup_with_a_missing_run_or_metric_is_one_line(trained_checkpoint, tmp_path, capsys):
    run = trained_checkpoint("dense").parent.parent
    err = one_line_error(speedup.main, ["--baseline", str(tmp_path / "nope"), "--treatment", str(run)], capsys)
    assert "no TensorBoard event files" in err
    err = one_line_error(speedup.main, ["--baseline", str(run), "--treatment", str(run), "--metrics", "val/acc",
                                        "--output", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png")], capsys)
    assert "has no scalar 'val/acc'" in err


def test_prepare_with_an_unreadable_input_or_output_is_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for argv, expected in (
        (["--output", str(tmp_path / "out"), "--vocab-size", "300", "--train", str(broken)], str(broken)),
        (["--output", str(a_file / "out"), "--vocab-size", "300", "--train", str(broken)], "Not a directory"),
    ):
        assert expected in one_line_error(prepare.main, [*argv, "--workers", "1", "--no-progress"], capsys)

def console_scripts() -> dict[str, str]:
    """``{name: "module:function"}`` of pyproject.toml's ``[project.scripts]``."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


# A bad input for every command that has a console script (or runs as ``python -m``): a file that does not exist.
BAD_INPUTS = {
    "lit-overtok-train": ["fit", "--config", "missing.yaml"],
    "lit-overtok-prepare": ["--output", "out", "--vocab-size", "300", "--train", "missing.jsonl"],
    "lit-overtok-lm-eval": ["--model", "lit_overtok", "--model_args", "checkpoint=missing.ckpt", "--tasks",
                            "cfg_next_token_validity", "--include_path", str(REPO / "lit_overtok" / "evaluation" /
                                                                           "tasks" / "local")],
    "lit-overtok-export": ["--checkpoint", "missing.ckpt", "--out", "hf"],
    "python -m lit_overtok.data.prepare_jobs": ["merge", "--output", "missing"],
}
ENTRIES = {**console_scripts(), "python -m lit_overtok.data.prepare_jobs": "lit_overtok.data.prepare_jobs:run"}


def test_every_console_script_has_a_bad_input_case():
    assert set(console_scripts()) <= set(BAD_INPUTS)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_every_command_ends_bad_input_in_one_line_with_status_2_and_shows_the_traceback_when_asked(
        name, tmp_path, capsys, monkeypatch):
    """The one convention (errors.py) in every command, called as its console script is (the function pyproject
    names, on ``sys.argv``): before, prepare and prepare_jobs exited with status 1 and ignored LIT_OVERTOK_TRACEBACK,
    and train.py ignored it for a config file it could not read."""
    module, function = ENTRIES[name].split(":")
    command = getattr(importlib.import_module(module), function)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [name, *BAD_INPUTS[name]])
    monkeypatch.delenv("LIT_OVERTOK_TRACEBACK", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        command()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in err and lines[-1].startswith("error: "), err
    assert "missing" in lines[-1] and sum(line.startswith("error") for line in lines) == 1, err
    if name == "lit-overtok-lm-eval":
        return  # lm-eval indexes its thousands of task files before our model sees the checkpoint (a minute or
        # more here); its entry_point is export's, whose traceback path is checked
    monkeypatch.setenv("LIT_OVERTOK_TRACEBACK", "1")
    with pytest.raises(USER_ERRORS):  # the exception itself: Python prints its traceback
        command()
