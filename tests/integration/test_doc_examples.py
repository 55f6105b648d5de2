"""The examples in README.md and docs/*.md work as printed (issue 19 item 5): a doc that rots fails here.

What is checked, in-process (a few seconds per example):

* **YAML blocks.** A training config (its keys are ``trainer``, ``model``, ``data``, ``global_batch``, ...) is a
  partial config: it goes to ``train.py fit --config <block> --print_config``, i.e. it is merged over the embedded
  default (``configs/default.yaml``, what ``python train.py fit`` runs) exactly as a user's ``--config`` file is, and
  passes the CLI's own key check (``lit_overtok.cli.config_keys.check_keys``) and jsonargparse's parse. A sweep grid
  (it has ``arms``) goes through ``lit_overtok.studies.sweep.load_grid``, and each arm's ``train.py`` arguments
  through ``check_keys``.
* **Commands** (in fenced shell blocks and in inline code): ``python train.py ...``, ``python -m lit_overtok...``,
  ``python evaluation/*.py ...``, ``python benchmarks/*.py ...``, the ``lit-overtok-*`` console scripts and the
  ``train.py`` line a ``torchrun`` launches. Training
  commands (``fit``/``validate``/``test``) run with ``--print_config`` appended: the whole command line and its
  config files are parsed and resolved, nothing trains. Every other command is parsed by its own ``argparse`` parser
  and stopped there (options, choices and types are checked; the files it would read are not), except ``--help``
  and ``--dry-run``, which run for real. A ``--config`` under ``runs/`` is a run folder an earlier step of the doc
  makes: it is left out (the embedded default stands in) and the rest of the line is still checked.
* **Paths and names.** Every inline path into the repository (``lit_overtok/...``, ``configs/...``, ``tests/...``,
  ...) exists, every dotted ``lit_overtok.x.y.Name`` resolves, every relative link and ``#anchor`` lands, and every
  ``docs/<page>.md §N`` the code cites is a heading of that page.

A block that is not meant to run (an error message, a shell session of another tool) is skipped only when the line
before its fence is ``<!-- no-test: why -->``; the skipped blocks are counted against ``SKIPPED_BLOCKS`` so a new one
is a visible decision. Every other fenced block must hold something checkable.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIPPED_BLOCKS = 4  # the blocks marked <!-- no-test --> in README.md and docs/*.md, counted so a new one is a decision
NO_TEST = re.compile(r"^<!--\s*no-test\b.*-->\s*$")
TRAIN_KEYS = {"trainer", "model", "data", "global_batch", "seed_everything", "ckpt_path", "optimizer", "lr_scheduler"}
TRAINING_SUBCOMMANDS = ("fit", "validate", "test")
CONSOLE_SCRIPTS = {  # pyproject.toml's [project.scripts]
    "lit-overtok-train": "lit_overtok.cli.main",
    "lit-overtok-prepare": "lit_overtok.data.prepare",
    "lit-overtok-lm-eval": "lit_overtok.evaluation.lm_eval_cli",
    "lit-overtok-export": "lit_overtok.cli.export",
}
REPO_DIRS = ("lit_overtok", "configs", "tests", "benchmarks", "evaluation", "docs")
# results/ is written by the studies (evaluation/report.py) and its README by their maintainers; the docs may link
# into it before a report exists.
NOT_CHECKED = ("results/",)


@dataclass
class Example:
    doc: Path
    line: int
    kind: str  # "yaml", "command", "skipped" (marked <!-- no-test -->) or "unchecked" (nothing to check: an error)
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def _commands_in(text: str) -> list[str]:
    """The checkable commands of a shell snippet (continuation lines joined, comments and other commands dropped)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        if tokens[:1] == ["torchrun"] and "train.py" in tokens:  # the training command torchrun launches
            tokens = ["python", *tokens[tokens.index("train.py"):]]
        command: list[str] = []
        for token in tokens + ["&&"]:
            if token in ("&&", ";", "||", "|"):
                if _checkable(command):
                    commands.append(shlex.join(command))
                command = []
            else:
                command.append(token)
    return commands


def _checkable(tokens: list[str]) -> bool:
    if not tokens:
        return False
    if tokens[0] in CONSOLE_SCRIPTS:
        return True
    if tokens[0] not in ("python", "python3") or len(tokens) < 2:
        return False
    target = tokens[1]
    return (target == "train.py" or re.fullmatch(r"(evaluation|benchmarks)/\w+\.py", target) is not None
            or (target == "-m" and len(tokens) > 2 and tokens[2].startswith("lit_overtok")))


