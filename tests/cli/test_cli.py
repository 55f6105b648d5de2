"""The training CLI's edges, through ``train.py``'s main: one-line errors naming the nearest valid key, field help at
every level, the resolved model in ``--print_config``, the optimizer that cannot be replaced, ``test`` on the
held-out split, and the commands beside Lightning's."""

from __future__ import annotations

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_overtok.cli.main import main as cli_main
from lit_overtok.nn.config import ModelConfig


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


@pytest.mark.parametrize("args, expected", [
    (["fit", "--model.init_args.model_config.d_modle", "64"], ("ModelConfig has no field 'd_modle'", "'d_model'")),
    (["fit", "--model.model_config.d_modle=64"], ("ModelConfig has no field 'd_modle'", "'d_model'")),
    (["fit", "--model.init_args.model_config.over_encoding", '{"m": 97, "nn": 3}'],
     ("OverEncodingConfig has no field 'nn'", "'n'")),
    (["fit", "--model.init_args.optimizer.lrr", "1e-3"], ("OptimizerConfig has no field 'lrr'", "'lr'")),
    (["fit", "--data.init_args.seq_lne", "64"], ("CFGDataModule has no argument 'seq_lne'", "'seq_len'")),
    (["fit", "--trainer.max_stepz", "5"], ("Trainer has no argument 'max_stepz'", "'max_steps'")),
])
def test_an_unknown_key_is_one_line_with_the_nearest_valid_name(args, expected, capsys):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err


