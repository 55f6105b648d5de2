"""Streaming pretraining data from WebDataset token shards (written by ``prepare``) for the Lightning CLI.

Training stream. Rank ``r`` of ``R`` with DataLoader worker ``w`` of ``W`` (``W = max(1, num_workers)``) is lane
``l = r·W + w`` of ``L = R·W`` lanes, each an independent, endless, seeded stream:

* Shards: pass ``p`` over the ``N`` training shards is a permutation seeded by ``(seed, p)``; the passes are chained
  into one endless sequence and lane ``l`` reads its elements ``l, l + L, l + 2L, ...``. Within a pass every shard
  is read by exactly one lane, so ranks and workers never read the same documents at the same time, and every shard
  is read once per pass (shards are resampled endlessly, but without replacement within a pass). Needs ``N >= L``.
* Documents go through a shuffle buffer of ``shuffle_buffer`` documents (seeded by ``(seed, lane)``), are
  concatenated (each ends with EOS) and cut into consecutive ``seq_len + 1`` windows; ``batch_size`` windows make a
  batch, built in the worker (the DataLoader has ``batch_size=None``): ``input_ids = w[:-1]``, ``labels = w[1:]``,
  int64 ``(batch_size, seq_len)``.
* The stream never ends, so every rank yields a batch for every step the Trainer asks for (``max_steps``): no rank
  runs dry and DDP cannot hang on unequal batch counts. Rank and world size come from the Trainer in ``setup()``
  and travel inside the dataset to the workers (never read from environment variables there).

Validation: the validation shards in manifest order, concatenated and cut into ``seq_len + 1`` windows, no
shuffling; the first ``val_batches × batch_size × world_size`` windows (all complete ones if ``val_batches`` is
None) are dealt out batch by batch to the ranks, so each rank runs the same number of batches and the set is
identical on every run.

Exact resume: the DataLoader takes batches from its workers in strict rotation, so after ``C`` training batches
worker ``w`` has delivered ``len(range(w, C, W))`` of them. ``state_dict()`` saves ``C`` (counted in
``on_before_batch_transfer`` when the training loop takes a batch, not when workers prefetch it) and the layout it
is valid for; on resume each lane regenerates its deterministic stream and skips what it had delivered, and the
workers are renumbered so the rotation continues where it stopped. Skipping replays the lane's reading (every
shard it read is read again), so resuming costs re-reading the data consumed so far, split over all lanes. If the
layout changed (world size, workers, batch size, sequence length, seed, shuffle buffer or the shard list), the
resume cannot be exact: a warning says so and training continues on a fresh stream seeded by the resume step.

Corrupt shards (size or sha256 not as in the manifest, or an unreadable tar): ``on_corrupt="skip"`` warns, skips
the shard for the rest of the run and counts it (``train/data/corrupt_shards`` in TensorBoard, summed over ranks);
``on_corrupt="error"`` stops with an error naming the shard. If every training shard is corrupt the stream stops
with an error rather than spinning.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import random
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional

import braceexpand
import lightning.pytorch as pl
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset

from lit_overtok.data.encoding import vocabulary_size
from lit_overtok.data.lanes import current_lane
from lit_overtok.data.shards import (
    MANIFEST_NAME,
    CorruptShardError,
    Manifest,
    ManifestError,
    ShardInfo,
    file_sha256,
    read_shard,
)

# Each training batch carries its lane's running count of skipped corrupt shards; the DataModule pops it.
CORRUPT_KEY = "corrupt_shards"


class CorruptShardWarning(UserWarning):
    pass


@dataclass(frozen=True)
class ShardSet:
    """Shards of one split, resolved to openable URLs, with their manifest entries."""

    manifest: Manifest
    urls: tuple[str, ...]
    infos: tuple[ShardInfo, ...]


def resolve_shards(spec: str, split: str, manifest: Optional[str] = None) -> ShardSet:
    """A directory written by ``prepare`` (its ``split`` shards), or a glob / brace pattern / URL list of shards.

    The manifest is ``manifest`` if given, else ``manifest.json`` in the directory of the (first) shard. Every shard
    must be listed in it under ``split``.
    """
    option = {"train": "data.train_shards", "validation": "data.val_shards", "test": "data.test_shards"}[split]
    root = Path(spec)
    if root.is_dir():
        loaded = Manifest.load(manifest or root / MANIFEST_NAME)
        infos = loaded.splits.get(split, ())
        if not infos:
            raise ManifestError(f"{option}: {loaded.path} lists no {split!r} shards (splits: {sorted(loaded.splits)}); "
                                f"write them by running its `python -m lit_overtok.data.prepare` command again with "
                                f"--{split} FILES --overwrite, or give {option} shards that have them")
        return ShardSet(loaded, tuple(str(root / info.file) for info in infos), tuple(infos))
    urls: list[str] = []
    for pattern in braceexpand.braceexpand(spec):
        if _is_url(pattern):
            urls.append(pattern)
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ManifestError(f"{option}: no shard matches {pattern!r}")
            urls += matches
        elif Path(pattern).is_file():
            urls.append(pattern)
        else:
            raise ManifestError(
                f"{option}: {pattern} is neither a directory of prepared shards nor a shard file; write shards with "
                "`python -m lit_overtok.data.prepare` (docs/data.md)"
            )
    if len(set(urls)) != len(urls):
        raise ManifestError(f"{option}: {spec!r} names some shards more than once")
    if manifest is None:
        if _is_url(urls[0]):
            raise ManifestError(f"{option}: shards given as URLs ({urls[0]}); give data.manifest as well")
        manifest = str(Path(urls[0]).parent / MANIFEST_NAME)
    loaded = Manifest.load(manifest)
    infos = tuple(loaded.shard(_file_name(url)) for url in urls)
    for url, info in zip(urls, infos):
        if loaded.split_of(info.file) != split:
            raise ManifestError(f"{option}: {url} belongs to the {loaded.split_of(info.file)!r} split, not {split!r}")
    return ShardSet(loaded, tuple(urls), infos)


def _is_url(spec: str) -> bool:
    """``pipe:...``, ``http://...``, ``s3://...``: anything webdataset.gopen opens that is not a local path."""
    scheme = spec.split("/", 1)[0]
    return ":" in scheme and len(scheme.split(":", 1)[0]) > 1  # not a Windows drive letter


