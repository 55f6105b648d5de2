"""WebDatasetDataModule on real tar shards: lanes, DDP with workers, exact resume, corrupt shards, manifest checks."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_overtok.nn.config import ModelConfig
from lit_overtok.data.shards import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    CorruptShardError,
    ManifestError,
    file_sha256,
    manifest_dict,
    read_shard,
    shard_file_name,
    write_shard,
)
from lit_overtok.data.webdataset_datamodule import (
    CORRUPT_KEY,
    CorruptShardWarning,
    WebDatasetDataModule,
    lane_shards,
)
from lit_overtok.training.lightning_module import OverTokLM
from lit_overtok.optim.config import OptimizerConfig
from tests.fixtures import TEXT_EOS as EOS, TEXT_VOCAB as VOCAB


def make_corpus(root: Path, tokenizer: Path, train_shards: int = 8, val_shards: int = 1,
                docs_per_shard: int = 12) -> Path:
    """Shards whose document number d is the token d repeated 5..39 times, then EOS: every token names its document.
    ``tokenizer`` (``VOCAB`` ids) is the one they are said to be made with."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits, number = {}, 0
    for split, count in (("train", train_shards), ("validation", val_shards)):
        infos = []
        for index in range(count):
            first, documents = number, []
            for _ in range(docs_per_shard):
                number += 1
                documents.append(np.array([number] * int(rng.integers(5, 40)) + [EOS], dtype="<u2"))
            infos.append(write_shard(root / shard_file_name(split, index), documents, first_document=first))
        splits[split] = infos
    shutil.copyfile(tokenizer, root / TOKENIZER_NAME)
    manifest = manifest_dict(file_sha256(root / TOKENIZER_NAME), VOCAB, EOS, splits, provenance={})
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def documents_of(batch_or_tokens) -> set[int]:
    tokens = batch_or_tokens["input_ids"] if isinstance(batch_or_tokens, dict) else batch_or_tokens
    return set(torch.as_tensor(tokens).flatten().tolist()) - {EOS}


def as_rank(dm: WebDatasetDataModule, rank: int, world_size: int) -> WebDatasetDataModule:
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    dm.setup("fit")
    return dm


def take(loader, count: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), count))


def shard_documents(root: Path, index: int) -> set[int]:
    """The document numbers stored in train shard ``index`` (12 per shard, numbered from 1)."""
    return set(range(12 * index + 1, 12 * index + 13))


@pytest.fixture
def corpus(tmp_path, text_tokenizer) -> Path:
    return make_corpus(tmp_path / "corpus", text_tokenizer)


