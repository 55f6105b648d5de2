"""Token shards: the on-disk format that ``prepare`` writes and ``WebDatasetDataModule`` streams.

A prepared directory holds

* ``manifest.json``: what the shards are: format version, the tokenizer's file name and sha256, the vocabulary
  size, the EOS id, the token dtype, and per split (``train``, ``validation``) every shard's file name, document
  count, token count, byte size, sha256 and largest token id (checked against the vocabulary when the manifest
  is loaded, and again in the tokens when a shard is read);
* ``tokenizer.json``: the tokenizer that produced the tokens (a copy of the given file, or the trained BPE);
* ``<split>-NNNNNN.tar``: WebDataset shards. Plain ustar tar files, one member per document, named
  ``<10-digit document index>.bin``, holding the document's token ids followed by EOS as raw little-endian
  ``uint16`` (vocabulary <= 65536) or ``uint32``. Raw arrays, not ``.npy``/``.pyd`` (WebDataset's default decoders
  unpickle ``.pyd``/``.pkl``): nothing is ever unpickled, and the dtype lives in the manifest. Members carry fixed
  metadata (mtime 0, uid/gid 0, mode 0444), so the same documents always give byte-identical shards.

Reading verifies each shard's size and sha256 against the manifest before parsing it, so a truncated or modified
shard is always detected (a tar reader alone can mistake a truncated archive for a shorter one).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lit_overtok.errors import InputError

FORMAT = "lit_overtok.token_shards/1"
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
MEMBER_SUFFIX = ".bin"


class CorruptShardError(RuntimeError):
    """A shard that cannot be read, or whose bytes do not match its manifest entry."""

    def __init__(self, shard: str, reason: str) -> None:
        super().__init__(f"corrupt shard {shard}: {reason}")
        self.shard, self.reason = shard, reason


class ManifestError(InputError):
    """A manifest that is missing, malformed, or does not fit the shards or the configuration."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the vocabulary (little-endian on disk)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    file: str
    """File name, relative to the manifest's directory."""
    documents: int
    tokens: int
    bytes: int
    sha256: str
    max_id: Optional[int] = None
    """The largest token id in the shard (None in manifests written before it was recorded)."""


