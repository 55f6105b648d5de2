"""Tests for lit_overtok.data.cfg_datamodule.CFGDataModule: packing, the fixed training set, exact resume."""

from __future__ import annotations

import itertools
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_overtok.data.cfg_datamodule import CFGDataModule
from lit_overtok.data.cfg_stream import STATE_KEY, fixed_sentence
from lit_overtok.training.lightning_module import OverTokLM
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.losses import IGNORE_INDEX
from lit_overtok.data.grammar import GrammarError
from lit_overtok.optim.config import OptimizerConfig


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


@pytest.mark.parametrize("field", ["seq_len", "batch_size", "val_sentences", "train_sentences"])
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
        assert set(batch) == {"input_ids", "labels", STATE_KEY}  # the lane's state, popped by the data module
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


# --------------------------------------------------------------------------------------- the fixed training set
def lane_documents(dm: CFGDataModule, count: int, batch_size: int = 4) -> list[list[int]]:
    """The first ``count`` complete documents of this rank's (single-lane) stream."""
    stream: list[int] = []
    loader = iter(dm.train_dataloader())
    while len(split_documents(stream, dm.bos_id, dm.eos_id)) < count:
        batch = next(loader)
        for inputs_T, labels_T in zip(batch["input_ids"], batch["labels"]):
            stream += [*inputs_T.tolist(), labels_T[-1].item()]
    return split_documents(stream, dm.bos_id, dm.eos_id)[:count]


