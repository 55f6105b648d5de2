"""Lightning DataModule that streams sentences from a synthetic CFG (see ``grammar.py``).

Conventions (ours; the official release fixes no packing, see ``grammars/ATTRIBUTION.md``):

* Every sentence ``s`` is written as the document ``BOS s EOS``, with ``BOS = 0`` and
  ``EOS = T + 1`` (4 for cfg3f).
* Training: documents are concatenated into one endless stream and cut into consecutive windows
  of ``seq_len + 1`` tokens; ``input_ids = w[:-1]`` and ``labels = w[1:]``, both int64 of shape
  (batch_size, seq_len). There is no padding, and a document may span two windows. Sentences
  are always fresh samples. Each (rank, worker) pair draws from its own ``random.Random``,
  seeded from ``(seed, rank, worker id)``, so the stream is reproducible for a fixed seed and
  layout.
* Validation: ``val_sentences`` sentences from a separate seed (``seed + 1_000_003``), one
  document per row, truncated to ``seq_len + 1`` tokens or padded with EOS. Labels at padding
  positions are -100. The set is the same on every run and every call. With several ranks, the
  rows are repeated up to a multiple of the world size and rank r takes rows r, r + world, ...,
  so all ranks run the same number of batches. Because this module shards validation itself,
  the Trainer must not add a DistributedSampler (``use_distributed_sampler=False``).
* Test (``train.py test``): ``test_sentences`` more sentences built like validation from a third
  seed (``seed + 2_000_003``), held out from model selection.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lit_overtok.data.grammar import Grammar
from lit_overtok.nn.losses import IGNORE_INDEX

_VALIDATION_SEED_OFFSET = 1_000_003
_TEST_SEED_OFFSET = 2_000_003


class CFGDataModule(pl.LightningDataModule):
    """Packed language-modelling batches of fresh CFG sentences, plus a fixed validation set."""

    def __init__(
        self,
        grammar: str = "cfg3f",
        seq_len: int = 256,
        batch_size: int = 8,
        seed: int = 1234,
        val_sentences: int = 256,
        num_workers: int = 0,
        test_sentences: int = 256,
    ) -> None:
        super().__init__()
        sizes = {"seq_len": seq_len, "batch_size": batch_size, "val_sentences": val_sentences,
                 "test_sentences": test_sentences}
        for field, value in sizes.items():
            if value <= 0:
                raise ValueError(f"CFGDataModule: {field} must be a positive integer, got {value}")
        if num_workers < 0:
            raise ValueError(f"CFGDataModule: num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.grammar = Grammar.load(grammar)
        self.vocab_size = self.grammar.vocab_size
        self.bos_id = self.grammar.bos_id
        self.eos_id = self.grammar.eos_id
        self.rank, self.world_size = 0, 1
        self._fixed_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        stream = _PackedSentenceStream(
            self.grammar, self.hparams.seq_len, self.hparams.batch_size, self.hparams.seed, self.rank
        )
        # The dataset yields whole batches, so the loader must not batch again.
        return DataLoader(stream, batch_size=None, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("validation", self.hparams.val_sentences, _VALIDATION_SEED_OFFSET)

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test", self.hparams.test_sentences, _TEST_SEED_OFFSET)

    def _fixed_loader(self, split: str, count: int, seed_offset: int) -> DataLoader:
        if split not in self._fixed_sets:
            self._fixed_sets[split] = self._fixed_rows(count, seed_offset)
        input_ids_VT, labels_VT = self._fixed_sets[split]
        padded = -(-count // self.world_size) * self.world_size
        rows = (torch.arange(padded) % count)[self.rank :: self.world_size]
        dataset = _Rows(input_ids_VT[rows], labels_VT[rows])
        return DataLoader(
            dataset, batch_size=self.hparams.batch_size, shuffle=False, num_workers=self.hparams.num_workers
        )

    def _fixed_rows(self, count: int, seed_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), each (count, seq_len): one padded document per row."""
        rng = random.Random(self.hparams.seed + seed_offset)
        width = self.hparams.seq_len + 1
        rows_VW = torch.full((count, width), self.eos_id, dtype=torch.long)
        lengths = []
        for row_W in rows_VW:
            document = [self.bos_id, *self.grammar.sample(rng), self.eos_id][:width]
            row_W[: len(document)] = torch.tensor(document)
            lengths.append(len(document))
        labels_VT = rows_VW[:, 1:].clone()
        # Label t is token t+1, which is padding once t+1 reaches the document length.
        is_padding_VT = torch.arange(width - 1) >= torch.tensor(lengths)[:, None] - 1
        labels_VT[is_padding_VT] = IGNORE_INDEX
        return rows_VW[:, :-1].clone(), labels_VT


class _PackedSentenceStream(IterableDataset):
    """Endless batches of consecutive ``seq_len + 1`` windows over ``BOS s EOS`` documents."""

    def __init__(self, grammar: Grammar, seq_len: int, batch_size: int, seed: int, rank: int) -> None:
        self.grammar, self.seq_len, self.batch_size = grammar, seq_len, batch_size
        self.seed, self.rank = seed, rank

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        # A string seed is hashed with SHA-512 by random.Random, so it is stable across runs.
        rng = random.Random(f"cfg-train:{self.seed}:{self.rank}:{worker_id}")
        window = self.seq_len + 1
        needed = self.batch_size * window
        bos, eos = self.grammar.bos_id, self.grammar.eos_id
        stream: list[int] = []
        while True:
            while len(stream) < needed:
                stream.append(bos)
                stream.extend(self.grammar.sample(rng))
                stream.append(eos)
            windows_BW = torch.tensor(stream[:needed], dtype=torch.long).view(self.batch_size, window)
            del stream[:needed]
            yield {"input_ids": windows_BW[:, :-1].contiguous(), "labels": windows_BW[:, 1:].contiguous()}


class _Rows(Dataset):
    def __init__(self, input_ids_NT: torch.Tensor, labels_NT: torch.Tensor) -> None:
        self.input_ids_NT, self.labels_NT = input_ids_NT, labels_NT

    def __len__(self) -> int:
        return self.input_ids_NT.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids_NT[index], "labels": self.labels_NT[index]}
