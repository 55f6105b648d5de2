"""Dicts become configs in one place, and a wrong key is one clear error that names where it is."""

import pytest

from lit_overtok.cli.main import main as cli_main
from lit_overtok.configuration import config_from
from lit_overtok.training.lightning_module import OverTokLM
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.over_encoding import OverEncodingConfig
from lit_overtok.optim.config import OptimizerConfig


def test_a_mapping_becomes_its_dataclass_and_an_instance_passes_through():
    oe = config_from(OverEncodingConfig, {"m": 343, "n": 3}, "model_config.over_encoding")
    assert oe == OverEncodingConfig(m=343, n=3)
    assert config_from(OverEncodingConfig, oe, "model_config.over_encoding") is oe


@pytest.mark.parametrize("build, where, field", [
    (lambda: ModelConfig(over_encoding={"m": 343, "nn": 3}), "model_config.over_encoding", "nn"),
    (lambda: ModelConfig(multi_token={"mode": "od", "weights": [1.0]}), "model_config.multi_token", "weights"),
    (lambda: ModelConfig(preset="moe-tiny", moe={"experts": 4}), "model_config.moe", "experts"),
    (lambda: OptimizerConfig(groups={"over_encoding": {"lr_mult": 0.5}}), "optimizer.groups.over_encoding", "lr_mult"),
    (lambda: OverTokLM(model_config={"d_modle": 64}), "model_config", "d_modle"),
    (lambda: OverTokLM(optimizer={"learning_rate": 1e-3}), "optimizer", "learning_rate"),
])
def test_unknown_fields_are_errors_naming_the_config_path_and_the_valid_fields(build, where, field):
    with pytest.raises(ValueError) as error:
        build()
    message = str(error.value)
    assert message.startswith(f"{where}: unknown field") and repr(field) in message and "valid fields are" in message


def test_a_missing_required_field_names_the_config_path():
    with pytest.raises(ValueError, match=r"^model_config.over_encoding: .*'m'"):
        ModelConfig(over_encoding={"n": 3})


@pytest.mark.parametrize("args", [
    ["fit", "--model.init_args.model.preset", "tiny"],
    ["fit", "--model.init_args.model.preset=tiny"],
    ["fit", "--model.model.d_model=64"],
])
def test_the_renamed_architecture_key_is_one_line_naming_the_new_key(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.init_args.model_config" in err


def test_the_renamed_architecture_key_in_a_config_file_is_one_line_naming_the_new_key(tmp_path, capsys):
    config = tmp_path / "old.yaml"
    config.write_text("model:\n  class_path: lit_overtok.training.lightning_module.OverTokLM\n  init_args:\n    model:\n"
                      "      preset: tiny\n")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(config) in err and "model.init_args.model_config" in err
