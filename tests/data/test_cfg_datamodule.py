"""Tests for lit_overtok.data.cfg_datamodule.CFGDataModule."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from lit_overtok.data.cfg_datamodule import CFGDataModule
from lit_overtok.nn.losses import IGNORE_INDEX
from lit_overtok.data.grammar import GrammarError


def take(loader, count: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), count))


def as_rank(datamodule: CFGDataModule, rank: int, world_size: int) -> CFGDataModule:
    # setup() only reads these two attributes of the trainer.
    datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    datamodule.setup("fit")
    return datamodule


def split_documents(stream: list[int], bos: int, eos: int) -> list[list[int]]:
    """Complete ``BOS s EOS`` documents of a stream that starts with BOS; checks the framing."""
    documents, current = [], None
    for token in stream:
        if token == bos:
            assert current is None, "BOS inside a document"
            current = []
        elif token == eos:
            assert current is not None, "EOS outside a document"
            documents.append(current)
            current = None
        else:
            assert current is not None, "token between EOS and the next BOS"
            current.append(token)
    return documents


def test_ids_and_hyperparameters():
    dm = CFGDataModule(seq_len=64, batch_size=2)
    assert (dm.bos_id, dm.eos_id, dm.vocab_size) == (0, 4, 7)
    assert dm.grammar.name == "cfg3f"
    assert dm.hparams.seq_len == 64 and dm.hparams.grammar == "cfg3f"


@pytest.mark.parametrize("field", ["seq_len", "batch_size", "val_sentences"])
def test_non_positive_sizes_are_rejected(field):
    with pytest.raises(ValueError, match=field):
        CFGDataModule(**{field: 0})


def test_negative_num_workers_is_rejected():
    with pytest.raises(ValueError, match="num_workers"):
        CFGDataModule(num_workers=-1)


def test_unknown_grammar_fails_at_construction():
    with pytest.raises(GrammarError, match="cfg3f"):
        CFGDataModule(grammar="no_such_grammar")


def test_training_batches_are_packed_shifted_windows():
    dm = CFGDataModule(seq_len=96, batch_size=3, seed=5)
    batches = take(dm.train_dataloader(), 4)
    stream = []
    for batch in batches:
        assert set(batch) == {"input_ids", "labels"}
        for key in ("input_ids", "labels"):
            assert batch[key].shape == (3, 96) and batch[key].dtype == torch.int64
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        for inputs_T, labels_T in zip(batch["input_ids"], batch["labels"]):
            stream += [*inputs_T.tolist(), labels_T[-1].item()]
    # Consecutive windows continue one stream: 4 * 3 * 97 tokens of whole documents.
    assert stream[0] == dm.bos_id
    documents = split_documents(stream, dm.bos_id, dm.eos_id)
    assert len(documents) >= 3
    assert all(dm.grammar.accepts(document) for document in documents)


def test_training_stream_is_deterministic_per_seed():
    first = take(CFGDataModule(seq_len=32, batch_size=2, seed=11).train_dataloader(), 3)
    again = take(CFGDataModule(seq_len=32, batch_size=2, seed=11).train_dataloader(), 3)
    other = take(CFGDataModule(seq_len=32, batch_size=2, seed=12).train_dataloader(), 3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert not torch.equal(first[0]["input_ids"], other[0]["input_ids"])


def test_ranks_draw_different_sentences():
    rank0 = take(as_rank(CFGDataModule(seq_len=32, batch_size=2), 0, 2).train_dataloader(), 1)[0]
    rank1 = take(as_rank(CFGDataModule(seq_len=32, batch_size=2), 1, 2).train_dataloader(), 1)[0]
    assert not torch.equal(rank0["input_ids"], rank1["input_ids"])


def test_workers_draw_different_sentences():
    # The loader alternates workers, so batches 0 and 1 are each worker's first batch.
    batches = take(CFGDataModule(seq_len=32, batch_size=2, num_workers=2).train_dataloader(), 2)
    assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])


def validation_rows(dm: CFGDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(dm.val_dataloader())
    return torch.cat([b["input_ids"] for b in batches]), torch.cat([b["labels"] for b in batches])


def test_validation_rows_are_padded_documents():
    dm = CFGDataModule(seq_len=320, batch_size=8, val_sentences=20)
    inputs_VT, labels_VT = validation_rows(dm)
    assert inputs_VT.shape == labels_VT.shape == (20, 320)
    assert inputs_VT.dtype == labels_VT.dtype == torch.int64
    assert (inputs_VT[:, 0] == dm.bos_id).all()
    padded_rows = 0
    for inputs_T, labels_T in zip(inputs_VT, labels_VT):
        valid = int((labels_T != IGNORE_INDEX).sum())
        assert torch.equal(labels_T[: valid - 1], inputs_T[1:valid])
        assert (labels_T[valid:] == IGNORE_INDEX).all()
        if valid < 320:  # the whole document fits: BOS s EOS, then EOS padding
            padded_rows += 1
            assert labels_T[valid - 1] == dm.eos_id
            assert (inputs_T[valid:] == dm.eos_id).all()
            assert dm.grammar.accepts(inputs_T[1:valid].tolist())
    assert padded_rows >= 15  # most cfg3f sentences are shorter than 318 tokens


def test_validation_truncates_long_documents():
    dm = CFGDataModule(seq_len=40, batch_size=4, val_sentences=6)
    inputs_VT, labels_VT = validation_rows(dm)
    assert (inputs_VT[:, 0] == dm.bos_id).all()
    assert (labels_VT != IGNORE_INDEX).all()
    assert torch.equal(inputs_VT[:, 1:], labels_VT[:, :-1])
    assert not (inputs_VT == dm.eos_id).any()


def test_validation_set_is_fixed_across_instances_and_calls():
    dm = CFGDataModule(seq_len=128, batch_size=4, val_sentences=10, seed=3)
    first = validation_rows(dm)
    assert all(torch.equal(a, b) for a, b in zip(first, validation_rows(dm)))
    twin = validation_rows(CFGDataModule(seq_len=128, batch_size=4, val_sentences=10, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(first, twin))
    other = validation_rows(CFGDataModule(seq_len=128, batch_size=4, val_sentences=10, seed=4))
    assert not torch.equal(first[0], other[0])
    # Validation sentences come from a different stream than training.
    train = take(CFGDataModule(seq_len=128, batch_size=1, seed=3).train_dataloader(), 1)[0]
    assert not torch.equal(first[0][0], train["input_ids"][0])


def test_validation_is_sharded_evenly_across_ranks():
    full_VT, _ = validation_rows(CFGDataModule(seq_len=64, batch_size=2, val_sentences=7))
    shards = [
        validation_rows(as_rank(CFGDataModule(seq_len=64, batch_size=2, val_sentences=7), rank, 3))[0]
        for rank in range(3)
    ]
    assert [len(shard) for shard in shards] == [3, 3, 3]
    for rank, shard in enumerate(shards):
        expected = [index % 7 for index in range(rank, 9, 3)]
        assert torch.equal(shard, full_VT[expected])


class _TinyLM(pl.LightningModule):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)

    def _loss(self, batch):
        logits_BTV = self.head(self.embed(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), batch["labels"].flatten())

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_runs_on_the_datamodule(tmp_path):
    dm = CFGDataModule(seq_len=32, batch_size=2, val_sentences=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_TinyLM(dm.vocab_size), datamodule=dm)
    assert trainer.global_step == 2 and (dm.rank, dm.world_size) == (0, 1)
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
