"""The end-of-fit summary's next commands work as printed: each "Next:" line of a Wikipedia-like run (its shards'
own BPE) is split as a shell would and run through the script it names."""

from __future__ import annotations

import shlex
from pathlib import Path

from tests.conftest import fit_text
from lit_overtok.cli.main import main as cli_main
from lit_overtok.errors import exit_on_user_error
from lit_overtok.evaluation import score_checkpoints

REPO = Path(__file__).resolve().parents[2]
# The scripts the summary names, as the repository's entry points run them.
SCRIPTS = {"train.py": cli_main, "evaluation/evaluate.py": score_checkpoints.main}


def next_commands(output: str) -> dict[str, list[str]]:
    """``{"sample it": argv, ...}`` from the summary's "Next:" block (comments after three spaces dropped)."""
    block = output[output.index("Next:"):].splitlines()[1:]
    commands = {}
    for line in block:
        if not line.startswith("  ") or ":" not in line:
            break
        name, command = line.strip().split(":", 1)
        commands[name] = shlex.split(command.strip().split("   (")[0])
    return commands


def test_every_next_command_of_a_text_run_works_as_printed(text_corpus, paper_data, tmp_path, capsys, monkeypatch):
    fit_text(tmp_path / "run", text_corpus, 2)
    commands = next_commands(capsys.readouterr().out)
    assert set(commands) == {"score it", "sample it", "export it"}
    monkeypatch.chdir(tmp_path)  # where a user would run them: their outputs land in the run folder, not here
    for name, argv in commands.items():
        assert argv[0] == "python" and (REPO / argv[1]).is_file(), argv
        # Scoring the paper's tasks needs their data: this test's few documents, and one of each.
        extra = ["--data-dir", str(paper_data), "--limit", "1"] if name == "score it" else []
        exit_on_user_error(SCRIPTS[argv[1]], argv[2:] + extra)
    assert (tmp_path / "run" / "version_0" / "eval" / "summary.md").is_file() and not (tmp_path / "eval_results").exists()
    assert (tmp_path / "run" / "version_0" / "hf" / "tokenizer.json").is_file()
