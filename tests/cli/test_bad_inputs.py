"""Bad input stops ``train.py fit`` with one line naming the file or field, before any training step."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import pytest

from lit_overtok.cli.main import main as cli_main


def fit_args(root: Path, corpus: Path, *extra: str) -> list[str]:
    return ["fit", f"--trainer.default_root_dir={root}", "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1",
            "--model.init_args.model_config.preset=tiny",
            "--data=lit_overtok.data.webdataset_datamodule.WebDatasetDataModule",
            f"--data.init_args.train_shards={corpus}", "--data.init_args.seq_len=16", "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0", "--data.init_args.val_batches=1", *extra]


def edited_corpus(corpus: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    manifest = copy / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(edit(text, copy))
    return copy


def with_vocab_size(size: int, keep_max_ids: bool = True, keep_tokenizer: bool = True):
    def edit(text: str, folder: Path) -> str:
        manifest = json.loads(text)
        manifest["vocab_size"] = size
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                if not keep_max_ids:
                    del shard["max_id"]
        if not keep_tokenizer:
            (folder / "tokenizer.json").unlink()
        return json.dumps(manifest)
    return edit


CASES = {
    "endless max_steps": ([], ["--trainer.max_steps=-1"], "trainer.max_steps=-1: .* set trainer.max_steps"),
    "seq_len past max_seq_len": ([], ["--data.init_args.seq_len=600"],
                                 r"data.seq_len=600 exceeds model_config.max_seq_len=256"),
    "manifest not JSON": ([lambda text, folder: text[: len(text) // 2]], [], r"corpus/manifest.json is not valid JSON"),
    "vocab_size below the ids": ([with_vocab_size(200)], [],
                                 r"corpus/manifest.json: shard train-000000.tar holds token id 299, outside vocab_size 200"),
    "vocab_size above the tokenizer": ([with_vocab_size(1000)], [],
                                       r"vocab_size 1000 is not the size of its tokenizer .*tokenizer.json \(300 ids\)"),
    "old manifest, ids past vocab_size": ([with_vocab_size(200, keep_max_ids=False, keep_tokenizer=False)], [],
                                          r"(train|validation)-00000\d.tar holds token id 29\d, outside the manifest's vocab_size 200"),
}


def corrupt_every_shard(text: str, folder: Path) -> str:
    for shard in folder.glob("*.tar"):
        shard.write_bytes(b"\0" * shard.stat().st_size)  # same size, no tar inside
    return text


MORE_CASES = {  # issue 22: each was a traceback or a 60-line usage dump
    "val_check_interval negative": ([], ["--trainer.val_check_interval=-3"], r"invalid value -3 for val_check_interval"),
    "max_steps not a number": ([], ["--trainer.max_steps=abc"], r"trainer.max_steps=abc is not valid: expected int"),
    "precision unknown": ([], ["--trainer.precision=banana"], r"trainer.precision=banana is not valid: expected .*bf16-mixed"),
    "every shard corrupt": ([corrupt_every_shard], ["--trainer.limit_val_batches=0"],
                            r"data.train_shards: every one of the 7 training shards of .*manifest.json is corrupt"),
}


@pytest.mark.parametrize("case", [*CASES, *MORE_CASES])
def test_bad_input_is_one_line_naming_it_before_any_step(tmp_path, text_corpus, capsys, case):
    edits, extra, message = {**CASES, **MORE_CASES}[case]
    corpus = edited_corpus(text_corpus, tmp_path, edits[0]) if edits else text_corpus
    with pytest.raises(SystemExit) as stopped:
        cli_main(fit_args(tmp_path / "run", corpus, *extra))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), last
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # no step was trained, nothing saved


@pytest.mark.parametrize("content, what", [("- trainer\n- model\n", "a YAML list"), ("", "empty")])
def test_a_config_that_is_not_a_mapping_is_one_line(tmp_path, capsys, content, what):
    config = tmp_path / "config.yaml"
    config.write_text(content)
    with pytest.raises(SystemExit) as stopped:
        cli_main(["fit", "--config", str(config)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.strip() == (f"error: --config {config} is {what}, not a mapping of trainer / "
                                                       "model / data settings (a run's config.yaml is one)")


def test_default_root_dir_that_is_a_file_is_one_line_and_left_alone(tmp_path, text_corpus, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    with pytest.raises(SystemExit) as stopped:
        cli_main(fit_args(target, text_corpus))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: trainer.default_root_dir={target} is a file; give a folder for the "
                                            "run's logs and checkpoints")
    assert target.read_text() == "mine\n"


def test_generate_with_a_tokenizer_that_is_not_json_and_export_onto_a_file_are_one_line(trained_checkpoint, tmp_path,
                                                                                        capsys):
    checkpoint = trained_checkpoint("dense")
    capsys.readouterr()  # the training run's output
    not_json = tmp_path / "tokenizer.json"
    not_json.write_text("x: [1\n")
    existing = tmp_path / "model"
    existing.write_text("mine\n")
    for args, message, warned in (
            (["generate", "--checkpoint", str(checkpoint), "--tokenizer", str(not_json), "--allow-tokenizer-change",
              "--max-new-tokens", "2"], f"error: tokenizer file {not_json} is not a tokenizers JSON (", UserWarning),
            (["export", "--checkpoint", str(checkpoint), "--out", str(existing)],
             f"error: --out {existing} is a file; export writes a folder", None)):
        # The allowed tokenizer change is a warning (pytest's to record), not a second line of the error.
        with pytest.raises(SystemExit) as stopped, (pytest.warns(warned) if warned else contextlib.nullcontext()):
            cli_main(args)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(message), err
    assert existing.read_text() == "mine\n"
