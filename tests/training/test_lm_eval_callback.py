"""LMEvalCallback in real Lightning runs: the TensorBoard tags it writes (read back from the event files)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_overtok.cli.main import main as cli_main
from lit_overtok.nn.config import ModelConfig
from lit_overtok.data.cfg_datamodule import CFGDataModule
from lit_overtok.training.lm_eval_callback import LMEvalCallback
from lit_overtok.evaluation.runner import PAPER_TASKS, PRIMARY_METRICS
from lit_overtok.training.lightning_module import OverTokLM
from tests.fixtures import TEXT_VOCAB


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    [version] = [p for p in log_dir.iterdir() if p.name.startswith("version_")]
    accumulator = EventAccumulator(str(version), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def fit(tmp_path: Path, callback: LMEvalCallback, max_steps: int, **model) -> dict[str, list[tuple[int, float]]]:
    module = OverTokLM(model_config=ModelConfig(preset="tiny", **model),
                       vocab_size=None if "vocab_size" in model else 7)
    data = CFGDataModule(seq_len=32, batch_size=2, val_sentences=4)
    trainer = pl.Trainer(max_steps=max_steps, logger=TensorBoardLogger(tmp_path, name=""), callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                         use_distributed_sampler=False, log_every_n_steps=1, enable_model_summary=False)
    trainer.fit(module, data)
    return scalars(tmp_path)


def test_grammar_tasks_are_logged_against_steps_and_tokens_every_n_steps_and_at_the_end(tmp_path):
    logged = fit(tmp_path, LMEvalCallback(tasks=["grammar"], every_n_steps=2, limit=4), max_steps=3, max_seq_len=1024)
    tokens_per_step = 2 * 32
    for task in ("cfg_generation", "cfg_next_token_validity"):
        steps = [step for step, _ in logged[f"eval/{task}/acc"]]
        assert steps == [2, 3]  # every 2 steps, and at the end of fit
        assert all(0.0 <= value <= 1.0 for _, value in logged[f"eval/{task}/acc"])
        by_tokens = logged[f"eval/{task}/acc_by_tokens"]
        assert [step for step, _ in by_tokens] == [2 * tokens_per_step, 3 * tokens_per_step]
        assert [v for _, v in by_tokens] == [v for _, v in logged[f"eval/{task}/acc"]]
    assert [step for step, _ in logged["eval/wall_time_s"]] == [2, 3]
    assert all(value > 0 for _, value in logged["eval/wall_time_s"])
    assert "eval/downstream" not in logged


def test_final_tasks_are_scored_at_the_end_of_fit_only(tmp_path):
    # The default run's split: cheap next-token validity every N steps, whole generations once at the end.
    callback = LMEvalCallback(tasks=["cfg_next_token_validity"], final_tasks=["cfg_generation"], every_n_steps=2,
                              limit=4)
    logged = fit(tmp_path, callback, max_steps=4, max_seq_len=1024)
    assert [step for step, _ in logged["eval/cfg_next_token_validity/acc"]] == [2, 4]
    assert [step for step, _ in logged["eval/cfg_generation/acc"]] == [4]
    assert [step for step, _ in logged["eval/wall_time_s"]] == [2, 4]  # one evaluation per step, both suites at 4
    assert set(callback.last_metrics) >= {"eval/cfg_generation/acc", "eval/cfg_next_token_validity/acc"}


def test_paper_tasks_log_acc_acc_norm_and_the_downstream_mean(tmp_path, paper_data, text_tokenizer):
    # A model of the tokenizer's vocabulary on grammar data: only the vocabulary matters here, so the change is allowed.
    callback = LMEvalCallback(tasks=["paper"], every_n_steps=1, data_dir=str(paper_data), tokenizer=str(text_tokenizer),
                              allow_tokenizer_change=True)
    logged = fit(tmp_path / "logs", callback, max_steps=1, vocab_size=TEXT_VOCAB)
    for task in PAPER_TASKS:
        assert [step for step, _ in logged[f"eval/{task}/acc"]] == [1]
        assert [step for step, _ in logged[f"eval/{task}/acc_norm"]] == [1]
    expected = sum(logged[f"eval/{t}/{PRIMARY_METRICS[t]}"][0][1] for t in PAPER_TASKS) / 5
    assert logged["eval/downstream"] == [(1, pytest.approx(expected))]
    assert [step for step, _ in logged["eval/downstream_by_tokens"]] == [64]


def test_a_text_run_without_a_tokenizer_is_refused(tmp_path):
    callback = LMEvalCallback(tasks=["piqa"], every_n_steps=1)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False)  # no data module attached
    with pytest.raises(ValueError, match="names no tokenizer .*; pass LMEvalCallback tokenizer="):
        callback.setup(trainer, OverTokLM(model_config=ModelConfig(preset="tiny", vocab_size=7)), "fit")


@pytest.mark.parametrize("max_seq_len,tasks", [(1024, {"cfg_generation", "cfg_next_token_validity"}),
                                                (256, {"cfg_next_token_validity"})])  # 256 < cfg3f's 731
def test_the_cli_adds_the_grammar_callback_to_grammar_runs(tmp_path, max_seq_len, tasks):
    cli_main(["fit", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
              "--model.init_args.model_config.preset", "tiny", "--model.init_args.model_config.max_seq_len", str(max_seq_len),
              "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "2"])
    logged = scalars(tmp_path)
    assert {tag.split("/")[1] for tag in logged if tag.endswith("/acc")} == tasks
    assert "eval/cfg_next_token_validity/valid_mass" in logged
    for task in tasks:
        assert [step for step, _ in logged[f"eval/{task}/acc"]] == [2]  # at the end of fit (every 50 steps)