def collect(docs: list[Path]) -> list[Example]:
    """Every fenced block and every inline command of the given markdown files."""
    examples = []
    for doc in docs:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^(\s*)```(\w*)", lines[i])
            if not fence:
                for span in re.findall(r"`([^`]+)`", lines[i]):
                    if span.startswith(("python", "lit-overtok")):  # a program name alone is prose, not a command
                        examples += [Example(doc, i + 1, "command", c) for c in _commands_in(span)
                                     if len(shlex.split(c)) > (3 if c.startswith("python -m") else 1)]
                i += 1
                continue
            start, language = i, fence.group(2)
            i += 1
            body = []
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i][len(fence.group(1)):])
                i += 1
            i += 1
            text = "\n".join(body)
            previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            if NO_TEST.match(previous.strip()):
                examples.append(Example(doc, start + 1, "skipped", text))
            elif language in ("yaml", "yml"):
                examples.append(Example(doc, start + 1, "yaml", text))
            else:
                commands = _commands_in(text)
                examples += [Example(doc, start + 1, "command", c) for c in commands] or [
                    Example(doc, start + 1, "unchecked", text)]
    return examples


EXAMPLES = collect(DOCS)


class _Parsed(BaseException):
    """Raised by the parse-only ``argparse`` once a command line parsed (a BaseException: no script catches it)."""


@contextlib.contextmanager
def _parse_only():
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)  # a bad option, choice or type exits with status 2 and argparse's message
        raise _Parsed()

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def run_python(argv: list[str], parse_only: bool) -> tuple[int, str]:
    """Run ``python <argv>`` in this process, from the checkout; (exit status, stdout + stderr)."""
    out = io.StringIO()
    saved_argv, code = sys.argv, 0
    if argv[0] == "-m":
        sys.argv, run = [argv[1], *argv[2:]], lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv, run = list(argv), lambda: runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), \
                (_parse_only() if parse_only else contextlib.nullcontext()):
            run()
    except _Parsed:
        pass
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, (int, type(None))):
            out.write(str(exit_.code))
    finally:
        sys.argv = saved_argv
    return code, out.getvalue()


