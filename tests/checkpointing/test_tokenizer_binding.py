"""The data's tokenizer travels with the checkpoint: resuming onto shards of another tokenizer stops unless allowed,
and every reader (evaluate, generate, export, strip, the lm-eval model, the in-training lm-eval callback) reads a
text run's checkpoint with the tokenizer recorded in it, refusing another one in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import fit_text, prepare_corpus
from lit_overtok.evaluation import score_checkpoints as evaluate
from lit_overtok.checkpointing.files import save_atomically
from lit_overtok.checkpointing.inference import read_checkpoint, strip
from lit_overtok.checkpointing.tokenizer_binding import TokenizerBinding, TokenizerMismatch
from lit_overtok.cli import export, generate
from lit_overtok.data.shards import file_sha256
from lit_overtok.data.webdataset_datamodule import WebDatasetDataModule
from lit_overtok.errors import exit_on_user_error
from lit_overtok.evaluation.lm_eval_cli import OverTokCheckpointLM
from lit_overtok.nn.config import ModelConfig
from lit_overtok.training.lightning_module import OverTokLM
from lit_overtok.training.lm_eval_callback import LMEvalCallback

OTHER_WORDS = tuple("a quick brown fox jumps over lazy dogs near riverbanks while owls hoot quietly at dusk".split())


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory, text_corpus) -> Path:
    """Shards of another 300-entry tokenizer: the same vocabulary size, other ids."""
    corpus = prepare_corpus(tmp_path_factory.mktemp("other_corpus"), OTHER_WORDS)
    assert file_sha256(corpus / "tokenizer.json") != file_sha256(text_corpus / "tokenizer.json")
    return corpus


def test_the_checkpoint_records_the_datas_tokenizer(text_run, text_corpus):
    record = torch.load(text_run, weights_only=False)["WebDatasetDataModule"]["tokenizer"]
    assert record["sha256"] == file_sha256(text_corpus / "tokenizer.json")
    assert record["file"] == str((text_corpus / "tokenizer.json").resolve())


def test_resuming_onto_another_tokenizers_shards_stops_unless_allowed(text_run, other_corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        fit_text(tmp_path / "a", other_corpus, 4, f"--ckpt_path={text_run}")
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: the checkpoint was trained on data tokenized by ") and str(other_corpus) in last
    assert "data.allow_tokenizer_change" in last

    with pytest.warns(UserWarning, match="continuing \\(data.allow_tokenizer_change\\)"):
        fit_text(tmp_path / "b", other_corpus, 4, f"--ckpt_path={text_run}",
                 "--data.init_args.allow_tokenizer_change=true")
    assert torch.load(tmp_path / "b" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_evaluate_scores_with_the_recorded_tokenizer_and_refuses_another(text_run, text_corpus, other_corpus,
                                                                         paper_data, tmp_path):
    rows = evaluate.main(["--checkpoint", str(text_run), "--tasks", "piqa", "--limit", "1", "--data-dir",
                          str(paper_data), "--output-dir", str(tmp_path / "out")])
    config = json.loads((tmp_path / "out" / "last.json").read_text())["config"]
    assert config["tokenizer"] == str((text_corpus / "tokenizer.json").resolve()) and "error" not in rows[0]

    with pytest.raises(TokenizerMismatch, match="is not the tokenizer") as refused:  # one checkpoint: the error itself
        evaluate.main(["--checkpoint", str(text_run), "--tasks", "piqa", "--tokenizer",
                       str(other_corpus / "tokenizer.json"), "--output-dir", str(tmp_path / "refused")])
    assert str(other_corpus / "tokenizer.json") in str(refused.value)


def test_a_checkpoint_without_the_record_finds_the_tokenizer_in_its_manifest(text_run, text_corpus, tmp_path):
    checkpoint = torch.load(text_run, weights_only=False)
    del checkpoint["WebDatasetDataModule"]["tokenizer"]  # as written before the tokenizer was recorded
    old = tmp_path / "old.ckpt"
    save_atomically(checkpoint, old)
    binding = TokenizerBinding.of_checkpoint(read_checkpoint(old), old)
    assert binding.resolve() == str(text_corpus / "tokenizer.json")
    other = tmp_path / "other.json"
    other.write_text((text_corpus / "tokenizer.json").read_text().replace("<|endoftext|>", "<|end|>"))
    with pytest.raises(TokenizerMismatch, match="is not the tokenizer"):
        binding.resolve(str(other))

    checkpoint["datamodule_hyper_parameters"]["train_shards"] = str(tmp_path / "moved")  # no manifest to read
    save_atomically(checkpoint, old)
    with pytest.raises(TokenizerMismatch, match="names no tokenizer"):
        TokenizerBinding.of_checkpoint(read_checkpoint(old), old).resolve()


def test_generate_the_lm_eval_model_and_strip_read_a_text_run_with_its_recorded_tokenizer(text_run, text_corpus,
                                                                                          tmp_path):
    """Before the binding, generate and the lm-eval model read only ``data.tokenizer`` and failed on every text
    run ("names no tokenizer"), and strip dropped the record."""
    recorded = str((text_corpus / "tokenizer.json").resolve())
    [sample] = generate.main(["--checkpoint", str(text_run), "--prompt", "the model reads", "--max-new-tokens", "3"])
    assert sample.startswith("the model reads")
    assert OverTokCheckpointLM(str(text_run), device="cpu").tokenizer_name == recorded

    stripped = strip(text_run, tmp_path / "model.ckpt")
    assert torch.load(stripped, weights_only=False)["tokenizer"]["sha256"] == file_sha256(recorded)
    [sample] = generate.main(["--checkpoint", str(stripped), "--prompt", "the model reads", "--max-new-tokens", "3"])
    assert sample.startswith("the model reads")


@pytest.mark.parametrize("reader", ["evaluate", "generate", "export"])
def test_every_reader_refuses_another_tokenizer_in_one_line_unless_allowed(reader, text_run, other_corpus, tmp_path,
                                                                           capsys):
    other = str(other_corpus / "tokenizer.json")
    main, argv = {
        "evaluate": (evaluate.main, ["--tasks", "piqa", "--output-dir", str(tmp_path / "eval")]),
        "generate": (generate.main, ["--max-new-tokens", "2"]),
        "export": (export.main, ["--out", str(tmp_path / "hf")]),
    }[reader]
    argv = ["--checkpoint", str(text_run), "--tokenizer", other, *argv]
    with pytest.raises(SystemExit) as stopped:
        exit_on_user_error(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and "is not the tokenizer" in err[0] and other in err[0], err
    if reader == "generate":
        with pytest.warns(UserWarning, match="allow_tokenizer_change"):
            assert len(generate.main(argv + ["--allow-tokenizer-change"])) == 1


def test_a_grammar_run_is_bound_to_its_grammar(trained_checkpoint, text_corpus, capsys):
    checkpoint = str(trained_checkpoint("dense"))
    assert generate.main(["--checkpoint", checkpoint, "--tokenizer", "grammar:cfg3f", "--max-new-tokens", "2"])
    with pytest.raises(SystemExit):
        exit_on_user_error(generate.main, ["--checkpoint", checkpoint, "--tokenizer",
                                           str(text_corpus / "tokenizer.json")])
    assert "trained with (grammar:cfg3f)" in capsys.readouterr().err


def callback_fit(tmp_path: Path, corpus: Path, callback: LMEvalCallback) -> None:
    data = WebDatasetDataModule(str(corpus), seq_len=16, batch_size=2, num_workers=0, val_batches=1)
    module = OverTokLM(model_config=ModelConfig(preset="tiny"), vocab_size=data.vocab_size)
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[callback], enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, use_distributed_sampler=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)


def test_the_lm_eval_callback_scores_a_text_run_with_its_datas_tokenizer(text_corpus, other_corpus, paper_data,
                                                                         tmp_path):
    """Before the binding, a text run's callback needed ``tokenizer=`` and took any file it was given."""
    callback = LMEvalCallback(tasks=["piqa"], every_n_steps=1, limit=1, data_dir=str(paper_data))
    callback_fit(tmp_path, text_corpus, callback)
    assert callback.tokenizer.name == str((text_corpus / "tokenizer.json").resolve())
    assert "eval/piqa/acc" in callback.last_metrics
    with pytest.raises(TokenizerMismatch, match="LMEvalCallback tokenizer="):
        callback_fit(tmp_path, text_corpus, LMEvalCallback(tasks=["piqa"], data_dir=str(paper_data),
                                                           tokenizer=str(other_corpus / "tokenizer.json")))


