"""Which tokenizer a model reads: the one bound to its checkpoint, never a guess (docs/method.md §6).

A model's ids mean the strings of the tokenizer it was trained with, and nothing else; scoring, sampling or exporting
it with another tokenizer reads its ids as other strings, silently. So the tokenizer travels with the checkpoint:

* a grammar run (``CFGDataModule``) is bound to its grammar (``grammar:<name>``, one character per id);
* a text run (``WebDatasetDataModule``, e.g. Wikipedia) is bound to the sha256 of its shards' tokenizer file. The data
  module records ``{"sha256", "file"}`` in every checkpoint; ``strip`` keeps that record in the inference checkpoint;
  checkpoints from before the record find it in the manifest their data module names.

``TokenizerBinding.resolve`` is the one rule every reader applies (evaluate, generate, export, strip, the lm-eval model
and CLI, the in-training lm-eval callback): no tokenizer given means the bound one; a given one is taken only if it is
the bound one (same sha256, or the same grammar), or with ``allow_change`` (a warning). Anything else is one line
naming both tokenizers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lit_overtok.data.grammar import Grammar
from lit_overtok.data.shards import MANIFEST_NAME, Manifest, TOKENIZER_NAME, file_sha256
from lit_overtok.errors import InputError

GRAMMAR_PREFIX = "grammar:"
RECORD_KEY = "tokenizer"
"""Where an inference checkpoint keeps the record (a training checkpoint has it in its data module's state)."""


class TokenizerMismatch(InputError):
    """A tokenizer that is not the one a model was trained with, or none to be found."""


def _as_file(spec: str) -> Path:
    path = Path(spec)
    return path / TOKENIZER_NAME if path.is_dir() else path


def _same_grammar(a: str, b: str) -> bool:
    if a == b:
        return True
    first, second = Grammar.load(a), Grammar.load(b)
    return (first.start, first.terminals, first.rules) == (second.start, second.terminals, second.rules)


@dataclass(frozen=True)
class TokenizerBinding:
    """What a model was trained to read: a grammar, or a tokenizers file known by its sha256 (``file``: where it was
    when recorded, None if unknown); neither when its data named none (then a given tokenizer is taken as is)."""

    source: str
    """The checkpoint or data module, for messages."""
    grammar: Optional[str] = None
    sha256: Optional[str] = None
    file: Optional[str] = None

    @classmethod
    def of_checkpoint(cls, checkpoint: dict[str, Any], source: Any) -> "TokenizerBinding":
        """The binding a checkpoint dict (training or inference, any kind) records."""
        data = checkpoint.get("datamodule_hyper_parameters") or {}
        if data.get("grammar"):
            return cls(str(source), grammar=str(data["grammar"]))
        record = _recorded(checkpoint) or _from_manifest(data)
        if record is None:
            return cls(str(source), file=str(data["tokenizer"]) if data.get("tokenizer") else None)
        return cls(str(source), sha256=record["sha256"], file=record.get("file") or data.get("tokenizer"))

    @classmethod
    def of_datamodule(cls, datamodule: Any) -> "TokenizerBinding":
        """The binding of the data a run trains on (what its checkpoints will record)."""
        name = type(datamodule).__name__
        if getattr(datamodule, "grammar", None) is not None:
            hparams = getattr(datamodule, "hparams", {}) or {}
            return cls(f"the data module {name}", grammar=str(hparams.get("grammar", datamodule.grammar.name)))
        if hasattr(datamodule, "tokenizer_record"):
            record = datamodule.tokenizer_record()
            return cls(f"the data module {name}", sha256=record["sha256"], file=record.get("file"))
        return cls("the data module" if datamodule is None else f"the data module {name}")

    def record(self) -> Optional[dict[str, Any]]:
        """``{"sha256", "file"}`` as checkpoints record it (None for grammars: the data's hyperparameters say it)."""
        return None if self.sha256 is None else {"sha256": self.sha256, "file": self.file}

    def describe(self) -> str:
        if self.grammar is not None:
            return f"{GRAMMAR_PREFIX}{self.grammar}"
        if self.sha256 is not None:
            return f"{self.file or 'a tokenizers file'} (sha256 {self.sha256[:12]}…)"
        return self.file or "no recorded tokenizer"

    def resolve(self, given: Optional[str] = None, allow_change: bool = False, option: str = "--tokenizer") -> str:
        """The tokenizer to read the model with: ``grammar:<name>`` or a tokenizers JSON path.

        ``given`` (what the user passed as ``option``) must be the bound tokenizer unless ``allow_change``; with no
        ``given``, the bound one (its recorded file must still exist and hash the same)."""
        if given is None:
            return self._bound(option)
        given = str(given)
        if self._is_bound(given):
            return given if given.startswith(GRAMMAR_PREFIX) else str(_as_file(given))
        message = f"{option} {self._describe_given(given)} is not the tokenizer {self.source} was trained with " \
                  f"({self.describe()}); its ids would be read as other strings"
        if not allow_change:
            raise TokenizerMismatch(f"{message}; leave {option} out to use that one, or allow the change explicitly "
                                    "(--allow-tokenizer-change / allow_tokenizer_change)")
        warnings.warn(f"{message}; continuing (allow_tokenizer_change)")
        return given if given.startswith(GRAMMAR_PREFIX) else str(_as_file(given))

    def _bound(self, option: str) -> str:
        if self.grammar is not None:
            return f"{GRAMMAR_PREFIX}{self.grammar}"
        if self.sha256 is None:
            if self.file is not None:
                return self.file
            raise TokenizerMismatch(f"{self.source} names no tokenizer (its data recorded none); pass {option} (a "
                                    f"tokenizers JSON or {GRAMMAR_PREFIX}<name>)")
        if self.file is None:
            raise TokenizerMismatch(f"{self.source}: the tokenizer file it was trained with is unknown (sha256 "
                                    f"{self.sha256[:12]}…); pass {option} with that file")
        path = _as_file(self.file)
        if not path.is_file():
            raise TokenizerMismatch(f"{self.source}: its tokenizer {path} does not exist any more; pass {option} with "
                                    f"the file whose sha256 is {self.sha256[:12]}…")
        digest = file_sha256(path)
        if digest != self.sha256:
            raise TokenizerMismatch(f"the recorded tokenizer {path} (now sha256 {digest[:12]}…) changed since "
                                    f"{self.source} was trained with it (sha256 {self.sha256[:12]}…); pass {option} "
                                    "with the original file")
        return str(path)

    def _is_bound(self, given: str) -> bool:
        if given.startswith(GRAMMAR_PREFIX):
            if self.grammar is None:
                return self.sha256 is None  # nothing recorded to compare with
            return _same_grammar(given[len(GRAMMAR_PREFIX):], self.grammar)
        if self.grammar is not None:
            return False
        path = _as_file(given)
        if not path.is_file():
            raise TokenizerMismatch(f"tokenizer file {path} does not exist (give a tokenizers JSON, or "
                                    f"{GRAMMAR_PREFIX}<name> for a grammar model)")
        return self.sha256 is None or file_sha256(path) == self.sha256

    def _describe_given(self, given: str) -> str:
        if given.startswith(GRAMMAR_PREFIX):
            return given
        return f"{_as_file(given)} (sha256 {file_sha256(_as_file(given))[:12]}…)"


def _recorded(checkpoint: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The record a data module saved in its state (training checkpoints) or ``strip`` kept (inference ones)."""
    candidates = [checkpoint.get(RECORD_KEY)] + [value.get(RECORD_KEY) for value in checkpoint.values()
                                                   if isinstance(value, dict)]
    return next((c for c in candidates if isinstance(c, dict) and "sha256" in c), None)


def _from_manifest(data: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Checkpoints from before the record: the tokenizer of the manifest their data module names, if still there."""
    train = data.get("train_shards")
    manifest = data.get("manifest") or (Path(train) / MANIFEST_NAME if train and Path(train).is_dir() else None)
    if manifest is None or not Path(manifest).is_file():
        return None
    loaded = Manifest.load(manifest)
    file = loaded.directory / loaded.tokenizer_file
    return {"sha256": loaded.tokenizer_sha256, "file": str(file) if file.is_file() else None}
