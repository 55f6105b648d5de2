"""evaluation/evaluate.py on real Lightning checkpoints: results files, the summary, tokenizer inference."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_overtok.evaluation import score_checkpoints as evaluate
from lit_overtok.nn.config import ModelConfig
from lit_overtok.data.cfg_datamodule import CFGDataModule
from lit_overtok.evaluation.runner import PAPER_TASKS, task_scores, TaskSuite
from lit_overtok.evaluation.tokenizers import TextTokenizer
from lit_overtok.training.lightning_module import OverTokLM
from lit_overtok.evaluation.adapter import OverTokEvalLM
from tests.fixtures import TEXT_VOCAB


def train(tmp_path: Path, max_steps: int, **model) -> Path:
    module = OverTokLM(model_config=ModelConfig(preset="tiny", **model),
                       vocab_size=None if "vocab_size" in model else 7)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(max_steps=max_steps, logger=False, callbacks=[checkpoints], enable_progress_bar=False,
                         limit_val_batches=0, use_distributed_sampler=False, enable_model_summary=False)
    trainer.fit(module, CFGDataModule(seq_len=32, batch_size=2, val_sentences=4))
    return tmp_path / "checkpoints"


def test_scores_a_text_checkpoint_on_the_five_paper_tasks(tmp_path, paper_data, text_tokenizer):
    [checkpoint] = train(tmp_path, 1, vocab_size=TEXT_VOCAB).glob("*.ckpt")
    out = tmp_path / "out"
    # A model of the tokenizer's vocabulary trained on grammar ids: only the vocabulary matters, so the change is
    # allowed.
    rows = evaluate.main(["--checkpoint", str(checkpoint), "--tasks", "paper", "--limit", "2", "--data-dir",
                          str(paper_data), "--tokenizer", str(text_tokenizer), "--allow-tokenizer-change",
                          "--output-dir", str(out)])
    results = json.loads((out / f"{checkpoint.stem}.json").read_text())
    assert set(PAPER_TASKS) <= set(results["results"])
    assert results["config"]["checkpoint"] == str(checkpoint) and results["config"]["global_step"] == 1
    assert results["config"]["tokens_seen"] == 64 and results["n-samples"]["piqa"]["effective"] == 2
    # The script's numbers are those of the checkpoint's weights, scored directly.
    module, _ = evaluate.load_checkpoint(checkpoint, "cpu")
    direct = TaskSuite(["paper"], data_dir=str(paper_data), subset=2).evaluate(
        OverTokEvalLM(module, TextTokenizer(text_tokenizer), progress=False))
    assert task_scores(results, PAPER_TASKS) == task_scores(direct, PAPER_TASKS) == rows[0]["scores"]
    assert results["downstream"] == pytest.approx(rows[0]["downstream"])
    assert "|piqa" in (out / f"{checkpoint.stem}.md").read_text().replace(" ", "")
    assert "downstream" in (out / "summary.md").read_text()


def test_limit_draws_from_every_subject_not_the_first_questions(tmp_path):
    """mmlu_var lists each question's 7 variants question by question, subject by subject: the first 14 documents
    would be 2 questions of one subject. --limit takes the fixed random subset the in-training evaluation uses."""
    data_dir = tmp_path / "data"
    (data_dir / "mmlu").mkdir(parents=True)
    subjects = ("abstract_algebra", "anatomy", "astronomy")
    rows = {split: [{"question": f"{split} question {i} about {s}?", "subject": s, "choices": ["a", "b", "c", "d"],
                     "answer": i % 4} for s in subjects for i in range(4 if split == "validation" else 5)]
            for split in ("validation", "dev")}
    for split, split_rows in rows.items():
        (data_dir / "mmlu" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in split_rows))
    args = evaluate.parse_args(["--checkpoint", "x.ckpt", "--tasks", "mmlu_var", "--limit", "14",
                                "--data-dir", str(data_dir)])
    docs = evaluate.task_suite(args, None).task_dict["tasks"]["mmlu_var"].eval_docs
    assert len(docs) == 14 and {doc["subject"] for doc in docs} == set(subjects)
    assert len({doc["query"] for doc in docs}) == 14 and len({doc["variant"] for doc in docs}) > 1


def test_scores_a_glob_of_grammar_checkpoints_with_the_tokenizer_the_run_used(tmp_path):
    folder = train(tmp_path, 2, max_seq_len=1024)
    out = tmp_path / "out"
    rows = evaluate.main(["--checkpoint", str(folder / "*.ckpt"), "--tasks", "grammar", "--cfg-num-docs", "4",
                          "--output-dir", str(out)])
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert set(row["scores"]) == {"cfg_generation", "cfg_next_token_validity"}
        config = json.loads((out / f"{row['name']}.json").read_text())["config"]
        assert config["tokenizer"] == "grammar:cfg3f"
    summary = (out / "summary.md").read_text().splitlines()
    assert len(summary) == 4 and summary[0].startswith("| checkpoint | step | tokens | cfg_generation acc")


def test_a_glob_that_matches_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        evaluate.main(["--checkpoint", str(tmp_path / "*.ckpt")])


def test_a_damaged_checkpoint_among_several_is_reported_and_the_rest_are_scored(tmp_path, capsys):
    folder = train(tmp_path, 3, max_seq_len=1024)
    damaged = folder / "epoch=0-step=2.ckpt"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # what a full disk left behind before writes were atomic
    (folder / "last.ckpt").symlink_to("epoch=0-step=3.ckpt")  # the same checkpoint as step 3: scored once
    (folder / "removed.ckpt").symlink_to("epoch=0-step=0.ckpt")  # a link whose file was deleted
    out = tmp_path / "out"
    rows = evaluate.main(["--checkpoint", str(folder / "*.ckpt"), "--tasks", "cfg_next_token_validity",
                          "--cfg-num-docs", "4", "--output-dir", str(out)])
    assert [(row["name"], row.get("step")) for row in rows] == [
        ("epoch=0-step=1", 1), ("epoch=0-step=2", None), ("epoch=0-step=3", 3), ("removed", None)]
    assert rows[1]["error"].startswith(f"{damaged} is not a complete checkpoint")
    assert rows[3]["error"] == f"checkpoint {folder / 'removed.ckpt'} does not exist (a link to a removed file)"
    err = capsys.readouterr().err
    assert f"skipping {damaged}: " in err and f"skipping {folder / 'removed.ckpt'}: " in err
    summary = (out / "summary.md").read_text()
    assert "| epoch=0-step=2 | skipped: " in summary and "| removed | skipped: " in summary
    assert summary.count("\n") == 6
    assert sorted(p.name for p in out.glob("*.json")) == ["epoch=0-step=1.json", "epoch=0-step=3.json"]