def _training_argv(argv: list[str]) -> list[str]:
    """A train.py command line that parses and resolves everything and trains nothing."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--config", "-c") and i + 1 < len(argv) and argv[i + 1].startswith("runs/") \
                and not (ROOT / argv[i + 1]).exists():
            skip = True  # a run folder an earlier step makes
            continue
        kept.append(arg)
    asks_help = any(a in ("-h", "--help", "--print_config") or a.endswith(".help") for a in kept)
    return kept if asks_help else [*kept, "--print_config"]


def check_command(command: str) -> None:
    tokens = shlex.split(command)
    if tokens[0] in CONSOLE_SCRIPTS:
        argv = ["-m", CONSOLE_SCRIPTS[tokens[0]], *tokens[1:]]
    else:
        argv = tokens[1:]
    missing = [t for t in argv if re.fullmatch(r"(configs|evaluation|benchmarks)/[\w./-]+", t) and not (ROOT / t).exists()]
    assert not missing, f"{command}: no such file in the repository: {missing}"
    module = argv[1] if argv[0] == "-m" else argv[0]
    training = module in ("train.py", "lit_overtok", "lit_overtok.cli.main")
    position = 2 if argv[0] == "-m" else 1
    subcommand = argv[position] if len(argv) > position else "fit"
    if training and (subcommand in TRAINING_SUBCOMMANDS or subcommand.startswith("-")):
        argv = argv[:position] + _training_argv(argv[position:])
        parse_only = False
    else:
        parse_only = not any(a in ("--dry-run", "-h", "--help") for a in argv)
    code, output = run_python(argv, parse_only)
    assert code == 0, f"`{command}` exited with status {code}:\n{output[-3000:]}"


def check_yaml(text: str, tmp_path: Path) -> None:
    config = yaml.safe_load(text)
    assert isinstance(config, dict) and config, "a YAML example must be a mapping"
    path = tmp_path / "example.yaml"
    path.write_text(text)
    if "arms" in config:
        from lit_overtok.cli.config_keys import check_keys
        from lit_overtok.studies.sweep import grid_points, load_grid

        grid = load_grid(path)
        first_points = {point.arm: point for point in reversed(grid_points(grid, threads=1))}
        for point in first_points.values():
            check_keys(point.args[1:])
        return
    unknown = set(config) - TRAIN_KEYS
    assert not unknown, (f"top-level keys {sorted(unknown)}: neither a training config ({sorted(TRAIN_KEYS)}) nor a "
                         "sweep grid (arms); mark the block <!-- no-test: why --> if it is neither")
    code, output = run_python(["train.py", "fit", "--config", str(path), "--print_config"], parse_only=False)
    assert code == 0, f"train.py fit --config <this block> --print_config exited with status {code}:\n{output[-3000:]}"


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind in ("yaml", "command")], ids=lambda e: e.id)
def test_example(example: Example, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # paths in the docs are relative to the checkout, as for train.py
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if example.kind == "yaml":
        check_yaml(example.text, tmp_path)
    else:
        check_command(example.text)


def test_only_marked_blocks_are_skipped():
    unchecked = [e.id for e in EXAMPLES if e.kind == "unchecked"]
    assert not unchecked, f"blocks with nothing to check: {unchecked}; make each a command or mark it <!-- no-test: why -->"
    skipped = [e.id for e in EXAMPLES if e.kind == "skipped"]
    assert len(skipped) == SKIPPED_BLOCKS, f"blocks marked <!-- no-test -->: {skipped}; update SKIPPED_BLOCKS if meant"
    assert sum(e.kind == "yaml" for e in EXAMPLES) >= 5 and sum(e.kind == "command" for e in EXAMPLES) >= 20


def _expand_braces(text: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", text)
    if not match:
        return [text]
    return [x for part in match.group(1).split(",")
            for x in _expand_braces(text[:match.start()] + part + text[match.end():])]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    in_fence, anchors = False, set()
    for line in doc.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def _prose(doc: Path) -> list[tuple[int, str]]:
    in_fence, lines = False, []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence:
            lines.append((number, line))
    return lines


def test_paths_names_and_links_in_the_docs_exist():
    problems = []
    for doc in DOCS:
        where = doc.relative_to(ROOT)
        for number, line in _prose(doc):
            for span in re.findall(r"`([^`\s<>]+)`", line):
                if re.fullmatch(rf"(?:{'|'.join(REPO_DIRS)})/[\w./*{{}},-]*", span) and not span.startswith(NOT_CHECKED):
                    for path in _expand_braces(span.rstrip("/")):
                        if not glob.glob(str(ROOT / path)):
                            problems.append(f"{where}:{number}: no {path}")
                elif re.fullmatch(r"lit_overtok(\.\w+)+", span):
                    parts, found = span.split("."), None
                    for cut in range(len(parts), 0, -1):
                        try:
                            found = importlib.import_module(".".join(parts[:cut]))
                        except ImportError:
                            continue
                        for attribute in parts[cut:]:
                            found = getattr(found, attribute, None)
                        break
                    if found is None:
                        problems.append(f"{where}:{number}: {span} does not resolve")
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue  # http(s), mailto
                file_part, _, anchor = target.partition("#")
                linked = (doc.parent / file_part).resolve() if file_part else doc
                if str(linked.relative_to(ROOT)).startswith(NOT_CHECKED):
                    continue
                if not linked.exists():
                    problems.append(f"{where}:{number}: link to a missing {file_part}")
                elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                    problems.append(f"{where}:{number}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_every_cited_docs_section_exists():
    """``docs/method.md §1.3`` in the code (docstrings, comments, configs) names a heading ``### 1.3`` of that page."""
    problems = []
    for folder in ("lit_overtok", "tests", "benchmarks", "configs", "evaluation"):
        for source in sorted((ROOT / folder).rglob("*")):
            if source.suffix not in (".py", ".yaml", ".yml", ".sh", ".sbatch") or not source.is_file():
                continue
            for page, section in re.findall(r"docs/([\w-]+\.md) §(\d+(?:\.\d+)*)", source.read_text()):
                doc = ROOT / "docs" / page
                heading = re.compile(rf"^#+ {re.escape(section)}\.?\s", re.MULTILINE)
                if not doc.exists() or not heading.search(doc.read_text()):
                    problems.append(f"{source.relative_to(ROOT)} cites docs/{page} §{section}, which does not exist")
    assert not problems, "\n".join(sorted(set(problems)))