def test_a_tokenizer_changed_on_disk_since_training_is_refused(text_run, tmp_path):
    checkpoint = torch.load(text_run, weights_only=False)
    copy = tmp_path / "tokenizer.json"
    copy.write_text(Path(checkpoint["WebDatasetDataModule"]["tokenizer"]["file"]).read_text() + "\n")
    checkpoint["WebDatasetDataModule"]["tokenizer"]["file"] = str(copy)
    moved = tmp_path / "moved.ckpt"
    save_atomically(checkpoint, moved)
    with pytest.raises(TokenizerMismatch, match="changed since"):
        TokenizerBinding.of_checkpoint(read_checkpoint(moved), moved).resolve()
    os.remove(copy)
    with pytest.raises(TokenizerMismatch, match="does not exist any more"):
        TokenizerBinding.of_checkpoint(read_checkpoint(moved), moved).resolve()


def test_engram_refuses_a_tokenizer_other_than_the_datas(tmp_path, text_corpus, other_corpus, capsys):
    # Engram's compressed ids built from another tokenizer would merge the wrong ids, silently.
    engram = f'{{"layers": [1], "table_size": 31, "heads": 2, "ngram_width": 8, "tokenizer": "{other_corpus / "tokenizer.json"}"}}'
    with pytest.raises(SystemExit):
        fit_text(tmp_path / "wrong", text_corpus, 1, f"--model.init_args.model_config.engram={engram}")
    assert "model_config.engram.tokenizer" in capsys.readouterr().err
    fit_text(tmp_path / "right", text_corpus, 1, "--model.init_args.model_config.engram=" + engram.replace(
        str(other_corpus), str(text_corpus)))
    assert (tmp_path / "right" / "version_0" / "checkpoints" / "last.ckpt").is_file()