def test_fixed_set_is_read_once_per_epoch_in_a_new_order_and_split_across_ranks():
    size, seed = 10, 7
    dm = CFGDataModule(seq_len=63, batch_size=4, seed=seed, train_sentences=size)
    index = {tuple(fixed_sentence(dm.grammar, seed, i)): i for i in range(size)}
    assert len(index) == size  # ten different sentences
    order = [index[tuple(d)] for d in lane_documents(dm, 3 * size)]  # KeyError if a sentence is not in the set
    epochs = [order[e * size:(e + 1) * size] for e in range(3)]
    assert all(sorted(epoch) == list(range(size)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3  # a new order each epoch
    # Two ranks: the same set, and within an epoch each sentence is read by exactly one of them.
    halves = [[index[tuple(d)] for d in lane_documents(as_rank(
        CFGDataModule(seq_len=63, batch_size=4, seed=seed, train_sentences=size), rank, 2), size)] for rank in range(2)]
    assert sorted(halves[0][:5] + halves[1][:5]) == list(range(size))
    assert sorted(halves[0][5:] + halves[1][5:]) == list(range(size))


def test_fixed_set_of_twenty_million_sentences_holds_only_an_epoch_order():
    # The paper's 20M sentences (~5 GB of tokens) are regenerated from their seeds: memory is the epoch order,
    # 4 bytes per sentence, not the sentences.
    dm = CFGDataModule(seq_len=255, batch_size=2, train_sentences=20_000_000)
    tracemalloc.start()
    try:
        take(dm.train_dataloader(), 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 80e6 <= peak < 120e6, peak


# ------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("train_sentences", [None, 6], ids=["fresh", "fixed"])
def test_the_same_loader_and_a_module_loaded_from_its_state_continue_after_the_consumed_batches(train_sentences):
    # What an epoch boundary (the loader iterated again) and a resume (a new module from the state) must both do.
    def datamodule():
        dm = CFGDataModule(seq_len=40, batch_size=2, train_sentences=train_sentences, num_workers=2)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True)
        dm.setup("fit")
        return dm

    expected = [b["input_ids"] for b in take(datamodule().train_dataloader(), 8)][5:]
    first = datamodule()
    loader = first.train_dataloader()
    for batch in take(loader, 5):  # the training loop takes five batches (the workers may prefetch more)
        first.on_before_batch_transfer(batch, 0)
        assert STATE_KEY not in batch
    resumed = datamodule()
    resumed.load_state_dict(first.state_dict())
    for batches in (take(loader, 3), take(resumed.train_dataloader(), 3)):
        assert all(torch.equal(a["input_ids"], b) for a, b in zip(batches, expected))


class BatchRecorder(pl.Callback):
    """Keeps every training batch by optimizer step; under DDP each rank saves its own record to ``folder``."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder, self.train = folder, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        assert STATE_KEY not in batch  # the data module consumed its bookkeeping key
        self.train[trainer.global_step] = batch["input_ids"].clone()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.folder is not None:
            torch.save(self.train, self.folder / f"rank{trainer.global_rank}.pt")


def fit(root: Path, datamodule: CFGDataModule, callbacks, ckpt_path=None, **options) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=7, default_root_dir=root, enable_checkpointing=True, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         use_distributed_sampler=False, accelerator="cpu", callbacks=callbacks,
                         **{"logger": False, "devices": 1, **options})
    module = OverTokLM(model_config=ModelConfig(preset="tiny", d_model=16, d_ff=32), optimizer=OptimizerConfig(lr=1e-3),
                       vocab_size=datamodule.vocab_size)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def every_third_step(folder: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=folder, every_n_train_steps=3, save_top_k=-1, filename="{step}")


@pytest.mark.parametrize("options", [dict(num_workers=0), dict(num_workers=2, train_sentences=9)],
                         ids=["fresh", "fixed-2-workers"])
def test_resumed_run_sees_exactly_the_batches_of_an_uninterrupted_run(tmp_path, options):
    def datamodule():
        return CFGDataModule(seq_len=48, batch_size=2, **options)

    full = BatchRecorder()
    fit(tmp_path / "a", datamodule(), [full, every_third_step(tmp_path / "ckpt")],
        logger=TensorBoardLogger(tmp_path / "a", name="", version=0), log_every_n_steps=1)
    checkpoint = tmp_path / "ckpt" / "step=3.ckpt"
    assert torch.load(checkpoint, weights_only=True)["CFGDataModule"]["train_batches"] == 3

    resumed = BatchRecorder()
    fit(tmp_path / "b", datamodule(), [resumed], ckpt_path=checkpoint)
    assert sorted(resumed.train) == [3, 4, 5, 6]
    for step in range(3, 7):
        assert torch.equal(resumed.train[step], full.train[step]), step
    # A stream restarted from scratch would not pass this test.
    assert not torch.equal(full.train[3], full.train[0])
    if "train_sentences" in options:
        # train/epoch: epochs of the fixed set begun so far (9 sentences of ~250 tokens, 97 tokens per batch).
        events = EventAccumulator(str(tmp_path / "a" / "version_0"))
        events.Reload()
        epochs = [e.value for e in events.Scalars("train/epoch")]
        assert len(epochs) == 7 and epochs == sorted(epochs) and 0 < epochs[0] and epochs[-1] < 1


def test_ddp_resume_restores_every_ranks_lanes(tmp_path):
    def datamodule():
        return CFGDataModule(seq_len=48, batch_size=2, train_sentences=20)

    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    fit(tmp_path / "a", datamodule(), [BatchRecorder(tmp_path / "a"), every_third_step(tmp_path / "ckpt")],
        strategy="ddp_fork", devices=2)
    lanes = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=True)["CFGDataModule"]["lanes"]
    assert sorted(lane["lane"] for lane in lanes) == [0, 1]  # rank 1's lane is in rank 0's checkpoint
    fit(tmp_path / "b", datamodule(), [BatchRecorder(tmp_path / "b")], strategy="ddp_fork", devices=2,
        ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    for rank in range(2):
        full, resumed = (torch.load(tmp_path / run / f"rank{rank}.pt") for run in ("a", "b"))
        assert sorted(resumed) == [3, 4, 5, 6]
        assert all(torch.equal(resumed[step], full[step]) for step in range(3, 7)), rank
    assert not torch.equal(full[3], torch.load(tmp_path / "a" / "rank0.pt")[3])  # the ranks read different data


def test_resume_with_another_layout_warns_and_goes_on_in_the_same_epochs():
    def datamodule(workers: int) -> CFGDataModule:
        dm = CFGDataModule(seq_len=40, batch_size=2, train_sentences=6, num_workers=workers)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True)
        dm.setup("fit")
        return dm

    dm = datamodule(0)
    for batch in take(dm.train_dataloader(), 4):
        dm.on_before_batch_transfer(batch, 0)
    state = dm.state_dict()
    drawn = state["lanes"][0]["draws"]
    other = datamodule(2)
    with pytest.warns(UserWarning, match="workers"):
        other.load_state_dict(state)
    assert other.state_dict()["layout"]["restart"] == 4 and other.state_dict()["layout"]["base"] == drawn
    assert other.training_metrics()["epoch"] == pytest.approx(drawn / 6)  # the epoch count goes on
