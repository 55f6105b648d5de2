"""Shared fixtures: a text tokenizer, small copies of the offline task data (from ``tests/fixtures``), prepared
shards, tiny trained runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures import mmlu_questions, rows, train_text_tokenizer, write_split


@pytest.fixture(scope="session")
def text_tokenizer(tmp_path_factory) -> Path:
    """A GPT-2-style byte-level BPE (``tests.fixtures.TEXT_VOCAB`` ids, the last one <|endoftext|>)."""
    return train_text_tokenizer(tmp_path_factory.mktemp("text_tokenizer") / "tokenizer.json")


@pytest.fixture
def paper_data(tmp_path: Path) -> Path:
    """A data folder with a few documents of each of the paper's five tasks (MMLU: one question and its shots)."""
    data_dir = tmp_path / "paper_data"
    for folder in ("hellaswag", "piqa", "arc_easy", "arc_challenge"):
        write_split(data_dir, folder, "validation", rows(folder, "validation", 3))
    for folder in ("arc_easy", "arc_challenge"):
        write_split(data_dir, folder, "train", rows(folder, "train", 3))
    write_split(data_dir, "mmlu", "validation", rows("mmlu", "validation", 1))
    write_split(data_dir, "mmlu", "dev", mmlu_questions("abstract_algebra", "dev", 5))
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


# A Wikipedia-like run: the real CLI on ``text_corpus``'s shards (its own BPE, recorded in every checkpoint).
TEXT_FIT = ["--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--model.init_args.model_config.preset=tiny",
            "--data=lit_overtok.data.webdataset_datamodule.WebDatasetDataModule", "--data.init_args.seq_len=16",
            "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.val_batches=1"]


def fit_text(root: Path, corpus: Path, steps: int, *extra: str) -> None:
    from lit_overtok.cli.main import main as cli_main

    cli_main(["fit", f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}", *TEXT_FIT,
              f"--data.init_args.train_shards={corpus}", *extra])


@pytest.fixture(scope="session")
def text_run(tmp_path_factory, text_corpus) -> Path:
    """``last.ckpt`` of a 2-step ``train.py fit`` on ``text_corpus`` (trained once per session)."""
    root = tmp_path_factory.mktemp("text_run")
    fit_text(root, text_corpus, 2)
    return root / "version_0" / "checkpoints" / "last.ckpt"


# A 2-step run of the real CLI per model family (tiny shapes, cfg3f), shared by the tests of the commands that read
# checkpoints (generate, strip, export, lm-eval, evaluate).
TINY_FIT = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--data.init_args.seq_len=32", "--data.init_args.batch_size=2", "--data.init_args.val_sentences=2"]
RUN_FAMILIES = {
    "dense": ["--model.init_args.model_config.preset=tiny"],
    "moe": ["--model.init_args.model_config.preset=moe-tiny"],
    "oe": ["--model.init_args.model_config.preset=tiny",
           '--model.init_args.model_config.over_encoding={"m": 97, "n": 3, "k": 2}'],
    # LongCat's N-gram Embedding, cfg3f's id 0 (BOS) ignored.
    "ne": ["--model.init_args.model_config.preset=tiny",
           '--model.init_args.model_config.over_encoding={"m": 96, "n": 3, "k": 2, "flavor": "longcat", "ignore_ids": [0]}'],
    "engram": ["--model.init_args.model_config.preset=tiny",
               '--model.init_args.model_config.engram={"layers": [0, 1], "table_size": 31, "heads": 2, "ngram_width": 8}'],
    "od": ["--model.init_args.model_config.preset=tiny",
           '--model.init_args.model_config.multi_token={"mode": "od", "n": 2}'],
}


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """``trained_checkpoint(family) -> last.ckpt`` of a 2-step ``train.py fit`` (trained once per session)."""
    from lit_overtok.cli.main import main as cli_main

    done: dict[str, Path] = {}

    def train(family: str) -> Path:
        if family not in done:
            root = tmp_path_factory.mktemp(f"run_{family}")
            cli_main(["fit", f"--trainer.default_root_dir={root}", *TINY_FIT, *RUN_FAMILIES[family]])
            done[family] = root / "version_0" / "checkpoints" / "last.ckpt"
        return done[family]

    return train


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    """The grid file of a finished 2-point sweep (baseline and exact 3-gram OE, seed 1), run one point at a time."""
    from lit_overtok.studies import sweep
    from tests.studies.sweep_grids import TINY_ARMS, write_grid

    folder = tmp_path_factory.mktemp("tiny_sweep")
    grid = write_grid(folder / "grid.yaml", TINY_ARMS, folder / "out")
    assert sweep.main([str(grid), "--jobs", "1", "--threads-per-job", "1"]) == 0
    return grid
