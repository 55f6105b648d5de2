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


WORDS = ("the model reads every token of a sentence and learns which word comes next while the table of n-grams "
         "grows with the vocabulary over time in each layer").split()


def synthetic_documents(count: int, seed: int = 0, words: tuple[str, ...] = tuple(WORDS)) -> list[str]:
    """Deterministic English-like documents (a few hundred characters each)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 90))) + "." for _ in range(count)]


def prepare_corpus(root: Path, words: tuple[str, ...] = tuple(WORDS)) -> Path:
    """Shards written by ``prepare``: a 300-entry byte-level BPE trained on the text, 7 train and 2 validation
    shards."""
    from lit_overtok.data.prepare import PrepareConfig, prepare

    root.mkdir(parents=True, exist_ok=True)
    for name, documents in (("train.jsonl", synthetic_documents(80, 0, words)),
                            ("val.jsonl", synthetic_documents(20, 1, words))):
        (root / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    output = root / "shards"
    prepare(PrepareConfig(output=output, train=[str(root / "train.jsonl")], validation=[str(root / "val.jsonl")],
                          vocab_size=300, shard_tokens=2000, workers=1, progress=False, tokenizer_train_mb=1))
    return output


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    return prepare_corpus(tmp_path_factory.mktemp("text_corpus"))


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    """The grid file of a finished 2-point sweep (baseline and exact 3-gram OE, seed 1), run one point at a time."""
    from evaluation import sweep
    from tests.sweep_grids import TINY_ARMS, write_grid

    folder = tmp_path_factory.mktemp("tiny_sweep")
    grid = write_grid(folder / "grid.yaml", TINY_ARMS, folder / "out")
    assert sweep.main([str(grid), "--jobs", "1", "--threads-per-job", "1"]) == 0
    return grid