# ----------------------------------------------------------------------------------------------- the stream
def test_each_pass_reads_every_shard_once_across_lanes():
    n_shards, lanes = 7, 3
    draws = {lane: list(itertools.islice(lane_shards(n_shards, 5, lane, lanes), n_shards)) for lane in range(lanes)}
    sequence = [draws[position % lanes][position // lanes] for position in range(3 * n_shards)]
    passes = [sequence[i : i + n_shards] for i in range(0, 3 * n_shards, n_shards)]
    assert all(sorted(p) == list(range(n_shards)) for p in passes)
    assert passes[0] != passes[1]  # reshuffled every pass


def test_batches_are_the_document_stream_cut_into_shifted_windows(corpus):
    dm = as_rank(WebDatasetDataModule(str(corpus), seq_len=15, batch_size=3, num_workers=0, shuffle_buffer=1), 0, 1)
    batches = take(dm.train_dataloader(), 10)
    stream = []
    for batch in batches:
        assert batch["input_ids"].shape == batch["labels"].shape == (3, 15)
        assert batch["input_ids"].dtype == torch.int64
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        stream += torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).flatten().tolist()
    # With no shuffling, the stream is the documents of the lane's shards in order, each ending in EOS.
    train = dm.train_set
    documents = [document for index in itertools.islice(lane_shards(8, 1234, 0, 1), 3)
                 for document in read_shard(train.urls[index], train.infos[index], train.manifest.dtype)]
    assert stream == np.concatenate(documents)[: len(stream)].tolist()


def test_two_ranks_with_two_workers_read_disjoint_documents(corpus):
    seen = {}
    for rank in range(2):
        dm = as_rank(WebDatasetDataModule(str(corpus), seq_len=31, batch_size=2, num_workers=2, shuffle_buffer=4),
                     rank, 2)
        for index, batch in enumerate(take(dm.train_dataloader(), 8)):
            seen.setdefault((rank, index % 2), set()).update(documents_of(batch))  # the loader alternates workers
    assert len(seen) == 4 and all(seen.values())
    for a, b in itertools.combinations(seen, 2):
        assert not seen[a] & seen[b], (a, b)


def test_stream_is_deterministic_and_seeded(corpus):
    def first_batches(seed):
        dm = WebDatasetDataModule(str(corpus), seq_len=31, batch_size=2, num_workers=0, shuffle_buffer=8, seed=seed)
        return [b["input_ids"] for b in take(as_rank(dm, 0, 1).train_dataloader(), 4)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# ------------------------------------------------------------------------------------------------ validation
def validation(corpus: Path, rank: int, world_size: int, **kwargs) -> list[torch.Tensor]:
    dm = as_rank(WebDatasetDataModule(str(corpus), seq_len=15, batch_size=2, num_workers=0, **kwargs), rank,
                 world_size)
    return [batch["input_ids"] for batch in dm.val_dataloader()]


def test_validation_is_fixed_and_dealt_evenly_to_ranks(corpus):
    single = validation(corpus, 0, 1, val_batches=6)
    assert len(single) == 6
    assert all(torch.equal(a, b) for a, b in zip(single, validation(corpus, 0, 1, val_batches=6, seed=9)))
    ranks = [validation(corpus, rank, 2, val_batches=3) for rank in range(2)]
    assert [len(r) for r in ranks] == [3, 3]
    for rank, batches in enumerate(ranks):
        assert all(torch.equal(a, b) for a, b in zip(batches, single[rank::2]))
    # All complete batches when val_batches is None: 12 documents of 6..40 tokens fill at least 7 batches of 32.
    everything = validation(corpus, 0, 1, val_batches=None)
    assert len(everything) >= 7 and all(torch.equal(a, b) for a, b in zip(everything, single))


# ----------------------------------------------------------------------------------------- Lightning: DDP
class BatchRecorder(pl.Callback):
    """Keeps every training and validation batch; under DDP each rank saves its own record to ``folder``."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder, self.train, self.val = folder, {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        assert CORRUPT_KEY not in batch  # the data module consumed its bookkeeping key
        self.train[trainer.global_step] = batch["input_ids"].clone()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.val.append(batch["input_ids"].clone())

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.folder is not None:
            torch.save({"train": self.train, "val": self.val}, self.folder / f"rank{trainer.global_rank}.pt")


def tiny_module(vocab_size: int = VOCAB) -> OverTokLM:
    return OverTokLM(model_config=ModelConfig(preset="tiny", d_model=16, d_ff=32), optimizer=OptimizerConfig(lr=1e-3), vocab_size=vocab_size)


def trainer(root: Path, steps: int, callbacks, **kwargs) -> pl.Trainer:
    options = dict(max_steps=steps, default_root_dir=root, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   use_distributed_sampler=False, accelerator="cpu", devices=1, limit_val_batches=0)
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def test_ddp_two_gloo_ranks_two_workers_disjoint_data_and_equal_batch_counts(corpus, tmp_path):
    dm = WebDatasetDataModule(str(corpus), seq_len=15, batch_size=2, num_workers=2, shuffle_buffer=4, val_batches=2)
    fit = trainer(tmp_path, 8, [BatchRecorder(tmp_path)], strategy="ddp_fork", devices=2, val_check_interval=4,
                  limit_val_batches=None)
    fit.fit(tiny_module(), datamodule=dm)
    records = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [sorted(r["train"]) for r in records] == [list(range(8))] * 2
    assert [len(r["val"]) for r in records] == [4, 4]  # 2 batches per validation, 2 validations, both ranks
    seen = {}
    for rank, record in enumerate(records):
        for step, input_ids in record["train"].items():
            seen.setdefault((rank, step % 2), set()).update(documents_of(input_ids))
    assert len(seen) == 4 and all(seen.values())
    for a, b in itertools.combinations(seen, 2):
        assert not seen[a] & seen[b], (a, b)
    # The ranks validate on different rows of the same fixed set.
    assert not torch.equal(records[0]["val"][0], records[1]["val"][0])
    assert torch.equal(records[0]["val"][0], records[0]["val"][2])


# -------------------------------------------------------------------------------------- Lightning: resume
def test_resumed_run_sees_exactly_the_batches_of_an_uninterrupted_run(corpus, tmp_path):
    def datamodule():
        return WebDatasetDataModule(str(corpus), seq_len=15, batch_size=2, num_workers=2, shuffle_buffer=6,
                                    val_batches=1)

    full = BatchRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1,
                                  filename="{step}")
    trainer(tmp_path / "a", 7, [full, checkpoints], enable_checkpointing=True, val_check_interval=2,
            limit_val_batches=1).fit(tiny_module(), datamodule=datamodule())
    checkpoint = tmp_path / "ckpt" / "step=3.ckpt"
    assert torch.load(checkpoint, weights_only=False)["WebDatasetDataModule"]["train_batches"] == 3

    resumed = BatchRecorder()
    trainer(tmp_path / "b", 7, [resumed], val_check_interval=2, limit_val_batches=1).fit(
        tiny_module(), datamodule=datamodule(), ckpt_path=checkpoint)
    assert sorted(resumed.train) == [3, 4, 5, 6]
    for step in range(3, 7):
        assert torch.equal(resumed.train[step], full.train[step]), step
    # A stream restarted from scratch would not pass this test.
    assert not torch.equal(full.train[3], full.train[0])


def test_a_new_iterator_continues_after_the_consumed_batches(corpus):
    # What happens at an epoch boundary (limit_train_batches) or a resume: the loader is iterated again.
    def datamodule():
        dm = WebDatasetDataModule(str(corpus), seq_len=15, batch_size=2, num_workers=2, shuffle_buffer=3)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True)
        dm.setup("fit")
        return dm

    reference = [b["input_ids"] for b in take(datamodule().train_dataloader(), 8)]
    dm = datamodule()
    loader = dm.train_dataloader()
    for batch in take(loader, 5):
        dm.on_before_batch_transfer(batch, 0)  # the training loop takes these five
    again = [b["input_ids"] for b in take(loader, 3)]
    assert all(torch.equal(a, b) for a, b in zip(again, reference[5:]))


def test_resume_with_another_layout_warns_and_starts_a_fresh_stream(corpus):
    dm = as_rank(WebDatasetDataModule(str(corpus), seq_len=15, batch_size=2, num_workers=0), 0, 1)
    state = dm.state_dict() | {"train_batches": 5}
    other = as_rank(WebDatasetDataModule(str(corpus), seq_len=15, batch_size=4, num_workers=0), 0, 1)
    with pytest.warns(UserWarning, match="batch_size"):
        other.load_state_dict(state)
    assert other.state_dict()["train_batches"] == 0 and other.state_dict()["layout"]["restart"] == 5
    fresh = take(other.train_dataloader(), 1)[0]["input_ids"]
    original = take(as_rank(WebDatasetDataModule(str(corpus), seq_len=15, batch_size=4, num_workers=0), 0, 1)
                    .train_dataloader(), 1)[0]["input_ids"]
    assert not torch.equal(fresh, original)


# ------------------------------------------------------------------------------------------- corrupt data
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_corrupt_shard_is_skipped_with_a_warning_and_counted_in_tensorboard(corpus, tmp_path):
    first = next(lane_shards(8, 1234, 0, 1))
    truncate(corpus / shard_file_name("train", first))
    dm = WebDatasetDataModule(str(corpus), seq_len=15, batch_size=2, num_workers=0, shuffle_buffer=2, val_batches=1)
    recorder = BatchRecorder()
    logger = TensorBoardLogger(tmp_path, name="", version="run", default_hp_metric=False)
    with pytest.warns(CorruptShardWarning, match=shard_file_name("train", first)):
        trainer(tmp_path, 3, [recorder], logger=logger, log_every_n_steps=1).fit(tiny_module(), datamodule=dm)
    assert all(not documents_of(batch) & shard_documents(corpus, first) for batch in recorder.train.values())
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    assert [event.value for event in events.Scalars("train/data/corrupt_shards")] == [1.0, 1.0, 1.0]


def test_corrupt_shard_stops_the_run_naming_it_when_configured(corpus):
    truncate(corpus / shard_file_name("train", 3))
    dm = as_rank(WebDatasetDataModule(str(corpus), seq_len=15, batch_size=2, num_workers=1, on_corrupt="error"),
                 0, 1)
    # From a worker process the DataLoader re-raises it as RuntimeError carrying the original message.
    with pytest.raises((CorruptShardError, RuntimeError), match="train-000003.tar.*on_corrupt=error"):
        take(dm.train_dataloader(), 200)


def test_when_every_shard_is_corrupt_the_stream_fails_instead_of_spinning(tmp_path, text_tokenizer):
    corpus = make_corpus(tmp_path / "corpus", text_tokenizer, train_shards=2)
    for index in range(2):
        truncate(corpus / shard_file_name("train", index))
    dm = as_rank(WebDatasetDataModule(str(corpus), seq_len=15, batch_size=2, num_workers=0), 0, 1)
    with pytest.warns(CorruptShardWarning), pytest.raises(ManifestError, match="every one of the 2 training shards"):
        take(dm.train_dataloader(), 1)


def test_modified_shard_of_the_same_size_is_detected(corpus):
    path = corpus / shard_file_name("train", 0)
    data = bytearray(path.read_bytes())
    data[1024] ^= 1
    path.write_bytes(bytes(data))
    dm = as_rank(WebDatasetDataModule(str(corpus), seq_len=15, batch_size=2, num_workers=0, on_corrupt="error"),
                 0, 1)
    with pytest.raises(CorruptShardError, match="sha256"):
        take(dm.train_dataloader(), 200)


# ---------------------------------------------------------------------------------------- manifest checks
def test_tokenizer_that_is_not_the_manifests_is_refused(corpus, tmp_path, text_tokenizer):
    WebDatasetDataModule(str(corpus), tokenizer=str(text_tokenizer))  # the one the shards were made with
    other = tmp_path / "other.json"
    other.write_text(text_tokenizer.read_text().replace("<|endoftext|>", "<|end|>"))
    with pytest.raises(ManifestError, match="not the tokenizer the shards were made with"):
        WebDatasetDataModule(str(corpus), tokenizer=str(other))


def test_model_with_another_vocabulary_is_refused(corpus, tmp_path):
    dm = WebDatasetDataModule(str(corpus), seq_len=15, batch_size=2, num_workers=0)
    with pytest.raises(ManifestError, match=f"vocab_size 1000.*{VOCAB}"):
        trainer(tmp_path, 1, []).fit(tiny_module(vocab_size=1000), datamodule=dm)


def test_shard_patterns_are_checked_against_the_manifest(corpus, tmp_path):
    dm = WebDatasetDataModule(str(corpus / "train-00000{0..3}.tar"), val_shards=str(corpus / "validation-*.tar"))
    assert len(dm.train_set.urls) == 4 and dm.vocab_size == VOCAB and dm.eos_id == EOS
    with pytest.raises(ManifestError, match="belongs to the 'validation' split"):
        WebDatasetDataModule(str(corpus / "*.tar"), val_shards=str(corpus / "validation-*.tar"))
    shutil.copyfile(corpus / "train-000000.tar", corpus / "extra.tar")
    with pytest.raises(ManifestError, match="'extra.tar' is not listed"):
        WebDatasetDataModule(str(corpus / "extra.tar"), val_shards=str(corpus / "validation-*.tar"))
    with pytest.raises(ManifestError, match="no manifest"):
        WebDatasetDataModule(str(tmp_path))
    with pytest.raises(ManifestError, match="more than once"):
        WebDatasetDataModule(str(corpus / "train-00000{0,0}.tar"), val_shards=str(corpus / "validation-*.tar"))


def test_shards_can_be_urls_with_an_explicit_manifest(corpus):
    dm = WebDatasetDataModule(f"pipe:cat {corpus}/train-00000{{0..3}}.tar",
                              val_shards=f"pipe:cat {corpus}/validation-000000.tar",
                              manifest=str(corpus / MANIFEST_NAME), seq_len=15, batch_size=2, num_workers=0)
    assert dm.train_set.urls[1] == f"pipe:cat {corpus}/train-000001.tar"
    batch = take(as_rank(dm, 0, 1).train_dataloader(), 1)[0]
    assert documents_of(batch) <= set().union(*(shard_documents(corpus, i) for i in range(4)))
    assert len(list(dm.val_dataloader())) > 0
    with pytest.raises(ManifestError, match="give data.manifest"):
        WebDatasetDataModule(f"pipe:cat {corpus}/train-000000.tar", val_shards=str(corpus))


def test_manifests_of_train_and_validation_must_agree(corpus, tmp_path, text_tokenizer):
    other = make_corpus(tmp_path / "other", text_tokenizer)
    (other / TOKENIZER_NAME).write_text("{}")
    manifest = (other / MANIFEST_NAME).read_text()
    changed = manifest.replace(file_sha256(text_tokenizer), file_sha256(other / TOKENIZER_NAME))
    (other / MANIFEST_NAME).write_text(changed)
    with pytest.raises(ManifestError, match="disagree on the tokenizer"):
        WebDatasetDataModule(str(corpus), val_shards=str(other))


def test_fewer_shards_than_readers_is_an_error(tmp_path, text_tokenizer):
    corpus = make_corpus(tmp_path / "corpus", text_tokenizer, train_shards=3)
    with pytest.raises(ValueError, match="3 shards cannot feed 4 readers"):
        as_rank(WebDatasetDataModule(str(corpus), num_workers=2), 0, 2)
