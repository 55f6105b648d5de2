"""Reading text inputs for ``prepare``: plain text, JSON lines and Parquet, optionally gzip/xz/zstd compressed.

Every reader yields a file's non-empty documents in file order and reports progress in bytes of the file consumed;
a missing file, an unknown format, a missing field, text that is not UTF-8 or a file without documents is a
PrepareError naming the file.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import lzma
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Optional

import zstandard

from lit_overtok.errors import InputError

DECOMPRESSORS = {
    ".gz": lambda raw: gzip.GzipFile(fileobj=raw),
    ".xz": lambda raw: lzma.LZMAFile(raw),
    ".zst": lambda raw: zstandard.ZstdDecompressor().stream_reader(raw),
}
FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
           ".parquet": "parquet"}
TEXT_UNITS = ("file", "line", "paragraph")


class PrepareError(InputError):
    """Bad input or options; the message names the file or option and what would be valid."""


def expand_inputs(patterns: Iterable[str], option: str) -> list[Path]:
    """Files in the given order; a glob expands to its sorted matches. Missing files are errors."""
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise PrepareError(f"{option}: no file matches {pattern!r}")
            files += [Path(m) for m in matches]
        else:
            files.append(Path(pattern))
    for path in files:
        if path.is_dir():
            raise PrepareError(f"{option}: {path} is a directory; give files or a glob such as '{path}/*.jsonl.xz'")
        if not path.is_file():
            raise PrepareError(f"{option}: input file {path} does not exist")
    return files


def input_format(path: Path, forced: Optional[str]) -> str:
    if forced is not None:
        return forced
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in DECOMPRESSORS:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise PrepareError(
            f"cannot tell the format of {path} from its name; use one of the extensions {sorted(FORMATS)} "
            f"(optionally + {sorted(DECOMPRESSORS)}) or give --format text|jsonl|parquet"
        )
    return fmt


def read_documents(path: Path, fmt: str, text_field: str, text_unit: str,
                   progress: Callable[[int], None] = lambda n: None, encoding_errors: str = "strict") -> Iterator[str]:
    """The non-empty documents of one input file, in file order; ``progress`` gets bytes of the file consumed.

    Raises PrepareError for a missing field, a non-text value, bytes that are not UTF-8 (unless ``encoding_errors``
    is ``replace``: then they become U+FFFD), or a file with no documents.
    """
    count = 0
    if fmt == "parquet":
        documents = _parquet_documents(path, text_field, progress)
    else:
        documents = _stream_documents(path, fmt, text_field, text_unit, progress, encoding_errors)
    try:
        for document in documents:
            if document:
                count += 1
                yield document
    except UnicodeDecodeError as error:
        raise PrepareError(
            f"{path} is not UTF-8 text ({error.reason}: byte {error.object[error.start:error.start + 1]!r} after "
            f"{count} documents); convert it (e.g. iconv -f latin1 -t utf-8) or pass --encoding-errors replace"
        ) from None
    except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as error:
        raise PrepareError(f"input {path} cannot be read as {fmt} ({type(error).__name__}: {error})") from None
    if count == 0:
        raise PrepareError(f"input {path} contains no documents (it is empty or every document is empty)")


def _stream_documents(path, fmt, text_field, text_unit, progress, encoding_errors) -> Iterator[str]:
    with open(path, "rb") as raw:
        position = 0

        def report() -> None:
            nonlocal position
            now = raw.tell()
            progress(now - position)
            position = now

        decompress = DECOMPRESSORS.get(path.suffix)
        with io.TextIOWrapper(decompress(raw) if decompress else raw, encoding="utf-8", errors=encoding_errors) as text:
            if fmt == "jsonl":
                for number, line in enumerate(text, start=1):
                    if line.strip():
                        yield _json_field(line, path, number, text_field)
                    if number % 256 == 0:
                        report()
            elif text_unit == "file":
                yield text.read()
            elif text_unit == "line":
                for number, line in enumerate(text, start=1):
                    yield line.strip()
                    if number % 256 == 0:
                        report()
            else:
                paragraph: list[str] = []
                for line in itertools.chain(text, [""]):
                    if line.strip():
                        paragraph.append(line)
                    elif paragraph:
                        yield "".join(paragraph).strip()
                        paragraph = []
                        report()
            report()


def _json_field(line: str, path: Path, number: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise PrepareError(f"{path} line {number}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise PrepareError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise PrepareError(
            f"{path} line {number}: no field {text_field!r}; the record has fields {sorted(record)}; "
            "choose the text field with --field"
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise PrepareError(f"{path} line {number}: field {text_field!r} holds {type(value).__name__}, not text")
    return value


def _parquet_documents(path: Path, text_field: str, progress) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise PrepareError(f"{path}: no column {text_field!r}; the columns are {names}; choose one with --field")
    column_type = parquet.schema_arrow.field(text_field).type
    if str(column_type) not in ("string", "large_string"):
        raise PrepareError(f"{path}: column {text_field!r} has type {column_type}, not text")
    size, rows, reported = path.stat().st_size, max(1, parquet.metadata.num_rows), 0
    done = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        yield from (value for value in batch.column(0).to_pylist() if value)
        done += batch.num_rows
        position = size * done // rows
        progress(position - reported)
        reported = position
