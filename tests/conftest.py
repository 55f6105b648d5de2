"""Shared fixtures: small copies of the offline task data, the GPT-2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_overtok.evaluation.benchmark_tasks import DEFAULT_DATA_DIR, read_split


@pytest.fixture
def gpt2_tokenizer() -> Path:
    return DEFAULT_DATA_DIR / "tokenizers" / "gpt2" / "tokenizer.json"


@pytest.fixture
def paper_data(tmp_path: Path) -> Path:
    """A data folder with a few documents of each of the paper's five tasks (MMLU: one question and its shots)."""
    data_dir = tmp_path / "paper_data"

    def copy(folder: str, split: str, count: int, keep=lambda row: True) -> None:
        (data_dir / folder).mkdir(parents=True, exist_ok=True)
        rows = [row for row in read_split(str(DEFAULT_DATA_DIR), folder, split) if keep(row)][:count]
        (data_dir / folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    for folder in ("hellaswag", "piqa", "arc_easy", "arc_challenge"):
        copy(folder, "validation", 3)
    for folder in ("arc_easy", "arc_challenge"):
        copy(folder, "train", 3)
    copy("mmlu", "validation", 1)
    copy("mmlu", "dev", 5, keep=lambda row: row["subject"] == "abstract_algebra")
    return data_dir


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    """The grid file of a finished 2-point sweep (baseline and exact 3-gram OE, seed 1), run one point at a time."""
    from evaluation import sweep
    from tests.sweep_grids import TINY_ARMS, write_grid

    folder = tmp_path_factory.mktemp("tiny_sweep")
    grid = write_grid(folder / "grid.yaml", TINY_ARMS, folder / "out")
    assert sweep.main([str(grid), "--jobs", "1", "--threads-per-job", "1"]) == 0
    return grid