def test_an_unknown_key_in_a_config_file_is_one_line_naming_the_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  init_args:\n    model_config:\n      preset: tiny\n      n_layr: 3\n")
    code, _, err = run_cli(["fit", "--config", str(config)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(config) in err and "model.init_args.model_config.n_layr" in err and "'n_layer'" in err


def test_a_missing_config_file_is_one_line_naming_it(tmp_path, capsys):
    code, _, err = run_cli(["fit", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: --config {tmp_path / 'nope.yaml'}: no such file (a YAML "
                                                      "config, e.g. a run's config.yaml)"]


@pytest.mark.parametrize("args", [["fit", "--optimizer", "SGD"], ["fit", "--optimizer.class_path=torch.optim.SGD"],
                                  ["fit", "--lr_scheduler", "StepLR"]])
def test_the_models_optimizer_cannot_be_replaced_from_the_command_line(args, capsys):
    code, _, err = run_cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model.init_args.optimizer" in err


def test_the_models_optimizer_cannot_be_replaced_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("optimizer:\n  class_path: torch.optim.SGD\n  init_args:\n    lr: 0.1\n")
    code, _, err = run_cli(["fit", "--config", str(config)], capsys)
    assert code == 2 and str(config) in err and "model.init_args.optimizer" in err


def test_field_help_lists_every_model_config_field_with_its_documentation(capsys):
    code, out, _ = run_cli(["fit", "--model.init_args.model_config.help"], capsys)
    assert code == 0
    for field in ("preset", "d_model", "n_layer", "over_encoding", "moe", "multi_token", "tie_embeddings"):
        assert f"--model.init_args.model_config.{field}" in out
    assert "(MoE) recipe, with pluggable input embedding and output heads." in out.splitlines()[0]  # the class's
    assert "Share the 1-gram input table with the output head." in out  # the field's docstring
    assert "cfg-small: n_layer=12" in out  # and the presets the null fields come from
    code, out, _ = run_cli(["fit", "--model.init_args.model_config.over_encoding.help"], capsys)
    assert code == 0 and "--model.init_args.model_config.over_encoding.m" in out and "Rows of the first" in out
    code, out, _ = run_cli(["fit", "--model.init_args.optimizer.help"], capsys)
    assert code == 0 and "--model.init_args.optimizer.warmup_steps" in out


@pytest.mark.parametrize("preset", ["cfg-small", "moe-tiny"])
def test_print_config_shows_the_resolved_model_and_reruns_to_the_same_model(preset, tmp_path, capsys):
    code, out, _ = run_cli(["fit", f"--model.init_args.model_config.preset={preset}", "--print_config"], capsys)
    assert code == 0
    printed = yaml.safe_load(out)
    model_config = printed["model"]["init_args"]["model_config"]
    assert all(model_config[field] is not None for field in ("n_layer", "d_model", "n_head", "d_ff", "max_seq_len"))
    if preset == "moe-tiny":
        assert model_config["moe"]["num_experts"] == 4 and model_config["moe"]["expert_d_ff"] == 16
    # The printed config is a config: run through --print_config again, it resolves to itself.
    config = tmp_path / "printed.yaml"
    config.write_text(out)
    code, again, _ = run_cli(["fit", "--config", str(config), "--print_config"], capsys)
    assert code == 0 and yaml.safe_load(again)["model"] == printed["model"]
    assert ModelConfig(**model_config) == ModelConfig(preset=preset)


def test_predict_is_one_line_pointing_to_generate_and_help_lists_every_command(capsys):
    code, _, err = run_cli(["predict"], capsys)
    assert code == 2 and "train.py generate" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    assert "{fit,validate,test,generate,export,strip}" in out  # predict is not offered
    code, out, _ = run_cli(["generate", "--help"], capsys)
    assert code == 0 and "--checkpoint" in out


def test_test_scores_the_held_out_split_with_the_validation_metrics(tmp_path, capsys):
    root = tmp_path / "run"
    fit = ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar=false",
           "--model.init_args.model_config.preset=tiny", "--data.init_args.seq_len=32", "--data.init_args.batch_size=2",
           "--data.init_args.val_sentences=2", "--data.init_args.test_sentences=6", "--trainer.limit_val_batches=1"]
    cli_main(["fit", "--trainer.max_steps=3", "--trainer.val_check_interval=3", *fit])
    run = root / "version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["model_config"]["n_layer"] == 2
    config = (run / "config.yaml").read_text()
    for stage in ("validate", "test"):  # logged into the run they evaluate, not a new version_N beside it
        cli_main([stage, "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert sorted(p.name for p in root.iterdir()) == ["version_0"] and (run / "config.yaml").read_text() == config
    assert EventAccumulator(str(run / "validate")).Reload().Scalars("val/loss")[0].step == 3
    events = EventAccumulator(str(run / "test"))
    events.Reload()
    [test_loss] = events.Scalars("test/loss")
    assert test_loss.step == 3  # the checkpoint's optimizer step, the axis of every tag
    assert "test/ppl" in events.Tags()["scalars"]
    # The same number straight from the checkpoint's weights on the data module's test split (6 sentences).
    from lit_overtok.checkpointing.inference import load_transformer
    from lit_overtok.data.cfg_datamodule import CFGDataModule
    from lit_overtok.nn.losses import IGNORE_INDEX

    model, _ = load_transformer(run / "checkpoints" / "last.ckpt")
    data = CFGDataModule(seq_len=32, batch_size=2, val_sentences=2, test_sentences=6)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.test_dataloader():
            logits = model(batch["input_ids"]).flatten(0, 1)
            total += torch.nn.functional.cross_entropy(logits, batch["labels"].flatten(), reduction="sum",
                                                       ignore_index=IGNORE_INDEX).item()
            count += int((batch["labels"] != IGNORE_INDEX).sum())
    assert test_loss.value == pytest.approx(total / count, rel=1e-5)
    validation = data.val_dataloader().dataset.input_ids_NT
    assert not any(torch.equal(row, validation[0]) for row in data.test_dataloader().dataset.input_ids_NT)


def test_test_without_a_test_split_says_how_to_make_one(text_corpus, tmp_path, capsys):
    """``prepare`` without ``--test`` writes no test split: ``train.py test`` says which command writes one."""
    data = ["--data=lit_overtok.data.webdataset_datamodule.WebDatasetDataModule",
            f"--data.init_args.train_shards={text_corpus}", "--data.init_args.seq_len=16",
            "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.val_batches=1",
            "--model.init_args.model_config.preset=tiny", f"--trainer.default_root_dir={tmp_path}"]
    code, _, err = run_cli(["test", *data], capsys)
    [line] = [line for line in err.splitlines() if line.startswith("error:")]  # under pytest Lightning warns first
    assert code == 2 and "lists no 'test' shards" in line and "prepare" in line and "--test FILES --overwrite" in line
