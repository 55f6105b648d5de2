"""Writing a split's shards so that an interrupted ``prepare`` can continue: ``ShardWriter`` and ``PrepareProgress``.

``ShardWriter`` packs documents, in order, into shards of at least ``shard_tokens`` tokens (documents are never
split) and records each finished shard in a ``SplitProgress``. ``PrepareProgress`` is that record for every split,
plus the options it is valid for, kept in ``prepare.progress.json`` beside the shards and rewritten atomically after
every shard. A rerun with ``--resume`` keeps the shards the record lists (after checking their sha256), skips the
documents they hold, and writes the rest exactly as an uninterrupted run would have. Several jobs that each write
some shards (scale-out) can use the same two pieces with their own ``first_shard`` / ``first_document``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lit_overtok.data import shards
from lit_overtok.data.text_inputs import PrepareError

PROGRESS_NAME = "prepare.progress.json"


def write_json_atomically(path: Path, value: Any) -> None:
    temporary = path.with_name(path.name + ".partial")
    try:
        temporary.write_text(json.dumps(value, indent=1) + "\n")
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise PrepareError(f"writing {path} failed ({error.strerror or error}); free space or fix permissions, then "
                           "rerun the same command with --resume") from None


@dataclass
class SplitProgress:
    shards: list[shards.ShardInfo] = field(default_factory=list)
    documents: int = 0
    """Documents in ``shards``: where the next shard's documents start in the split's input."""
    done: bool = False


@dataclass
class PrepareProgress:
    output: Path
    options: dict[str, Any]
    """What the shards depend on (inputs, tokenizer, options); a resume must match it."""
    splits: dict[str, SplitProgress] = field(default_factory=dict)

    def save(self) -> None:
        record = {"options": self.options, "splits": {
            split: {"shards": [asdict(s) for s in p.shards], "documents": p.documents, "done": p.done}
            for split, p in self.splits.items()}}
        write_json_atomically(self.output / PROGRESS_NAME, record)

    @classmethod
    def load(cls, output: Path) -> Optional["PrepareProgress"]:
        path = output / PROGRESS_NAME
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            splits = {split: SplitProgress([shards.ShardInfo(**s) for s in p["shards"]], p["documents"], p["done"])
                      for split, p in record["splits"].items()}
            return cls(output, record["options"], splits)
        except (ValueError, KeyError, TypeError) as error:
            raise PrepareError(f"{path} is damaged ({type(error).__name__}: {error}); start over with --overwrite") from None

    def check_options(self, options: dict[str, Any]) -> None:
        changed = sorted(k for k in options if options[k] != self.options.get(k))
        if changed:
            raise PrepareError(f"--resume: {self.output} was prepared with other {', '.join(changed)} (inputs, "
                               "tokenizer or options changed since); rerun the interrupted command as it was, or "
                               "start over with --overwrite")

    def keep_intact_shards(self) -> None:
        """Drop recorded shards whose file is missing or changed (and all after them), and remove shard files that
        no record lists (a shard renamed into place just before the interruption is written again)."""
        for split, progress in self.splits.items():
            for index, info in enumerate(progress.shards):
                path = self.output / info.file
                if not path.is_file() or path.stat().st_size != info.bytes or shards.file_sha256(path) != info.sha256:
                    progress.shards = progress.shards[:index]
                    progress.documents = sum(s.documents for s in progress.shards)
                    progress.done = False
                    break
            kept = {info.file for info in progress.shards}
            for path in self.output.glob(f"{split}-*.tar"):
                if path.name not in kept:
                    path.unlink()
        for path in self.output.glob("*.partial"):
            path.unlink()


class ShardWriter:
    """Collects documents in order and closes a shard once it holds at least ``shard_tokens`` tokens."""

    def __init__(self, output: Path, split: str, shard_tokens: int, progress: SplitProgress,
                 on_shard: Callable[[], None] = lambda: None) -> None:
        self.output, self.split, self.shard_tokens = output, split, shard_tokens
        self.progress, self.on_shard = progress, on_shard
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        for document in np.split(tokens, np.cumsum(lengths)[:-1]):
            self.pending.append(document)
            self.pending_tokens += len(document)
            if self.pending_tokens >= self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        progress = self.progress
        path = self.output / shards.shard_file_name(self.split, len(progress.shards))
        try:
            info = shards.write_shard(path, self.pending, first_document=progress.documents)
        except OSError as error:
            raise PrepareError(f"writing {path} failed ({error.strerror or error}); the {len(progress.shards)} "
                               f"{self.split} shards before it are complete: free space, then rerun the same command "
                               "with --resume") from None
        progress.shards.append(info)
        progress.documents += len(self.pending)
        self.pending, self.pending_tokens = [], 0
        self.on_shard()
