"""Real Lightning training on the cfg3f grammar: loss falls, seeds reproduce, checkpoints reload, the CLI runs."""

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_overtok.cli.main import main as cli_main
from lit_overtok.nn.config import ModelConfig
from lit_overtok.data.cfg_datamodule import CFGDataModule
from lit_overtok.training.lightning_module import OverTokLM
from lit_overtok.optim.config import OptimizerConfig
from lit_overtok.optim.groups import parameter_groups
from lit_overtok.optim.schedule import warmup_cosine


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit_small(tmp_path: Path, steps: int, seed: int = 0, precision: str = "32-true", **model_overrides):
    pl.seed_everything(seed, verbose=False)
    data = CFGDataModule(seq_len=64, batch_size=8, seed=seed, val_sentences=8)
    module = OverTokLM(
        model_config=ModelConfig(preset="tiny", d_model=64, n_head=2, d_ff=128, **model_overrides),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=5),
        vocab_size=data.vocab_size,
    )
    recorder = LossRecorder()
    trainer = pl.Trainer(
        max_steps=steps, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
        limit_val_batches=0, precision=precision, gradient_clip_val=1.0, use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=data)
    return module, trainer, recorder.losses


def test_loss_falls_on_cfg3f_within_a_few_dozen_steps(tmp_path):
    _, _, losses = fit_small(tmp_path, steps=40)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert math.isclose(losses[0], math.log(7), rel_tol=0.05)  # uniform over the 7-token vocabulary at init
    assert last < first - 0.4, (first, last)


def test_same_seed_gives_identical_losses(tmp_path):
    _, _, a = fit_small(tmp_path / "a", steps=6, seed=3)
    _, _, b = fit_small(tmp_path / "b", steps=6, seed=3)
    _, _, c = fit_small(tmp_path / "c", steps=6, seed=4)
    assert a == b
    assert a != c


def test_bf16_mixed_trains_on_cpu(tmp_path):
    _, _, losses = fit_small(tmp_path, steps=12, precision="bf16-mixed")
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_checkpoint_save_and_reload_gives_identical_outputs(tmp_path):
    module, trainer, _ = fit_small(tmp_path, steps=5)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = OverTokLM.load_from_checkpoint(path)
    ids_BT = torch.randint(0, 7, (2, 32))
    module.eval()
    torch.testing.assert_close(reloaded(ids_BT), module(ids_BT), rtol=0, atol=0)
    assert reloaded.tokens_seen == module.tokens_seen == 5 * 8 * 64


def test_parameter_groups_exempt_tables_and_norms_from_weight_decay():
    module = OverTokLM(model_config=ModelConfig(preset="tiny", vocab_size=7, tie_embeddings=False))
    groups = {g["name"]: g for g in parameter_groups(module.transformer, OptimizerConfig(weight_decay=0.1))}
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert id(module.transformer.embed.wte.weight) not in decayed
    assert id(module.transformer.norm.weight) not in decayed
    assert id(module.transformer.blocks[0].attention.q_proj.weight) in decayed
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0


def test_warmup_then_cosine_schedule():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)


def test_data_vocabulary_must_agree_with_the_model():
    with pytest.raises(ValueError, match="model_config.vocab_size"):
        OverTokLM(model_config=ModelConfig(preset="tiny", vocab_size=50), vocab_size=7)


def test_cli_smoke_run_writes_tensorboard_config_and_checkpoint(tmp_path, capsys):
    root = tmp_path / "run"
    args = [
        "fit", f"--trainer.default_root_dir={root}", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--model.init_args.model_config.preset=tiny",
        "--data.init_args.seq_len=32", "--data.init_args.batch_size=2", "--data.init_args.val_sentences=2",
    ]
    cli_main(args)
    first_output = capsys.readouterr().out
    cli_main(args)  # reruns into the same root are allowed (a new version directory)
    runs = sorted(p for p in root.iterdir() if p.name.startswith("version_"))
    assert len(runs) == 2
    run = runs[0]
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/loss_next1", "train/lr", "train/tokens_seen", "val/loss", "val/ppl",
                "eval/cfg_next_token_validity/acc"):
        assert tag in tags, (tag, sorted(tags))
    acc = events.Scalars("eval/cfg_next_token_validity/acc")[-1].value
    assert 0.0 <= acc <= 1.0
    # One generation-accuracy metric: lm-eval's eval/cfg_generation/acc (skipped here: tiny's context is too short).
    assert not any(tag.startswith("val/cfg") for tag in tags)

    # The run ends by telling a newcomer what happened and what to do next, with the values in its dashboards.
    summary = first_output[first_output.index("Training finished: 4 optimizer steps, 0.00M training tokens"):]
    for tag in ("train/loss_next1", "val/loss", "eval/cfg_next_token_validity/acc"):
        assert f"{tag} {events.Scalars(tag)[-1].value:.3f}" in summary, tag
    assert f"a uniform guess over 7 tokens scores {math.log(7):.3f}" in summary
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 4  # the last step, not the last interval
    for line in (f"tensorboard --logdir {root}   (this run: {run})", f"Config:      {run / 'config.yaml'}",
                 f"Checkpoint:  {checkpoint}", f"evaluate.py --checkpoint {checkpoint} --tasks grammar",
                 f"train.py generate --checkpoint {checkpoint}", f"train.py export --checkpoint {checkpoint} --out {run / 'hf'}",
                 f"--model.init_args.model_config.over_encoding.m 343 --trainer.default_root_dir {root}_oe",
                 f"speedup.py --baseline {run} --treatment {root}_oe/version_0"):
        assert line in summary, (line, summary)


def test_cli_rejects_unknown_preset(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--trainer.default_root_dir={tmp_path}", "--model.init_args.model_config.preset=gpt-9"])
    assert "gpt-9" in capsys.readouterr().err
