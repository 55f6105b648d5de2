"""Turn text into WebDataset token shards: ``python -m lit_overtok.data.prepare`` (console script
``lit-overtok-prepare``).

    python -m lit_overtok.data.prepare --output data/wiki_bpe8k --vocab-size 8192 \\
        --train '../shared/data/wikipedia_en_2015/train-*.jsonl.xz' \\
        --validation ../shared/data/wikipedia_en_2015/validation.jsonl.xz

Inputs: plain text (``.txt``), JSON lines (``.jsonl``/``.json``/``.ndjson``, the text in ``--field``), optionally
compressed with gzip, xz or zstd (``.gz``/``.xz``/``.zst``), and Parquet (``--field`` names the column). Globs are
expanded (sorted); files are read in the order given (readers in ``text_inputs.py``).

Tokenizer: a ``tokenizers`` JSON file (``--tokenizer``), or a byte-level BPE of ``--vocab-size`` entries trained
first on the start of the training inputs (``--tokenizer-train-mb``), for CPU-sized models where a 50k vocabulary
would dominate the parameters and the compute. Either way the tokenizer is copied beside the shards and its sha256
goes into the manifest, which the data module checks.

Each document becomes its token ids followed by EOS (the tokenizer's end-of-text token, or ``--eos-token`` /
``--eos-id``). Documents are packed whole into shards of about ``--shard-tokens`` tokens (see ``shards.py`` for the
format). Tokenization runs in ``--workers`` processes; chunks are written in input order, so the output is
byte-identical for the same inputs and options whatever the number of processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tokenizers import Tokenizer
from tqdm import tqdm

from lit_overtok.data import shards
from lit_overtok.data.encoding import ordered_map, vocabulary_size
from lit_overtok.data.job_split import check_job, job_dir, job_inputs
from lit_overtok.data.shard_writer import (PROGRESS_NAME, PrepareProgress, ShardWriter, SplitProgress,
                                           write_json_atomically)
from lit_overtok.data.text_inputs import TEXT_UNITS, PrepareError, expand_inputs, input_format, read_documents
from lit_overtok.errors import entry_point

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
TRAINED_EOS = "<|endoftext|>"
# Work units for the tokenizer processes: small enough to keep every process busy, large enough to amortize IPC.
CHUNK_CHARS = 1 << 20
CHUNK_DOCUMENTS = 512


@dataclass
class PrepareConfig:
    output: Path
    train: list[str]
    validation: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    field: str = "text"
    format: Optional[str] = None
    """'text', 'jsonl' or 'parquet'; None: from each file's extension."""
    text_unit: str = "file"
    """For plain text: one document per 'file', per 'line', or per blank-line separated 'paragraph'."""
    tokenizer: Optional[str] = None
    vocab_size: Optional[int] = None
    tokenizer_train_mb: float = 64.0
    eos_token: Optional[str] = None
    eos_id: Optional[int] = None
    shard_tokens: int = 1 << 20
    workers: int = max(1, os.cpu_count() or 1)
    encoding_errors: str = "strict"
    """'strict': bytes that are not UTF-8 are an error naming the file; 'replace': they become U+FFFD."""
    overwrite: bool = False
    resume: bool = False
    """Continue an interrupted run in ``output``: keep its complete shards, write the rest."""
    progress: bool = True
    job_index: int = 0
    job_count: int = 1
    """This run is job ``job_index`` of ``job_count`` over the inputs (``prepare_jobs``); 1: all of them."""

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if (self.tokenizer is None) == (self.vocab_size is None):
            raise PrepareError("give exactly one of --tokenizer (a tokenizers JSON file) or --vocab-size (train a BPE)")
        if self.vocab_size is not None and not 256 < self.vocab_size <= 1 << 32:
            raise PrepareError(
                f"--vocab-size must exceed the 256 byte tokens (and fit in uint32), got {self.vocab_size}")
        if self.format not in (None, "text", "jsonl", "parquet"):
            raise PrepareError(f"--format must be text, jsonl or parquet, got {self.format!r}")
        if self.encoding_errors not in ("strict", "replace"):
            raise PrepareError(f"--encoding-errors must be strict or replace, got {self.encoding_errors!r}")
        if self.overwrite and self.resume:
            raise PrepareError("give at most one of --overwrite and --resume")
        if self.text_unit not in TEXT_UNITS:
            raise PrepareError(f"--text-unit must be one of {TEXT_UNITS}, got {self.text_unit!r}")
        if self.eos_token is not None and self.eos_id is not None:
            raise PrepareError("give at most one of --eos-token and --eos-id")
        for name in ("shard_tokens", "workers"):
            if getattr(self, name) <= 0:
                raise PrepareError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.tokenizer_train_mb <= 0:
            raise PrepareError(f"--tokenizer-train-mb must be positive, got {self.tokenizer_train_mb}")
        if not self.train:
            raise PrepareError("--train needs at least one input file")
        check_job(self.job_index, self.job_count)