def _file_name(url: str) -> str:
    # For "pipe:cmd ... path" the shard is the last word of the command.
    return Path(url.split()[-1] if url.startswith("pipe:") else url).name


class _CorruptShards:
    """Applies the ``on_corrupt`` policy and remembers what was skipped."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.skipped: set[str] = set()

    def handle(self, error: CorruptShardError) -> None:
        if self.policy == "error":
            raise CorruptShardError(error.shard, f"{error.reason} (data.on_corrupt=error; set it to skip to go on)")
        self.skipped.add(error.shard)
        warnings.warn(f"{error}; skipping it for the rest of the run (data.on_corrupt=skip)", CorruptShardWarning)


@dataclass(frozen=True)
class ShardStreamLayout:
    """Everything the training stream's content depends on; resume is exact only if it is unchanged."""

    seed: int
    world_size: int
    workers: int
    batch_size: int
    seq_len: int
    shuffle_buffer: int
    shards: str
    """Digest of the training shard list (names and hashes)."""
    restart: Optional[int] = None
    """Training batch at which an inexact resume started a fresh stream (None: the original stream)."""


def lane_shards(n_shards: int, seed: Any, lane: int, lanes: int) -> Iterator[int]:
    """Lane ``lane``'s shard indices: every ``lanes``-th element of endlessly chained seeded permutations."""
    order, current = list(range(n_shards)), None
    for draw in itertools.count(lane, lanes):
        epoch, position = divmod(draw, n_shards)
        if epoch != current:
            order, current = list(range(n_shards)), epoch
            random.Random(f"shards:{seed}:{epoch}").shuffle(order)
        yield order[position]


def shuffled(documents: Iterator[np.ndarray], size: int, rng: random.Random) -> Iterator[np.ndarray]:
    """A shuffle buffer over an endless stream: each new document replaces a random one, which is emitted."""
    buffer: list[np.ndarray] = []
    for document in documents:
        if len(buffer) < size:
            buffer.append(document)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = document
    yield from buffer  # only reached by finite streams (tests)


