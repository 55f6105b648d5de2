"""``python -m lit_overtok.data.prepare``: formats, tokenizers, EOS, byte-identical output, clear errors, and tokens
that come back unchanged through shards and the data module."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer

from lit_overtok.data import prepare as prepare_module
from lit_overtok.data.prepare import PrepareConfig, PrepareError, main, prepare
from lit_overtok.data.shards import Manifest, read_shard
from lit_overtok.data.webdataset_datamodule import WebDatasetDataModule
from tests.fixtures import TEXT_EOS, TEXT_VOCAB

TEXTS = [
    f"Document {i}: the quick brown fox jumps over {i} lazy dogs. Ünïcödé ✓, double  spaces.\nSecond line {i}."
    for i in range(40)
]


def write_jsonl_gz(path: Path, texts: list[str], field: str = "text") -> Path:
    with gzip.open(path, "wt") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, field: text}) + "\n")
    return path


def run(tmp_path: Path, name: str = "out", **options) -> tuple[Path, Manifest]:
    output = tmp_path / name
    defaults = dict(output=output, workers=1, progress=False, shard_tokens=300)
    prepare(PrepareConfig(**(defaults | options)))
    return output, Manifest.load(output / "manifest.json")


def documents(output: Path, manifest: Manifest, split: str) -> list[list[int]]:
    return [d.tolist() for info in manifest.splits[split]
            for d in read_shard(str(output / info.file), info, manifest.dtype)]


def test_tokens_round_trip_through_shards_and_the_data_module(tmp_path, text_tokenizer):
    train = write_jsonl_gz(tmp_path / "train.jsonl.gz", TEXTS[:30])
    val = write_jsonl_gz(tmp_path / "val.jsonl.gz", TEXTS[30:])
    output, manifest = run(tmp_path, tokenizer=str(text_tokenizer), train=[str(train)], validation=[str(val)])
    tokenizer = Tokenizer.from_file(str(text_tokenizer))
    assert (manifest.vocab_size, manifest.eos_id, manifest.dtype.name) == (TEXT_VOCAB, TEXT_EOS, "uint16")
    assert len(manifest.splits["train"]) > 1  # 300-token shards
    for split, texts in (("train", TEXTS[:30]), ("validation", TEXTS[30:])):
        stored = documents(output, manifest, split)
        assert stored == [tokenizer.encode(t, add_special_tokens=False).ids + [TEXT_EOS] for t in texts]
        assert [tokenizer.decode(d[:-1]) for d in stored] == texts
    # The data module's validation batches are those tokens, concatenated and cut into windows.
    dm = WebDatasetDataModule(str(output), seq_len=20, batch_size=2, num_workers=0, val_batches=None,
                              tokenizer=str(text_tokenizer))
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1)
    dm.setup("fit")
    windows = [row.tolist() + [batch["labels"][i, -1].item()]
               for batch in dm.val_dataloader() for i, row in enumerate(batch["input_ids"])]
    flat = [token for document in documents(output, manifest, "validation") for token in document]
    assert sum(windows, []) == flat[: 21 * len(windows)] and len(flat) - 21 * len(windows) < 42


def test_same_input_gives_byte_identical_output_whatever_the_process_count(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_DOCUMENTS", 7)  # many chunks in flight, finished out of order
    train = write_jsonl_gz(tmp_path / "train.jsonl.gz", TEXTS * 3)
    one, _ = run(tmp_path, "one", vocab_size=300, train=[str(train)], workers=1)
    two, manifest = run(tmp_path, "two", vocab_size=300, train=[str(train)], workers=2)
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir()) and len(files) > 4
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    # The trained BPE: 300 entries, end-of-text is id 0 and closes every document.
    assert (manifest.vocab_size, manifest.eos_id) == (300, 0)
    assert all(d[-1] == 0 and 0 not in d[:-1] for d in documents(two, manifest, "train"))


def test_plain_text_units_zstd_and_parquet_inputs(tmp_path, text_tokenizer):
    text = tmp_path / "book.txt"
    text.write_text("para one\nstill one\n\npara two\n\n\npara three\n")
    counts = {}
    for unit in ("file", "line", "paragraph"):
        output, manifest = run(tmp_path, unit, tokenizer=str(text_tokenizer), train=[str(text)], text_unit=unit)
        counts[unit] = sum(info.documents for info in manifest.splits["train"])
    assert counts == {"file": 1, "line": 4, "paragraph": 3}

    zst = tmp_path / "data.jsonl.zst"
    lines = "".join(json.dumps({"body": t}) + "\n" for t in TEXTS)
    zst.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": TEXTS, "n": list(range(len(TEXTS)))}), parquet, row_group_size=7)
    outputs = [run(tmp_path, name, tokenizer=str(text_tokenizer), train=[str(path)], field="body")
               for name, path in (("zst", zst), ("parquet", parquet))]
    assert documents(*outputs[0], "train") == documents(*outputs[1], "train")
    assert len(documents(*outputs[0], "train")) == len(TEXTS)


def large_vocabulary_tokenizer(path: Path) -> Path:
    """A byte-level BPE of 70,257 ids whose 256 byte tokens are ids 70,000 and up (EOS last): every id it writes
    needs more than 16 bits."""
    from tokenizers import models, pre_tokenizers

    tokenizer = prepare_module.byte_level_bpe()
    vocab = {f"<unused{i}>": i for i in range(70_000)}
    vocab |= {byte: 70_000 + i for i, byte in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer.model = models.BPE(vocab=vocab, merges=[])
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path))
    return path


def test_large_vocabularies_are_stored_as_uint32(tmp_path):
    train = write_jsonl_gz(tmp_path / "train.jsonl.gz", TEXTS[:3])
    path = large_vocabulary_tokenizer(tmp_path / "large.json")
    output, manifest = run(tmp_path, tokenizer=str(path), train=[str(train)])
    assert manifest.dtype.name == "uint32" and (manifest.vocab_size, manifest.eos_id) == (70_257, 70_256)
    expected = Tokenizer.from_file(str(path)).encode(TEXTS[0], add_special_tokens=False).ids
    assert min(expected) >= 70_000 and documents(output, manifest, "train")[0] == expected + [70_256]


@pytest.mark.parametrize(
    "make_input, options, message",
    [
        (lambda d: d / "missing.jsonl", {}, "input file .*missing.jsonl does not exist"),
        (lambda d: d / "none-*.jsonl", {}, "no file matches"),
        (lambda d: (d / "empty.jsonl").write_text("\n") and d / "empty.jsonl", {}, "contains no documents"),
        (lambda d: write_jsonl_gz(d / "a.jsonl.gz", TEXTS, field="body"), {},
         r"line 1: no field 'text'; the record has fields \['body', 'id'\]"),
        (lambda d: pq.write_table(pa.table({"body": TEXTS}), d / "a.parquet") or d / "a.parquet", {"field": "txt"},
         r"no column 'txt'; the columns are \['body'\]"),
        (lambda d: (d / "a.csv").write_text("x") and d / "a.csv", {}, "cannot tell the format"),
        (lambda d: write_jsonl_gz(d / "a.jsonl.gz", TEXTS), {"eos_token": "<|nope|>"},
         "cannot determine the end-of-text token"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, make_input, options, message, text_tokenizer):
    path = make_input(tmp_path)
    with pytest.raises(PrepareError, match=message):
        run(tmp_path, tokenizer=str(text_tokenizer), train=[str(path)], **options)


def test_options_and_existing_output_are_checked(tmp_path, text_tokenizer):
    train = write_jsonl_gz(tmp_path / "train.jsonl.gz", TEXTS[:2])
    with pytest.raises(PrepareError, match="exactly one of --tokenizer"):
        PrepareConfig(output=tmp_path, train=[str(train)])
    run(tmp_path, tokenizer=str(text_tokenizer), train=[str(train)])
    with pytest.raises(PrepareError, match="already holds prepared data"):
        run(tmp_path, tokenizer=str(text_tokenizer), train=[str(train)])
    run(tmp_path, tokenizer=str(text_tokenizer), train=[str(train)], overwrite=True)
    with pytest.raises(PrepareError, match="--train: input file"):
        main(["--output", str(tmp_path / "x"), "--tokenizer", str(text_tokenizer), "--train",
              str(tmp_path / "nope.jsonl")])


def test_command_line_prepares_and_reports(tmp_path, capsys, text_tokenizer):
    train = write_jsonl_gz(tmp_path / "train.jsonl.gz", TEXTS[:5])
    main(["--output", str(tmp_path / "out"), "--tokenizer", str(text_tokenizer), "--train", str(train), "--validation",
          str(train), "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert "train: 5 documents" in out and "validation: 5 documents" in out
    # One unit, the progress bar's (bytes of the input files as read, compressed or not), in the closing line too.
    size = 2 * train.stat().st_size / 1e6
    assert f"{size:.1f} MB of input files" in out and "MB/s of input, the progress bar's unit" in out
    assert Manifest.load(tmp_path / "out/manifest.json").dtype == np.dtype("<u2")


def test_a_test_split_is_prepared_and_is_the_data_modules_held_out_set(tmp_path, capsys, text_tokenizer):
    train, val, test = (write_jsonl_gz(tmp_path / f"{name}.jsonl.gz", texts)
                        for name, texts in (("train", TEXTS[:20]), ("val", TEXTS[20:30]), ("test", TEXTS[30:])))
    main(["--output", str(tmp_path / "out"), "--tokenizer", str(text_tokenizer), "--train", str(train),
          "--validation", str(val), "--test", str(test), "--workers", "1", "--no-progress"])
    assert "test: 10 documents" in capsys.readouterr().out
    manifest = Manifest.load(tmp_path / "out/manifest.json")
    dm = WebDatasetDataModule(str(tmp_path / "out"), seq_len=20, batch_size=2, num_workers=0)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1)
    dm.setup("test")
    windows = [row.tolist() + [batch["labels"][i, -1].item()]
               for batch in dm.test_dataloader() for i, row in enumerate(batch["input_ids"])]
    flat = [token for document in documents(tmp_path / "out", manifest, "test") for token in document]
    assert sum(windows, []) == flat[: 21 * len(windows)] and len(flat) - 21 * len(windows) < 42  # every full batch
    # Shards prepared without --test: train.py test says how to get a test split.
    main(["--output", str(tmp_path / "no_test"), "--tokenizer", str(text_tokenizer), "--train", str(train),
          "--validation", str(val), "--workers", "1", "--no-progress"])
    dm = WebDatasetDataModule(str(tmp_path / "no_test"), seq_len=20, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=r"data.test_shards: .* lists no 'test' shards.*--test FILES"):
        dm.test_dataloader()
