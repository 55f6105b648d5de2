"""Lightning DataModule over a synthetic CFG (see ``grammar.py``): packed training batches, a fixed validation set.

Conventions (ours; the official release fixes no packing, see ``grammars/ATTRIBUTION.md``):

* Every sentence ``s`` is written as the document ``BOS s EOS``, with ``BOS = 0`` and
  ``EOS = T + 1`` (4 for cfg3f).
* Training (``cfg_stream``): documents are concatenated into one endless stream per (rank, worker) lane and cut
  into consecutive windows of ``seq_len + 1`` tokens; ``input_ids = w[:-1]`` and ``labels = w[1:]``, both int64
  of shape (batch_size, seq_len). There is no padding, and a document may span two windows. By default sentences
  are always fresh samples; with ``train_sentences=N`` they come from a fixed set of N sentences read in a new
  seeded order every epoch (the paper's 20M sentences × 10 epochs, docs/method.md §5), and ``train/epoch`` (epochs of
  that set read so far, summed over ranks) is logged. Reproducible for a fixed seed and layout.
* Exact resume: checkpoints keep each lane's state after the last batch the training loop took (and the number of
  batches taken); resuming with ``ckpt_path`` gives exactly the batches an uninterrupted run would have seen, in
  both modes, with the same world size and ``num_workers`` (``batch_size`` and ``seq_len`` may change: the lanes'
  token streams go on). Under DDP ``state_dict()`` gathers the lanes of every rank, so it must be called on every
  rank, as Lightning's checkpointing does. With another world size, worker count, seed, grammar or
  ``train_sentences`` a warning says so and training goes on with new streams (fixed mode: the same set, from
  the position in the chained epochs where the run stopped).
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
import warnings
from dataclasses import asdict, replace
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lit_overtok.data.cfg_stream import (MAX_TRAIN_SENTENCES, STATE_KEY, LaneState, PackedSentenceStream,
                                         SentenceStreamLayout)
from lit_overtok.data.grammar import Grammar
from lit_overtok.nn.losses import IGNORE_INDEX

_VALIDATION_SEED_OFFSET = 1_000_003
_TEST_SEED_OFFSET = 2_000_003


class CFGDataModule(pl.LightningDataModule):
    """Packed language-modelling batches of CFG sentences (fresh, or a fixed set over epochs), a fixed validation set."""

    def __init__(
        self,
        grammar: str = "cfg3f",
        seq_len: int = 256,
        batch_size: int = 8,
        seed: int = 1234,
        val_sentences: int = 256,
        num_workers: int = 0,
        train_sentences: Optional[int] = None,
        test_sentences: int = 256,
    ) -> None:
        """
        Args:
            grammar: a packaged grammar name (``cfg3f``) or the path of a grammar JSON file.
            seq_len: tokens per training row (windows of ``seq_len + 1`` are cut, then shifted into inputs/labels).
            batch_size: rows per batch, per rank.
            seed: seeds the training sentences (and their epoch orders) and, offset, the validation set.
            val_sentences: validation documents, one per row.
            num_workers: DataLoader worker processes per rank (0: sample in the training process).
            train_sentences: None: fresh sentences forever. N: a fixed training set of N sentences, sampled once
                (seeded) and read in a new order each epoch; ``trainer.max_steps`` sets how many epochs.
            test_sentences: held-out documents for ``train.py test``, one per row, from their own seed.
        """
        super().__init__()
        sizes = {"seq_len": seq_len, "batch_size": batch_size, "val_sentences": val_sentences,
                 "test_sentences": test_sentences}
        for field, value in sizes.items():
            if value <= 0:
                raise ValueError(f"CFGDataModule: {field} must be a positive integer, got {value}")
        if num_workers < 0:
            raise ValueError(f"CFGDataModule: num_workers must be >= 0, got {num_workers}")
        if train_sentences is not None and not 0 < train_sentences < MAX_TRAIN_SENTENCES:
            raise ValueError(f"CFGDataModule: train_sentences must be null (fresh sentences) or a positive integer "
                             f"below 2^32, got {train_sentences}")
        self.save_hyperparameters()
        self.grammar = Grammar.load(grammar)
        self.vocab_size = self.grammar.vocab_size
        self.bos_id = self.grammar.bos_id
        self.eos_id = self.grammar.eos_id
        self.rank, self.world_size = 0, 1
        self._fixed_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # validation, test
        self._train_batches = 0  # training batches this rank has consumed since the streams started
        self._lane_states: dict[int, LaneState] = {}  # after the last consumed batch of each of this rank's lanes
        self._restart: Optional[int] = None
        self._base = 0
        self._train_stream: Optional[PackedSentenceStream] = None

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size

    # -------------------------------------------------------------------------------------------- training
    @property
    def workers(self) -> int:
        return max(1, self.hparams.num_workers)

    def layout(self) -> SentenceStreamLayout:
        h = self.hparams
        return SentenceStreamLayout(str(h.grammar), h.seed, h.train_sentences, self.world_size, self.workers,
                            self._restart, self._base)

    def train_dataloader(self) -> DataLoader:
        self._train_stream = PackedSentenceStream(
            self.grammar, self.layout(), self.rank, self.hparams.seq_len, self.hparams.batch_size,
            dict(self._lane_states), self._train_batches,
        )
        # The dataset yields whole batches, so the loader must not batch again. Not persistent: a worker that
        # outlived its iterator would continue its lane from a stale position.
        return DataLoader(self._train_stream, batch_size=None, num_workers=self.hparams.num_workers)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called when the training loop takes a batch (after any prefetching), so this records consumed batches.
        state = batch.pop(STATE_KEY, None) if isinstance(batch, dict) else None
        if state is not None and self.trainer is not None and self.trainer.training:
            lane_state = LaneState.from_tensors(state)
            self._lane_states[lane_state.lane] = lane_state
            self._train_batches += 1
            if self._train_stream is not None:
                self._train_stream.lane_states[lane_state.lane] = lane_state
                self._train_stream.start_batch = self._train_batches
        return batch

    def training_metrics(self) -> dict[str, float]:
        """Fixed mode: ``epoch``, this rank's share of the epochs read (logged as ``train/epoch``, summed over
        ranks: sentences begun / N, counting from the run's start)."""
        size = self.hparams.train_sentences
        if size is None:
            return {}
        drawn = sum(state.draws for state in self._lane_states.values()) + self._base / self.world_size
        return {"epoch": drawn / size}

    def state_dict(self) -> dict[str, Any]:
        lanes = [asdict(state) for state in self._lane_states.values()]
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, lanes)  # every rank's lanes in the one checkpoint
            lanes = [lane for rank_lanes in gathered for lane in rank_lanes]
        return {"train_batches": self._train_batches, "layout": asdict(self.layout()), "lanes": lanes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = SentenceStreamLayout(**state["layout"])
        lanes = [LaneState(**lane) for lane in state["lanes"]]
        if replace(saved, restart=None, base=0) == replace(self.layout(), restart=None, base=0):
            self._restart, self._base, self._train_batches = saved.restart, saved.base, state["train_batches"]
            first = self.rank * self.workers
            self._lane_states = {s.lane: s for s in lanes if first <= s.lane < first + self.workers}
            return
        changed = [k for k, v in asdict(saved).items()
                   if k not in ("restart", "base") and getattr(self.layout(), k) != v]
        restart = state["train_batches"] + (saved.restart or 0)
        # The fixed set is the same if its seed and size are: go on from the run's place in its chained epochs.
        same_set = saved.train_sentences is not None and (saved.train_sentences, saved.seed) == (
            self.hparams.train_sentences, self.hparams.seed)
        warnings.warn(
            f"CFGDataModule: cannot resume the sentence streams exactly, {changed} changed since the checkpoint; "
            f"continuing on new streams from training batch {restart}"
            + (", at the same place in the fixed training set's epochs" if same_set else "")
        )
        self._restart, self._train_batches, self._lane_states = restart, 0, {}
        self._base = saved.base + sum(lane.draws for lane in lanes) if same_set else 0

    # ------------------------------------------------------------------------------------------ validation
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


class _Rows(Dataset):
    def __init__(self, input_ids_NT: torch.Tensor, labels_NT: torch.Tensor) -> None:
        self.input_ids_NT, self.labels_NT = input_ids_NT, labels_NT

    def __len__(self) -> int:
        return self.input_ids_NT.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids_NT[index], "labels": self.labels_NT[index]}
