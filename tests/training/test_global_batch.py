"""A config's global batch (sequences or tokens per optimizer step) becomes gradient accumulation at start, through
the real CLI: the tokens trained per step are the same on one process and on two, and a global batch the hardware
cannot make stops with one line naming the fields."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule

from lit_overtok.cli.main import DEFAULT_TRAINER, OverTokCLI
from lit_overtok.cli.main import main as cli_main
from lit_overtok.training.lightning_module import OverTokLM

SEQ_LEN, PER_DEVICE, SEQUENCES, STEPS = 16, 2, 8, 3


def tiny_run(root: Path, *extra: str) -> list[str]:
    return [
        "fit", f"--trainer.default_root_dir={root}", f"--trainer.max_steps={STEPS}", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu", "--model.init_args.model_config.preset=tiny", f"--data.init_args.seq_len={SEQ_LEN}",
        f"--data.init_args.batch_size={PER_DEVICE}", "--data.init_args.val_sentences=2", *extra,
    ]


def last_checkpoint(root: Path) -> dict:
    (path,) = root.glob("version_*/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


def built_trainer(root: Path, *extra: str):
    """The trainer the CLI builds (nothing runs; building claims a run folder under ``root``)."""
    return OverTokCLI(OverTokLM, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      trainer_defaults=DEFAULT_TRAINER, run=False, args=tiny_run(root, *extra)[1:]).trainer


@pytest.mark.parametrize("devices", [1, 2], ids=["one_process", "two_gloo_ranks"])
def test_each_optimizer_step_trains_the_global_batch_whatever_the_processes(tmp_path, devices):
    strategy = ["--trainer.strategy=ddp_fork"] if devices > 1 else []
    cli_main(tiny_run(tmp_path, f"--trainer.devices={devices}", *strategy, f"--global_batch.sequences={SEQUENCES}"))
    checkpoint = last_checkpoint(tmp_path)
    assert checkpoint["global_step"] == STEPS
    assert checkpoint["tokens_seen"] == STEPS * SEQUENCES * SEQ_LEN  # 8 sequences of 16 tokens per optimizer step
    # val_check_interval counts optimizer steps: validation ran once, after step 2 (not after micro-batch 2).
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]["completed"] == 1


@pytest.mark.parametrize(("devices", "accumulation"), [("auto", 4), (1, 4), ("2", 2), (2, 2)],
                         ids=["auto", "int_1", "string_2", "int_2"])
def test_accumulation_follows_devices_given_as_auto_int_or_string(tmp_path, devices, accumulation):
    strategy = ["--trainer.strategy=ddp_fork"] if str(devices) == "2" else []
    trainer = built_trainer(tmp_path, f"--trainer.devices={devices}", *strategy, f"--global_batch.sequences={SEQUENCES}")
    assert trainer.accumulate_grad_batches == accumulation
    assert trainer.val_check_interval == 2 * accumulation  # micro-batches, for 2 optimizer steps


def test_global_batch_in_tokens(tmp_path):
    trainer = built_trainer(tmp_path, f"--global_batch.tokens={SEQUENCES * SEQ_LEN}")
    assert trainer.accumulate_grad_batches == SEQUENCES // PER_DEVICE


def test_without_a_global_batch_the_trainer_is_left_alone(tmp_path):
    trainer = built_trainer(tmp_path, "--trainer.accumulate_grad_batches=3")
    assert (trainer.accumulate_grad_batches, trainer.val_check_interval) == (3, 2)


@pytest.mark.parametrize(("extra", "expected"), [
    (["--global_batch.sequences=7"], "global_batch.sequences gives 7 sequences per step, not a multiple of "
                                     "trainer.devices × trainer.num_nodes × data.batch_size = 1 × 1 × 2 = 2; "
                                     "valid data.batch_size values with 1 rank: 1, 7"),
    (["--global_batch.tokens=100"], "global_batch.tokens=100 is not a multiple of data.seq_len=16"),
    (["--global_batch.sequences=8", "--trainer.accumulate_grad_batches=2"],
     "trainer.accumulate_grad_batches=2 contradicts global_batch, which needs 4 here"),
    (["--global_batch.sequences=8", "--global_batch.tokens=128"], "give exactly one of global_batch.sequences"),
])
def test_a_global_batch_the_hardware_cannot_make_is_one_error_line(tmp_path, capsys, extra, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(tiny_run(tmp_path, *extra))
    assert exit_info.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and expected in err_lines[0], err_lines
    assert not list(tmp_path.glob("version_*/checkpoints"))  # stopped before training