@dataclass(frozen=True)
class Manifest:
    path: Path
    tokenizer_file: str
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    dtype: np.dtype
    splits: dict[str, tuple[ShardInfo, ...]]

    @property
    def directory(self) -> Path:
        return self.path.parent

    @functools.cached_property
    def _by_file(self) -> dict[str, tuple[str, ShardInfo]]:
        return {info.file: (split, info) for split, shards in self.splits.items() for info in shards}

    def split_of(self, file: str) -> str:
        return self._by_file[file][0]

    def shard(self, file: str) -> ShardInfo:
        if file not in self._by_file:
            raise ManifestError(
                f"shard {file!r} is not listed in {self.path}; that manifest lists {_preview(list(self._by_file))}. "
                "Shards and manifest must come from the same prepare run."
            )
        return self._by_file[file][1]

    def compatibility(self) -> tuple:
        """What two manifests must share for their shards to be mixed (train from one, validation from another)."""
        return (self.tokenizer_sha256, self.vocab_size, self.eos_id, self.dtype.str)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        if not path.is_file():
            raise ManifestError(
                f"no manifest at {path}: point the data module at a directory written by "
                "`python -m lit_overtok.data.prepare`, or give data.manifest explicitly"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ManifestError(f"{path} is not valid JSON ({error}); write it again with "
                                "`python -m lit_overtok.data.prepare`") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ManifestError(f"{path}: format is {found!r}, expected {FORMAT!r} (written by lit_overtok's prepare)")
        try:
            vocab_size, eos_id = int(raw["vocab_size"]), int(raw["eos_id"])
            dtype = np.dtype(raw["dtype"]).newbyteorder("<")
            splits = {
                split: tuple(ShardInfo(**entry) for entry in raw["splits"][split]["shards"]) for split in raw["splits"]
            }
            tokenizer = raw["tokenizer"]
            manifest = cls(path, tokenizer["file"], tokenizer["sha256"], vocab_size, eos_id, dtype, splits)
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestError(f"{path}: malformed manifest ({type(error).__name__}: {error})") from None
        if not 0 <= eos_id < vocab_size or dtype != token_dtype(vocab_size):
            raise ManifestError(
                f"{path}: eos_id {eos_id} / dtype {dtype} do not fit vocab_size {vocab_size} "
                f"(eos_id must be in [0, vocab_size), dtype {token_dtype(vocab_size)})"
            )
        for info in (info for infos in splits.values() for info in infos):
            if info.max_id is not None and info.max_id >= vocab_size:
                raise ManifestError(
                    f"{path}: shard {info.file} holds token id {info.max_id}, outside vocab_size {vocab_size}; "
                    "the manifest does not belong to these shards (prepare them again)")
        return manifest


def manifest_dict(
    tokenizer_sha256: str, vocab_size: int, eos_id: int, splits: dict[str, list[ShardInfo]], provenance: dict[str, Any]
) -> dict[str, Any]:
    """The JSON form of a manifest; ``provenance`` records how it was made (inputs, options)."""
    return {
        "format": FORMAT,
        "tokenizer": {"file": TOKENIZER_NAME, "sha256": tokenizer_sha256},
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "dtype": token_dtype(vocab_size).name,
        "splits": {
            split: {
                "documents": sum(s.documents for s in shards),
                "tokens": sum(s.tokens for s in shards),
                "shards": [vars(s) for s in shards],
            }
            for split, shards in splits.items()
        },
        "provenance": provenance,
    }


def shard_file_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_shard(path: Path, documents: list[np.ndarray], first_document: int) -> ShardInfo:
    """Write documents (token arrays already in the manifest's dtype) as one tar shard, atomically."""
    # Imported here: webdataset imports torch, which would cost every spawned tokenizer process seconds.
    from webdataset import TarWriter

    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False, mtime=0, user="", group="", mode=0o444) as writer:
        for offset, tokens in enumerate(documents):
            writer.write({"__key__": f"{first_document + offset:010d}", MEMBER_SUFFIX[1:]: tokens.tobytes()})
    data = buffer.getvalue()
    temporary = path.with_name(path.name + ".partial")
    try:
        temporary.write_bytes(data)
        temporary.replace(path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
    return ShardInfo(
        file=path.name,
        documents=len(documents),
        tokens=int(sum(len(d) for d in documents)),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        max_id=max((int(d.max()) for d in documents if len(d)), default=0),
    )


def read_shard(url: str, info: ShardInfo, dtype: np.dtype, vocab_size: Optional[int] = None) -> list[np.ndarray]:
    """Every document of a shard, as read-only token arrays; CorruptShardError if it does not match ``info``, and
    ManifestError if a token id is outside ``vocab_size``.

    ``url`` is anything ``webdataset.gopen`` opens: a local path, ``pipe:cmd``, ``http(s)://``.
    """
    from webdataset import gopen
    from webdataset.tariterators import tar_file_iterator

    try:
        with gopen(url, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise CorruptShardError(url, f"cannot be read ({error})") from None
    if len(data) != info.bytes:
        raise CorruptShardError(url, f"{len(data)} bytes, the manifest says {info.bytes} (truncated or replaced?)")
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise CorruptShardError(url, "sha256 differs from the manifest (the file was modified or damaged)")
    documents = []
    try:
        for member in tar_file_iterator(io.BytesIO(data)):
            if not member["fname"].endswith(MEMBER_SUFFIX) or len(member["data"]) % dtype.itemsize:
                raise CorruptShardError(url, f"unexpected member {member['fname']!r} of {len(member['data'])} bytes")
            documents.append(np.frombuffer(member["data"], dtype=dtype))
    except CorruptShardError:
        raise
    except Exception as error:  # tarfile raises several types for damaged archives
        raise CorruptShardError(url, f"not a readable tar file ({type(error).__name__}: {error})") from None
    tokens = sum(len(d) for d in documents)
    if (len(documents), tokens) != (info.documents, info.tokens):
        raise CorruptShardError(
            url, f"{len(documents)} documents / {tokens} tokens, the manifest says {info.documents} / {info.tokens}"
        )
    if vocab_size is not None:
        # One pass of max over the tokens, far cheaper than the sha256 above; an id past the vocabulary would
        # otherwise fail deep inside the embedding lookup.
        top = max((int(d.max()) for d in documents if len(d)), default=0)
        if top >= vocab_size:
            raise ManifestError(f"{url} holds token id {top}, outside the manifest's vocab_size {vocab_size}; the "
                                "manifest does not belong to these shards (prepare them again)")
    return documents


def _preview(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)} files)"