def packed(documents: Iterator[np.ndarray], batch_tokens: int) -> Iterator[np.ndarray]:
    """The concatenated documents in consecutive pieces of exactly ``batch_tokens`` tokens."""
    pending: list[np.ndarray] = []
    held = 0
    for document in documents:
        pending.append(document)
        held += len(document)
        if held >= batch_tokens:
            flat = np.concatenate(pending)
            full = held // batch_tokens
            for start in range(0, full * batch_tokens, batch_tokens):
                yield flat[start : start + batch_tokens]
            pending, held = [flat[full * batch_tokens :]], held - full * batch_tokens


def as_batch(tokens: np.ndarray, batch_size: int) -> dict[str, torch.Tensor]:
    windows_BW = torch.from_numpy(tokens.astype(np.int64)).view(batch_size, -1)
    return {"input_ids": windows_BW[:, :-1].contiguous(), "labels": windows_BW[:, 1:].contiguous()}


class TrainStream(IterableDataset):
    """Endless training batches for one rank; each DataLoader worker plays one lane (see the module docstring)."""

    def __init__(self, shards: ShardSet, layout: ShardStreamLayout, rank: int, on_corrupt: str, start_batch: int = 0):
        self.shards, self.layout, self.rank, self.on_corrupt = shards, layout, rank, on_corrupt
        self.start_batch = start_batch
        """Batches of this rank already consumed; the DataModule keeps it current so a new iterator continues."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        lane, worker = current_lane(self.rank, self.layout.workers, self.start_batch, type(self).__name__)
        delivered = len(range(worker, self.start_batch, self.layout.workers))  # this lane's batches consumed so far
        batches = self.lane_batches(lane)
        for tokens, corrupt in itertools.islice(batches, delivered, None):
            yield {**as_batch(tokens, self.layout.batch_size), CORRUPT_KEY: torch.tensor(corrupt)}

    def lane_batches(self, lane: int) -> Iterator[tuple[np.ndarray, int]]:
        """(tokens of one batch, corrupt shards skipped so far) for one lane, deterministically."""
        layout = self.layout
        seed = layout.seed if layout.restart is None else f"{layout.seed}:restart{layout.restart}"
        corrupt = _CorruptShards(self.on_corrupt)
        documents = self.lane_documents(lane, seed, corrupt)
        stream = shuffled(documents, layout.shuffle_buffer, random.Random(f"documents:{seed}:{lane}"))
        for tokens in packed(stream, layout.batch_size * (layout.seq_len + 1)):
            yield tokens, len(corrupt.skipped)

    def lane_documents(self, lane: int, seed: Any, corrupt: _CorruptShards) -> Iterator[np.ndarray]:
        urls, infos, dtype = self.shards.urls, self.shards.infos, self.shards.manifest.dtype
        lanes = self.layout.world_size * self.layout.workers
        for index in lane_shards(len(urls), seed, lane, lanes):
            if urls[index] in corrupt.skipped:
                continue
            try:
                documents = read_shard(urls[index], infos[index], dtype, self.shards.manifest.vocab_size)
            except CorruptShardError as error:
                corrupt.handle(error)
                if len(corrupt.skipped) == len(urls):
                    raise ManifestError(f"data.train_shards: every one of the {len(urls)} training shards of "
                                        f"{self.shards.manifest.path} is corrupt ({error}); nothing to train on: "
                                        "prepare the shards again")
                continue
            yield from documents


class WebDatasetDataModule(pl.LightningDataModule):
    """Token shards from ``prepare``: an endless, resumable training stream and a fixed validation set."""

    def __init__(
        self,
        train_shards: str,
        val_shards: Optional[str] = None,
        seq_len: int = 256,
        batch_size: int = 8,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 1234,
        val_batches: Optional[int] = 32,
        tokenizer: Optional[str] = None,
        manifest: Optional[str] = None,
        on_corrupt: Literal["skip", "error"] = "skip",
        allow_tokenizer_change: bool = False,
        test_shards: Optional[str] = None,
    ) -> None:
        """
        Args:
            train_shards: a directory written by ``prepare`` (its train split), or shard files as a glob, a brace
                pattern (``dir/train-{000000..000031}.tar``), or URLs (``pipe:``, ``http://``; then give
                ``manifest``).
            val_shards: the same for validation; None: the validation split of the ``train_shards`` directory.
            seq_len: tokens per training row (windows of ``seq_len + 1`` are cut, then shifted into inputs/labels).
            batch_size: rows per batch, per rank.
            num_workers: DataLoader worker processes per rank (0: read in the training process).
            shuffle_buffer: documents in each lane's shuffle buffer (1: no shuffling).
            seed: seeds the shard order and the shuffle buffers.
            val_batches: validation batches per rank (None: all complete batches in the validation shards).
            tokenizer: path of the tokenizer the run uses; refused unless its sha256 matches the manifest's.
            manifest: the manifest, when it is not ``manifest.json`` beside the shards.
            on_corrupt: ``skip`` a corrupt shard with a warning and a count in TensorBoard, or stop with an ``error``.
            allow_tokenizer_change: resume a checkpoint trained on data of another tokenizer (with a warning)
                instead of stopping; the model's token ids then mean other strings.
            test_shards: the held-out set of ``train.py test`` (``prepare --test``), given like ``val_shards``; None:
                the test split of the ``train_shards`` directory. Every complete batch is scored.
        """
        super().__init__()
        for name, value in {"seq_len": seq_len, "batch_size": batch_size, "shuffle_buffer": shuffle_buffer}.items():
            if value <= 0:
                raise ValueError(f"WebDatasetDataModule: {name} must be a positive integer, got {value}")
        if num_workers < 0:
            raise ValueError(f"WebDatasetDataModule: num_workers must be >= 0, got {num_workers}")
        if val_batches is not None and val_batches <= 0:
            raise ValueError(f"WebDatasetDataModule: val_batches must be positive or null (all), got {val_batches}")
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"WebDatasetDataModule: on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        self.save_hyperparameters()
        self.train_set = resolve_shards(train_shards, "train", manifest)
        if val_shards is None and not Path(train_shards).is_dir():
            raise ValueError("WebDatasetDataModule: give data.val_shards (data.train_shards is not a directory)")
        self.val_set = resolve_shards(val_shards or train_shards, "validation", manifest)
        first, second = self.train_set.manifest, self.val_set.manifest
        if first.compatibility() != second.compatibility():
            raise ManifestError(
                f"training manifest {first.path} and validation manifest {second.path} disagree on the tokenizer, "
                "vocabulary, EOS or dtype; prepare both splits with the same tokenizer"
            )
        if tokenizer is not None:
            if not Path(tokenizer).is_file():
                raise ManifestError(f"data.tokenizer: {tokenizer} does not exist")
            digest = file_sha256(tokenizer)
            if digest != first.tokenizer_sha256:
                raise ManifestError(
                    f"data.tokenizer {tokenizer} (sha256 {digest[:12]}…) is not the tokenizer the shards were made "
                    f"with (sha256 {first.tokenizer_sha256[:12]}…, {first.directory / first.tokenizer_file}); "
                    "use that file or prepare the shards again with this tokenizer"
                )
        check_tokenizer_size(first)
        self.vocab_size = first.vocab_size
        self.eos_id = first.eos_id
        self.rank, self.world_size = 0, 1
        self._train_batches = 0  # training batches this rank has consumed in the current stream
        self._restart: Optional[int] = None
        self._lane_corrupt: dict[int, int] = {}
        self._val_corrupt = 0
        self._train_stream: Optional[TrainStream] = None
        self._val_batches: Optional[list[dict[str, torch.Tensor]]] = None
        self._test_batches: Optional[list[dict[str, torch.Tensor]]] = None

    @property
    def workers(self) -> int:
        return max(1, self.hparams.num_workers)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.trainer is None:
            return
        self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        lanes = self.world_size * self.workers
        if len(self.train_set.urls) < lanes:
            raise ValueError(
                f"data.train_shards: {len(self.train_set.urls)} shards cannot feed {lanes} readers "
                f"({self.world_size} ranks × {self.workers} workers) without two reading the same data; prepare "
                "more, smaller shards (prepare --shard-tokens) or lower data.num_workers"
            )
        model_cfg = getattr(getattr(self.trainer, "lightning_module", None), "model_config", None)
        model_vocab = getattr(model_cfg, "vocab_size", None)
        if model_vocab is not None and model_vocab != self.vocab_size:
            raise ManifestError(
                f"the model has vocab_size {model_vocab} but the shards in {self.train_set.manifest.path} were made "
                f"with a {self.vocab_size}-token vocabulary; let the CLI link data.vocab_size to the model, or "
                "prepare shards with the model's tokenizer"
            )

    # -------------------------------------------------------------------------------------------- training
    def layout(self) -> ShardStreamLayout:
        digest = hashlib.sha256("".join(f"{i.file}:{i.sha256};" for i in self.train_set.infos).encode()).hexdigest()
        h = self.hparams
        return ShardStreamLayout(h.seed, self.world_size, self.workers, h.batch_size, h.seq_len, h.shuffle_buffer,
                            digest[:16], self._restart)

    def train_dataloader(self) -> DataLoader:
        self._train_stream = TrainStream(self.train_set, self.layout(), self.rank, self.hparams.on_corrupt,
                                         start_batch=self._train_batches)
        # Not persistent: a worker that outlived its iterator would restart its lane from a stale position.
        return DataLoader(self._train_stream, batch_size=None, num_workers=self.hparams.num_workers,
                          persistent_workers=False, pin_memory=torch.cuda.is_available())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called when the training loop takes a batch (after any prefetching), so this counts consumed batches.
        if self.trainer is not None and self.trainer.training and CORRUPT_KEY in batch:
            self._lane_corrupt[self._train_batches % self.workers] = int(batch.pop(CORRUPT_KEY))
            self._train_batches += 1
            if self._train_stream is not None:
                self._train_stream.start_batch = self._train_batches
        return batch

    def training_metrics(self) -> dict[str, float]:
        """Logged by the LightningModule as ``train/<key>``, summed over ranks."""
        return {"data/corrupt_shards": float(sum(self._lane_corrupt.values()) + self._val_corrupt)}

    def tokenizer_record(self) -> dict[str, Any]:
        """The data's tokenizer, saved in checkpoints: its sha256 and, when it sits beside the manifest, its file."""
        manifest = self.train_set.manifest
        file = manifest.directory / manifest.tokenizer_file
        return {"sha256": manifest.tokenizer_sha256, "file": str(file.resolve()) if file.is_file() else None,
                "manifest": str(manifest.path.resolve()), "vocab_size": manifest.vocab_size}

    def state_dict(self) -> dict[str, Any]:
        return {"train_batches": self._train_batches, "layout": asdict(self.layout()),
                "tokenizer": self.tokenizer_record()}

    def check_resume_tokenizer(self, saved_tokenizer: Optional[dict[str, Any]]) -> None:
        """Refuse (ManifestError) to resume a checkpoint trained on data of another tokenizer, unless allowed.

        Called by the CLI before anything is written, and again when the state is loaded."""
        ours = self.tokenizer_record()
        if saved_tokenizer is None or saved_tokenizer["sha256"] == ours["sha256"]:
            return
        message = (f"the checkpoint was trained on data tokenized by {saved_tokenizer['file'] or 'a tokenizer'} "
                   f"(sha256 {saved_tokenizer['sha256'][:12]}…), but {self.train_set.manifest.path} was made with "
                   f"{ours['file'] or 'another'} (sha256 {ours['sha256'][:12]}…)")
        if not self.hparams.allow_tokenizer_change:
            raise ManifestError(f"{message}; resume on data of the same tokenizer, or set "
                                "data.allow_tokenizer_change: true to continue anyway")
        warnings.warn(f"{message}; continuing (data.allow_tokenizer_change)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_resume_tokenizer(state.get("tokenizer"))
        saved = ShardStreamLayout(**state["layout"])
        if replace(saved, restart=None) == self.layout():
            self._restart, self._train_batches = saved.restart, state["train_batches"]
            return
        changed = [k for k, v in asdict(saved).items() if k != "restart" and getattr(self.layout(), k) != v]
        restart = state["train_batches"] + (saved.restart or 0)
        warnings.warn(
            f"WebDatasetDataModule: cannot resume the data stream exactly, {changed} changed since the checkpoint; "
            f"continuing on a fresh stream seeded by the resume point (batch {restart})"
        )
        self._restart, self._train_batches = restart, 0

    # ---------------------------------------------------------------------------------- validation and test
    def val_dataloader(self) -> DataLoader:
        if self._val_batches is None:
            self._val_batches, self._val_corrupt = self._fixed_batches(self.val_set, self.hparams.val_batches, "val_shards")
        return DataLoader(_FixedBatches(self._val_batches), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        if self._test_batches is None:
            h = self.hparams
            if h.test_shards is None and not Path(h.train_shards).is_dir():
                raise ValueError("WebDatasetDataModule: give data.test_shards (data.train_shards is not a directory)")
            test_set = resolve_shards(h.test_shards or h.train_shards, "test", h.manifest)
            if test_set.manifest.compatibility() != self.train_set.manifest.compatibility():
                raise ManifestError(f"test manifest {test_set.manifest.path} and training manifest "
                                    f"{self.train_set.manifest.path} disagree on the tokenizer, vocabulary, EOS or dtype")
            self._test_batches, _ = self._fixed_batches(test_set, None, "test_shards")
        return DataLoader(_FixedBatches(self._test_batches), batch_size=None)

    def _fixed_batches(self, shard_set: ShardSet, max_batches: Optional[int],
                       option: str) -> tuple[list[dict[str, torch.Tensor]], int]:
        """This rank's batches of a fixed set (validation, test) and the corrupt shards skipped reading it."""
        h = self.hparams
        window, group = h.seq_len + 1, h.batch_size * self.world_size
        wanted = None if max_batches is None else max_batches * group * window
        corrupt = _CorruptShards(h.on_corrupt)
        pieces, held = [], 0
        for url, info in zip(shard_set.urls, shard_set.infos):
            if wanted is not None and held >= wanted:
                break
            try:
                documents = read_shard(url, info, shard_set.manifest.dtype, shard_set.manifest.vocab_size)
            except CorruptShardError as error:
                corrupt.handle(error)
                continue
            pieces += documents
            held += info.tokens
        per_rank = (held // window) // group
        if max_batches is not None:
            per_rank = min(per_rank, max_batches)
        if per_rank == 0:
            raise ValueError(
                f"data.{option}: {held} readable tokens are fewer than one batch per rank "
                f"({h.batch_size} rows × {window} tokens × {self.world_size} ranks); lower data.batch_size or "
                "data.seq_len, or prepare more text for this split"
            )
        if max_batches is not None and per_rank < max_batches:
            warnings.warn(f"data.val_batches={max_batches} but the validation shards fill only {per_rank} per rank")
        flat = np.concatenate(pieces)[: per_rank * group * window]
        batches = [as_batch(tokens, h.batch_size) for tokens in np.split(flat, per_rank * self.world_size)]
        return batches[self.rank :: self.world_size], len(corrupt.skipped)


def check_tokenizer_size(manifest: Manifest) -> None:
    """The manifest's vocab_size must be its tokenizer's (one more than the largest id): a larger one would silently
    train a bigger model, a smaller one fail inside the embedding."""
    path = manifest.directory / manifest.tokenizer_file
    if not path.is_file():
        return  # shards copied without their tokenizer: the token ids are still checked against vocab_size
    try:
        size = vocabulary_size(Tokenizer.from_file(str(path)))
    except Exception as error:
        raise ManifestError(f"{path} (the manifest's tokenizer) cannot be read ({error})") from None
    if size != manifest.vocab_size:
        raise ManifestError(f"{manifest.path}: vocab_size {manifest.vocab_size} is not the size of its tokenizer "
                            f"{path} ({size} ids); the manifest was edited or belongs to other shards (prepare them "
                            "again)")


class _FixedBatches(IterableDataset):
    """Ready-made batches. Iterable, so no Trainer setting can wrap it in a second DistributedSampler."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)
