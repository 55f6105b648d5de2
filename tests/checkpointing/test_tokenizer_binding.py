"""The data's tokenizer travels with the checkpoint: resuming onto shards of another tokenizer stops unless allowed,
and evaluate.py scores with the recorded tokenizer (or the manifest's), refusing one whose sha256 differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import prepare_corpus
from lit_overtok.evaluation import score_checkpoints as evaluate
from lit_overtok.checkpointing.files import CheckpointError, save_atomically
from lit_overtok.cli.main import main as cli_main
from lit_overtok.data.shards import file_sha256

OTHER_WORDS = tuple("a quick brown fox jumps over lazy dogs near riverbanks while owls hoot quietly at dusk".split())


def fit(root: Path, corpus: Path, steps: int, *extra: str) -> None:
    cli_main(["fit", f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}",
              "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--model.init_args.model_config.preset=tiny",
              "--data=lit_overtok.data.webdataset_datamodule.WebDatasetDataModule",
              f"--data.init_args.train_shards={corpus}", "--data.init_args.seq_len=16",
              "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.val_batches=1",
              *extra])


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory, text_corpus) -> Path:
    """Shards of another 300-entry tokenizer: the same vocabulary size, other ids."""
    corpus = prepare_corpus(tmp_path_factory.mktemp("other_corpus"), OTHER_WORDS)
    assert file_sha256(corpus / "tokenizer.json") != file_sha256(text_corpus / "tokenizer.json")
    return corpus


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_corpus) -> Path:
    root = tmp_path_factory.mktemp("run")
    fit(root, text_corpus, 2)
    return root / "version_0" / "checkpoints" / "last.ckpt"


def test_the_checkpoint_records_the_datas_tokenizer(run, text_corpus):
    record = torch.load(run, weights_only=False)["WebDatasetDataModule"]["tokenizer"]
    assert record["sha256"] == file_sha256(text_corpus / "tokenizer.json")
    assert record["file"] == str((text_corpus / "tokenizer.json").resolve())


def test_resuming_onto_another_tokenizers_shards_stops_unless_allowed(run, other_corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path / "a", other_corpus, 4, f"--ckpt_path={run}")
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: the checkpoint was trained on data tokenized by ") and str(other_corpus) in last
    assert "data.allow_tokenizer_change" in last

    with pytest.warns(UserWarning, match="continuing \\(data.allow_tokenizer_change\\)"):
        fit(tmp_path / "b", other_corpus, 4, f"--ckpt_path={run}", "--data.init_args.allow_tokenizer_change=true")
    assert torch.load(tmp_path / "b" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_evaluate_scores_with_the_recorded_tokenizer_and_refuses_another(run, text_corpus, other_corpus, paper_data,
                                                                         tmp_path):
    rows = evaluate.main(["--checkpoint", str(run), "--tasks", "piqa", "--limit", "1", "--data-dir", str(paper_data),
                          "--output-dir", str(tmp_path / "out")])
    config = json.loads((tmp_path / "out" / "last.json").read_text())["config"]
    assert config["tokenizer"] == str((text_corpus / "tokenizer.json").resolve()) and "error" not in rows[0]

    with pytest.raises(CheckpointError, match="is not the tokenizer") as refused:  # one checkpoint: the error itself
        evaluate.main(["--checkpoint", str(run), "--tasks", "piqa", "--tokenizer",
                       str(other_corpus / "tokenizer.json"), "--output-dir", str(tmp_path / "refused")])
    assert str(other_corpus / "tokenizer.json") in str(refused.value)


def test_a_checkpoint_without_the_record_finds_the_tokenizer_in_its_manifest(run, text_corpus, tmp_path):
    checkpoint = torch.load(run, weights_only=False)
    del checkpoint["WebDatasetDataModule"]["tokenizer"]  # as written before the tokenizer was recorded
    old = tmp_path / "old.ckpt"
    save_atomically(checkpoint, old)
    args = evaluate.parse_args(["--checkpoint", str(old)])
    assert evaluate.tokenizer_spec(args, evaluate.load_checkpoint(old, "cpu")[1], old) == str(
        text_corpus / "tokenizer.json")
    other = tmp_path / "other.json"
    other.write_text((text_corpus / "tokenizer.json").read_text().replace("<|endoftext|>", "<|end|>"))
    with pytest.raises(CheckpointError, match="is not the tokenizer"):
        evaluate.tokenizer_spec(evaluate.parse_args(["--checkpoint", str(old), "--tokenizer", str(other)]),
                                evaluate.load_checkpoint(old, "cpu")[1], old)

    checkpoint["datamodule_hyper_parameters"]["train_shards"] = str(tmp_path / "moved")  # no manifest to read
    save_atomically(checkpoint, old)
    with pytest.raises(ValueError, match="names no tokenizer"):
        evaluate.tokenizer_spec(args, evaluate.load_checkpoint(old, "cpu")[1], old)