def iter_chunks(files: list[Path], config: PrepareConfig, progress, totals: dict,
                skip: int = 0) -> Iterator[list[str]]:
    """All documents of the files after the first ``skip``, in order, grouped into work units for the tokenizer
    processes; ``totals["chars"]`` counts the characters read."""
    chunk: list[str] = []
    chars = 0
    documents = itertools.chain.from_iterable(
        read_documents(path, input_format(path, config.format), config.field, config.text_unit, progress,
                       config.encoding_errors) for path in files)
    for document in itertools.islice(documents, skip, None):
        chunk.append(document)
        chars += len(document)
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCUMENTS:
            totals["chars"] += chars
            yield chunk
            chunk, chars = [], 0
    if chunk:
        totals["chars"] += chars
        yield chunk


# ------------------------------------------------------------------------------------------------- tokenizer
def byte_level_bpe() -> Tokenizer:
    """An untrained GPT-2-style byte-level BPE: no prefix space, byte-level decoding, offsets kept."""
    from tokenizers import decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train_bpe(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE (no prefix space) whose id 0 is the end-of-text token."""
    from tokenizers import pre_tokenizers, trainers

    tokenizer = byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TRAINED_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def _first_megabytes(documents: Iterable[str], megabytes: float) -> Iterator[str]:
    budget = int(megabytes * 1e6)
    for document in documents:
        if budget <= 0:
            return
        yield document
        budget -= len(document)


def resolve_eos(tokenizer: Tokenizer, source: str, eos_token: Optional[str], eos_id: Optional[int]) -> int:
    vocab_size = vocabulary_size(tokenizer)
    if eos_id is not None:
        if not 0 <= eos_id < vocab_size:
            raise PrepareError(f"--eos-id {eos_id} is outside the vocabulary of {source} (0..{vocab_size - 1})")
        return eos_id
    candidates = (eos_token,) if eos_token is not None else EOS_CANDIDATES
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise PrepareError(
        f"cannot determine the end-of-text token of {source}: none of {list(candidates)} is in its vocabulary; "
        "give --eos-token TOKEN or --eos-id ID"
    )


# ---------------------------------------------------------------------------------------------------- driver
def _options(config: PrepareConfig, inputs: dict[str, list[Path]]) -> dict[str, Any]:
    """What the output depends on (not the number of workers): a resume must find the same."""
    files = {split: [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths] for split, paths in inputs.items()}
    tokenizer = (["file", shards.file_sha256(config.tokenizer)] if config.tokenizer is not None
                 and Path(config.tokenizer).is_file() else ["trained", config.vocab_size, config.tokenizer_train_mb])
    return {"inputs": files, "tokenizer": tokenizer, "field": config.field, "format": config.format,
            "text_unit": config.text_unit, "eos_token": config.eos_token, "eos_id": config.eos_id,
            "shard_tokens": config.shard_tokens, "encoding_errors": config.encoding_errors}


def _prepare_output(config: PrepareConfig, options: dict[str, Any]) -> PrepareProgress:
    """The progress record to continue: a fresh one, or (``--resume``) the interrupted run's, intact shards only."""
    output = config.output
    if config.resume:
        progress = PrepareProgress.load(output)
        if progress is None:
            finished = (output / shards.MANIFEST_NAME).is_file()
            raise PrepareError(f"--resume: {output} holds " + ("a finished run (manifest.json), nothing to resume"
                               if finished else "no interrupted run (no prepare.progress.json)"))
        progress.check_options(options)
        progress.keep_intact_shards()
        return progress
    ours = [output / shards.MANIFEST_NAME, output / shards.TOKENIZER_NAME, output / PROGRESS_NAME,
            *output.glob("*.tar"), *output.glob("*.partial")]
    existing = [p for p in ours if p.exists()]
    if existing and not config.overwrite:
        interrupted = (output / PROGRESS_NAME).exists()
        raise PrepareError(f"{output} already holds " + ("an interrupted run: continue it with --resume, "
                           if interrupted else f"prepared data ({existing[0].name}, ...); ")
                           + "choose another --output, or pass --overwrite")
    for path in existing:
        path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    return PrepareProgress(output, options)


def _tokenizer(config: PrepareConfig, train_files: list[Path], progress: PrepareProgress) -> tuple[Tokenizer, str]:
    """The tokenizer, copied (or trained on ``train_files`` and saved) into the output; on resume a trained one is
    read back."""
    tokenizer_path = config.output / shards.TOKENIZER_NAME
    if config.tokenizer is not None:
        source = Path(config.tokenizer)
        if not source.is_file():
            raise PrepareError(f"--tokenizer: {source} does not exist (give a tokenizers JSON file, e.g. "
                               "../shared/data/tokenizers/gpt2/tokenizer.json)")
        try:
            tokenizer = Tokenizer.from_file(str(source))
        except Exception as error:
            raise PrepareError(f"--tokenizer: {source} is not a tokenizers JSON file ({error})") from None
        shutil.copyfile(source, tokenizer_path)
        return tokenizer, str(source)
    description = f"byte-level BPE trained on the first {config.tokenizer_train_mb:g} MB of --train"
    trained = progress.options.get("trained_sha256")
    if config.resume and tokenizer_path.is_file() and trained == shards.file_sha256(tokenizer_path):
        return Tokenizer.from_file(str(tokenizer_path)), description
    documents = itertools.chain.from_iterable(
        read_documents(p, input_format(p, config.format), config.field, config.text_unit,
                       encoding_errors=config.encoding_errors) for p in train_files)
    started = time.perf_counter()
    tokenizer = train_bpe(_first_megabytes(documents, config.tokenizer_train_mb), config.vocab_size)
    print(f"trained a {config.vocab_size}-entry byte-level BPE on the first {config.tokenizer_train_mb:g} MB "
          f"of the training text in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    tokenizer.save(str(tokenizer_path))
    progress.options["trained_sha256"] = shards.file_sha256(tokenizer_path)
    return tokenizer, description


def prepare(config: PrepareConfig) -> dict:
    """Write shards, tokenizer and manifest to ``config.output``; returns the manifest plus timing statistics."""
    inputs = {"train": expand_inputs(config.train, "--train"),
              "validation": expand_inputs(config.validation, "--validation"),
              "test": expand_inputs(config.test, "--test")}
    for files in inputs.values():
        for path in files:
            input_format(path, config.format)  # fail on an unknown extension before any work
    all_inputs = inputs
    if config.job_count > 1:  # this job's share, into its own folder (merged by prepare_jobs.merge)
        inputs = job_inputs(all_inputs, config.job_index, config.job_count)
        config = dataclasses.replace(config, output=job_dir(config.output, config.job_index, config.job_count))
    progress = _prepare_output(config, _options(config, inputs))
    # Every job trains the same BPE as a single job would: on the first megabytes of all the training inputs.
    tokenizer, tokenizer_source = _tokenizer(config, all_inputs["train"], progress)
    vocab_size = vocabulary_size(tokenizer)
    eos_id = resolve_eos(tokenizer, tokenizer_source, config.eos_token, config.eos_id)
    dtype = shards.token_dtype(vocab_size)
    progress.save()

    total_bytes = sum(p.stat().st_size for files in inputs.values() for p in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not config.progress)
    started, totals = time.perf_counter(), {"chars": 0}
    for split, files in inputs.items():
        state = progress.splits.setdefault(split, SplitProgress())
        if not files or state.done:
            continue
        writer = ShardWriter(config.output, split, config.shard_tokens, state, on_shard=progress.save)
        chunks = iter_chunks(files, config, bar.update, totals, skip=state.documents)
        for tokens, lengths in ordered_map(chunks, config.workers, (tokenizer.to_str(), eos_id, dtype.str)):
            writer.add(tokens, lengths)
        writer.flush()
        state.done = True
        progress.save()
    bar.close()
    seconds = time.perf_counter() - started
    provenance = {
        "inputs": {split: [str(p) for p in files] for split, files in inputs.items() if files},
        "field": config.field, "text_unit": config.text_unit, "tokenizer_source": tokenizer_source,
        "shard_tokens": config.shard_tokens,
    }
    if config.job_count > 1:
        provenance["job"] = {"index": config.job_index, "count": config.job_count, "all_inputs": {
            split: [str(p) for p in files] for split, files in all_inputs.items() if files}}
    written = {split: state.shards for split, state in progress.splits.items() if inputs[split]}
    manifest = shards.manifest_dict(shards.file_sha256(config.output / shards.TOKENIZER_NAME), vocab_size, eos_id,
                                    written, provenance)
    write_json_atomically(config.output / shards.MANIFEST_NAME, manifest)
    (config.output / PROGRESS_NAME).unlink()
    text_mb = totals["chars"] / 1e6
    stats = {"seconds": seconds, "text_mb": text_mb, "mb_per_s": text_mb / max(seconds, 1e-9),
             "input_mb": total_bytes / 1e6}
    return {"manifest": manifest, "stats": stats, "output": config.output}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-overtok-prepare", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, help="directory for shards, tokenizer.json and manifest.json")
    parser.add_argument("--train", nargs="+", required=True, help="training input files or globs")
    parser.add_argument("--validation", nargs="*", default=[], help="validation input files or globs")
    parser.add_argument("--test", nargs="*", default=[], help="held-out test input files or globs (train.py test)")
    parser.add_argument("--field", default="text", help="JSONL field / Parquet column holding the text")
    parser.add_argument("--format", choices=("text", "jsonl", "parquet"), help="override detection by extension")
    parser.add_argument("--text-unit", choices=TEXT_UNITS, default="file",
                        help="plain text: one document per file, per line, or per blank-line separated paragraph")
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="a tokenizers JSON file, e.g. ../shared/data/tokenizers/gpt2/tokenizer.json")
    tok.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this size on the training text")
    parser.add_argument("--tokenizer-train-mb", type=float, default=64.0,
                        help="MB of training text (from the start of --train) the BPE is trained on")
    parser.add_argument("--eos-token", help=f"end-of-document token (default: the first of {list(EOS_CANDIDATES)} "
                                            "the tokenizer has)")
    parser.add_argument("--eos-id", type=int, help="end-of-document token id")
    parser.add_argument("--shard-tokens", type=int, default=1 << 20,
                        help="a shard closes once it holds this many tokens (documents are never split)")
    parser.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="tokenizer processes")
    parser.add_argument("--encoding-errors", choices=("strict", "replace"), default="strict",
                        help="bytes that are not UTF-8: an error naming the file (strict) or U+FFFD (replace)")
    parser.add_argument("--job-index", type=int, default=0,
                        help="run as job INDEX of --job-count over the inputs (e.g. $SLURM_ARRAY_TASK_ID); then "
                             "python -m lit_overtok.data.prepare_jobs merge --output OUTPUT")
    parser.add_argument("--job-count", type=int, default=1, help="number of jobs the inputs are split over")
    parser.add_argument("--overwrite", action="store_true", help="replace prepared data already in --output")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --output (the same command): keep its complete shards")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Prepare the shards; bad input raises (``run``, the command, makes it one line)."""
    args = build_parser().parse_args(argv)
    try:
        result = prepare(PrepareConfig(**vars(args)))
    except OSError as error:  # an output folder that cannot be written (a full disk...): the user's to fix
        raise PrepareError(str(error)) from error
    except KeyboardInterrupt:
        print(f"lit-overtok-prepare: interrupted; the complete shards in {args.output} are kept: rerun the same "
              "command with --resume to continue", file=sys.stderr)
        sys.exit(130)
    manifest, stats = result["manifest"], result["stats"]
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['documents']} documents, {entry['tokens']} tokens in {len(entry['shards'])} shards")
    print(f"vocab_size {manifest['vocab_size']}, eos_id {manifest['eos_id']}, dtype {manifest['dtype']}; "
          f"{stats['input_mb']:.1f} MB of input files ({stats['text_mb']:.1f} MB of text) in {stats['seconds']:.1f} s = "
          f"{stats['input_mb'] / max(stats['seconds'], 1e-9):.2f} MB/s of input, the progress bar's unit "
          f"-> {result['output']}/{shards.MANIFEST_NAME}")


run = entry_point(main)  # the console script lit-overtok-prepare: bad input is one line, exit status 2 (errors.py)

if __name__ == "__main__":
    run()
