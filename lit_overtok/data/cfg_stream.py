"""The training stream of ``CFGDataModule``: packed ``BOS s EOS`` documents per lane, fresh or from a fixed set.

A *lane* is one (rank, DataLoader worker) pair: rank ``r`` of ``R`` with worker ``w`` of ``W = max(1, workers)`` is
lane ``l = r·W + w`` of ``L = R·W``. Each lane concatenates documents ``BOS s EOS`` into one endless token stream
and cuts it into batches of ``batch_size`` consecutive ``seq_len + 1`` windows.

Where the sentences come from:

* fresh (``train_sentences=None``, the default): every sentence is a new sample from the lane's own
  ``random.Random``, seeded by ``(seed, rank, worker)``;
* fixed (``train_sentences=N``): the training set is the N sentences ``s_i = sample(Random((seed, i)))``, i < N,
  the same set whatever the layout (the paper's "20M sentences sampled once", docs/method.md §5). Epoch ``e`` is a
  permutation of 0..N-1 seeded by ``(seed, e)``; the epochs are chained into one sequence of which lane ``l`` reads
  positions ``l, l + L, l + 2L, ...``, so within an epoch every sentence is read once, by one lane, and every epoch
  has a fresh order. Nothing is stored but the current epoch's order (4 bytes per sentence, briefly, then the lane's
  1/L of it): sentences are regenerated from their seeds, which costs what sampling fresh ones costs.

Exact resume: after every batch a lane reports its state (its generator state or the number of sentences it has
drawn, and the tokens it holds for the next batch) inside the batch under ``STATE_KEY``; the data module keeps the
state of the last batch the training loop consumed from each lane and the number of batches consumed, and a new
stream continues each lane from there, with the workers renumbered so the loader's strict rotation over them goes
on where it stopped (as in ``webdataset_datamodule``). No replay: resuming costs nothing.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset

from lit_overtok.data.grammar import Grammar
from lit_overtok.data.lanes import current_lane

# Each training batch carries its lane's state under this key; the data module pops it.
STATE_KEY = "cfg_lane_state"
MAX_TRAIN_SENTENCES = 2**32  # epoch orders are uint32


@dataclass
class LaneState:
    """Where a lane's stream stands after a batch: enough to continue it exactly."""

    lane: int
    draws: int = 0
    """Sentences the lane has begun (fixed mode: its next position is ``lane + draws·L``)."""
    carry: list[int] = field(default_factory=list)
    """Tokens already produced for the next batch (the rest of a document that straddles the batch boundary)."""
    rng: Optional[list[int]] = None
    """Fresh mode: the Mersenne Twister state of the lane's generator (``random.Random.getstate()[1]``)."""

    def as_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"lane": torch.tensor(self.lane), "draws": torch.tensor(self.draws),
                   "carry": torch.tensor(self.carry, dtype=torch.long)}
        if self.rng is not None:
            tensors["rng"] = torch.tensor(self.rng, dtype=torch.long)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LaneState":
        rng = tensors.get("rng")
        return cls(int(tensors["lane"]), int(tensors["draws"]), tensors["carry"].tolist(),
                   None if rng is None else rng.tolist())


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The seeded permutation of ``0..size-1`` that is epoch ``epoch`` of the fixed training set (uint32)."""
    key = int.from_bytes(hashlib.sha256(f"cfg-epoch:{seed}:{epoch}".encode()).digest()[:8], "little")
    order = np.arange(size, dtype=np.uint32)
    np.random.default_rng(key).shuffle(order)
    return order


def fixed_sentence(grammar: Grammar, seed: int, index: int) -> list[int]:
    """Sentence ``index`` of the fixed training set of ``seed`` (a string seed is hashed with SHA-512: stable)."""
    return grammar.sample(random.Random(f"cfg-sentence:{seed}:{index}"))


class _FixedSentences:
    """Lane ``lane``'s sentences of the fixed set, from draw ``draws`` on (chained epochs, strided positions)."""

    def __init__(self, grammar: Grammar, seed: int, size: int, lane: int, lanes: int, base: int, draws: int) -> None:
        self.grammar, self.seed, self.size, self.lane, self.lanes = grammar, seed, size, lane, lanes
        self.base, self.draws = base, draws
        self._epoch, self._start, self._mine = -1, 0, np.empty(0, dtype=np.uint32)

    def __call__(self) -> list[int]:
        epoch, offset = divmod(self.base + self.lane + self.draws * self.lanes, self.size)
        if epoch != self._epoch:
            # This lane's positions within the epoch are start, start + L, ...; keep only those.
            self._start = (self.base + self.lane - epoch * self.size) % self.lanes
            order = epoch_order(self.seed, epoch, self.size)
            self._mine = order if self.lanes == 1 else order[self._start:: self.lanes].copy()
            self._epoch = epoch
        self.draws += 1
        return fixed_sentence(self.grammar, self.seed, int(self._mine[(offset - self._start) // self.lanes]))


class _FreshSentences:
    """New samples from the lane's generator, which resumes from a saved state when given one."""

    def __init__(self, grammar: Grammar, seed_text: str, state: Optional[list[int]], draws: int) -> None:
        self.grammar, self.rng, self.draws = grammar, random.Random(seed_text), draws
        if state is not None:
            self.rng.setstate((3, tuple(state), None))

    def __call__(self) -> list[int]:
        self.draws += 1
        return self.grammar.sample(self.rng)

    def state(self) -> list[int]:
        return list(self.rng.getstate()[1])


@dataclass(frozen=True)
class SentenceStreamLayout:
    """What the lanes' streams depend on; a saved lane state continues exactly only under the same layout."""

    grammar: str
    seed: int
    train_sentences: Optional[int]
    world_size: int
    workers: int
    restart: Optional[int] = None
    """Training batches at which a resume under another layout started new streams (None: the original ones)."""
    base: int = 0
    """Fixed mode: sentences of the chained epochs drawn before that restart (the new lanes go on from there)."""


class PackedSentenceStream(IterableDataset):
    """Endless batches of consecutive ``seq_len + 1`` windows over ``BOS s EOS`` documents, for one rank."""

    def __init__(self, grammar: Grammar, layout: SentenceStreamLayout, rank: int, seq_len: int, batch_size: int,
                 lane_states: Optional[dict[int, LaneState]] = None, start_batch: int = 0) -> None:
        self.grammar, self.layout, self.rank = grammar, layout, rank
        self.seq_len, self.batch_size = seq_len, batch_size
        self.lane_states = dict(lane_states or {})
        """The state after the last consumed batch of each lane; the data module keeps it current."""
        self.start_batch = start_batch
        """Batches of this rank already consumed, for the worker rotation."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        lane, worker = current_lane(self.rank, self.layout.workers, self.start_batch, type(self).__name__)
        state = self.lane_states.get(lane, LaneState(lane))
        return self._batches(lane, worker, state)

    def _sentences(self, lane: int, worker: int, state: LaneState):
        layout = self.layout
        if layout.train_sentences is not None:
            lanes = layout.world_size * layout.workers
            return _FixedSentences(self.grammar, layout.seed, layout.train_sentences, lane, lanes, layout.base,
                                   state.draws)
        # The original stream's seed text is kept as it was, so the default run's data is unchanged.
        seed_text = f"cfg-train:{layout.seed}:{self.rank}:{worker}"
        if layout.restart is not None:
            seed_text += f":restart{layout.restart}"
        return _FreshSentences(self.grammar, seed_text, state.rng, state.draws)

    def _batches(self, lane: int, worker: int, state: LaneState) -> Iterator[dict[str, Any]]:
        sentences = self._sentences(lane, worker, state)
        window = self.seq_len + 1
        needed = self.batch_size * window
        bos, eos = self.grammar.bos_id, self.grammar.eos_id
        stream = list(state.carry)
        while True:
            while len(stream) < needed:
                stream.append(bos)
                stream.extend(sentences())
                stream.append(eos)
            windows_BW = torch.tensor(stream[:needed], dtype=torch.long).view(self.batch_size, window)
            del stream[:needed]
            after = LaneState(lane, sentences.draws, list(stream),
                              sentences.state() if isinstance(sentences, _FreshSentences) else None)
            yield {"input_ids": windows_BW[:, :-1].contiguous(), "labels": windows_BW[:, 1:].contiguous(),
                   STATE_KEY: after.as_tensors()}
