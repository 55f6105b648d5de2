"""Checkpoint files: damaged ones (flipped bits, truncated, empty, not a checkpoint) are refused on every load path
with one line naming the file; last.ckpt links fall back to hard links and copies; the resume search skips damage."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lit_overtok.checkpointing import files as checkpoint_files
from lit_overtok.checkpointing.files import (
    CheckpointError,
    find_resume_checkpoint,
    link_atomically,
    load_verified,
    resolve_ckpt_path,
    verify_checkpoint,
)
from lit_overtok.checkpointing.inference import load_transformer
from lit_overtok.cli.main import main as cli_main
from lit_overtok.data.cfg_datamodule import CFGDataModule
from lit_overtok.training.lightning_module import OverTokLM
from lit_overtok.nn.config import ModelConfig
from lit_overtok.checkpointing.run_checkpoint import RunCheckpoint


def flip_bytes_in_a_weight(path: Path, count: int = 4000) -> None:
    """Invert ``count`` bytes in the middle of the largest tensor's bytes: the file still loads with torch."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        largest = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[largest.header_offset + 26:largest.header_offset + 30])
    start = largest.header_offset + 30 + name_length + extra_length + largest.file_size // 2 - count // 2
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A grammar run's checkpoints (steps 1, 2, 3), written by RunCheckpoint through AtomicCheckpointIO."""
    root = tmp_path_factory.mktemp("trained")
    callback = RunCheckpoint(dirpath=root / "version_0" / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(max_steps=3, logger=False, callbacks=[callback], enable_progress_bar=False,
                         limit_val_batches=0, use_distributed_sampler=False, enable_model_summary=False,
                         plugins=[checkpoint_files.AtomicCheckpointIO()])
    trainer.fit(OverTokLM(model_config=ModelConfig(preset="tiny", max_seq_len=1024), vocab_size=7),
                CFGDataModule(seq_len=32, batch_size=2, val_sentences=4))
    return root


def copy_run(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "run", symlinks=True)
    return tmp_path / "run" / "version_0" / "checkpoints"


DAMAGE = {
    "flipped": (flip_bytes_in_a_weight, "do not match the CRC-32"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a complete checkpoint"),
    "empty": (lambda p: p.write_bytes(b""), r"0 bytes: empty"),
    "text": (lambda p: p.write_text("weights: none\n"), "not a complete checkpoint"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_checkpoints_are_refused_naming_the_file(trained, tmp_path, kind):
    path = copy_run(trained, tmp_path) / "epoch=0-step=2.ckpt"
    if kind == "flipped":
        before = torch.load(path, weights_only=False)["state_dict"]
    damage, message = DAMAGE[kind]
    damage(path)
    if kind == "flipped":  # torch alone loads the damaged weights without a word
        after = torch.load(path, weights_only=False)["state_dict"]
        assert any(not torch.equal(before[k], after[k]) for k in before)
    for check in (verify_checkpoint, load_verified):
        with pytest.raises(CheckpointError, match=message) as error:
            check(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_inference_readers_refuse_a_flipped_checkpoint(trained, tmp_path, capsys):
    """export, generate, the lm-eval model (load_transformer) and strip read through the same CRC check."""
    path = copy_run(trained, tmp_path) / "epoch=0-step=2.ckpt"
    flip_bytes_in_a_weight(path)
    with pytest.raises(CheckpointError, match="do not match the CRC-32"):
        load_transformer(path)
    with pytest.raises(SystemExit) as stopped:
        cli_main(["strip", "--checkpoint", str(path), "--out", str(tmp_path / "small.ckpt")])
    assert stopped.value.code == 2 and "do not match the CRC-32" in capsys.readouterr().err
    assert not (tmp_path / "small.ckpt").exists()


def test_lightning_resume_from_a_flipped_checkpoint_stops_with_one_line(trained, tmp_path, capsys):
    path = copy_run(trained, tmp_path) / "epoch=0-step=2.ckpt"
    flip_bytes_in_a_weight(path)
    with pytest.raises(SystemExit) as stopped:
        cli_main(["fit", f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=4",
                  "--trainer.enable_progress_bar=false", "--model.init_args.model_config.preset=tiny",
                  "--data.init_args.seq_len=32", "--data.init_args.batch_size=2", f"--ckpt_path={path}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: {path} is damaged") and "Traceback" not in err


def test_last_ckpt_is_a_link_to_the_newest_step_and_falls_back_to_hard_links_and_copies(trained, tmp_path,
                                                                                      monkeypatch):
    folder = copy_run(trained, tmp_path)
    assert os.readlink(folder / "last.ckpt") == "epoch=0-step=3.ckpt"
    target, link = folder / "epoch=0-step=2.ckpt", tmp_path / "last.ckpt"

    def refuse(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", refuse)
    assert link_atomically(target, link) == "hardlink"
    assert os.path.samefile(link, target) and not link.is_symlink()
    monkeypatch.setattr(os, "link", refuse)
    assert link_atomically(target, link) == "copy"
    assert link.read_bytes() == target.read_bytes() and not os.path.samefile(link, target)
    verify_checkpoint(link)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_resume_search_takes_the_newest_sound_checkpoint_of_the_latest_run(trained, tmp_path):
    folder = copy_run(trained, tmp_path)
    assert find_resume_checkpoint(tmp_path / "run") == folder / "epoch=0-step=3.ckpt"
    flip_bytes_in_a_weight(folder / "epoch=0-step=3.ckpt")
    with pytest.warns(UserWarning, match="skipping it for resume: .*step=3.ckpt is damaged"):
        assert find_resume_checkpoint(tmp_path / "run") == folder / "epoch=0-step=2.ckpt"
    (tmp_path / "run" / "version_1" / "checkpoints").mkdir(parents=True)  # a later run that saved nothing yet
    with pytest.warns(UserWarning):
        assert resolve_ckpt_path("auto", tmp_path / "run") == str(folder / "epoch=0-step=2.ckpt")
    assert resolve_ckpt_path("auto", tmp_path / "elsewhere") is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_ckpt_path(str(tmp_path / "run" / "version_1"), tmp_path / "run")
