"""What ``train.py fit`` prints when it ends: what happened, where to look, what to try next.

A newcomer's first run ends with a few lines rather than a scrolled-away progress bar: steps, tokens and time; the
final training and validation losses beside the loss of a uniform guess (so "0.98" means something); the last
in-training evaluation; where the TensorBoard logs, the exact config and the checkpoint are; and the next commands
(score, sample and export the checkpoint; on grammar data without Over-Encoding, train its OE twin and measure the
speedup). Printed by the CLI on rank 0 after ``fit`` returns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl

from lit_overtok.training.lm_eval_callback import LMEvalCallback


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _last_checkpoint(trainer: pl.Trainer) -> Optional[str]:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    return path if path and Path(path).exists() else None  # a sharded checkpoint is a folder


def run_summary(trainer: pl.Trainer, seconds: float, config_path: Optional[str] = None,
                log_dir: Optional[str] = None) -> str:
    """The end-of-fit report (several lines, no trailing newline). ``log_dir``: ``trainer.log_dir``, which the caller
    reads on every rank (under DDP it is a broadcast from rank 0, so rank 0 alone cannot ask for it)."""
    module = trainer.lightning_module
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
    tokens = getattr(module, "tokens_seen", 0)
    planned = f" of {trainer.max_steps}" if 0 < trainer.max_steps != trainer.global_step else ""
    lines = [f"Training finished: {trainer.global_step}{planned} optimizer steps, {tokens / 1e6:.2f}M training "
             f"tokens, {_duration(seconds)}."]

    losses = []
    if "train/loss_next1" in metrics:
        losses.append(f"train/loss_next1 {metrics['train/loss_next1']:.3f} (last step)")
    if "val/loss" in metrics:
        losses.append(f"val/loss {metrics['val/loss']:.3f} (last validation)")
    vocab = getattr(getattr(module, "model_config", None), "vocab_size", None)
    if losses:
        uniform = f"; a uniform guess over {vocab} tokens scores {math.log(vocab):.3f}" if vocab else ""
        lines.append(f"  Losses:      {', '.join(losses)}{uniform}")
    for callback in trainer.callbacks:
        if isinstance(callback, LMEvalCallback) and callback.last_metrics:
            scores = [f"{name} {value:.3f}" for name, value in sorted(callback.last_metrics.items())
                      if name != "eval/wall_time_s"]
            lines.append(f"  Evaluation:  {', '.join(scores)} (step {callback.last_step})")

    checkpoint = _last_checkpoint(trainer)
    if trainer.logger is not None and log_dir is not None:
        lines.append(f"  Dashboards:  tensorboard --logdir {Path(log_dir).parent}   (this run: {log_dir})")
    if config_path is not None and Path(config_path).is_file():
        lines.append(f"  Config:      {config_path} (run it again with --config)")
    if checkpoint is not None:
        lines.append(f"  Checkpoint:  {checkpoint}")
        lines += _next_commands(trainer, checkpoint, config_path, log_dir)
    return "\n".join(lines)


def _next_commands(trainer: pl.Trainer, checkpoint: str, config_path: Optional[str], log_dir: Optional[str]) -> list[str]:
    grammar = getattr(trainer.datamodule, "grammar", None)
    lines = ["Next:",
             f"  score it:    python evaluation/evaluate.py --checkpoint {checkpoint} "
             f"--tasks {'grammar' if grammar is not None else 'paper'}",
             f"  sample it:   python train.py generate --checkpoint {checkpoint} --num-samples 4",
             f"  export it:   python train.py export --checkpoint {checkpoint} --out {Path(checkpoint).parent.parent / 'hf'}"
             "   (Hugging Face transformers)"]
    model_config = getattr(trainer.lightning_module, "model_config", None)
    if grammar is not None and getattr(model_config, "over_encoding", None) is None and log_dir is not None:
        # cfg3f and its kin: m = V^3 makes exact 3-gram tables, the paper's synthetic setting (docs/method.md §5).
        twin = f"{Path(log_dir).parent}_oe"
        config = f" --config {config_path}" if config_path is not None else ""
        lines += [f"  add OE:      python train.py fit{config} --model.init_args.model_config.over_encoding.m "
                  f"{grammar.vocab_size ** 3} --trainer.default_root_dir {twin}",
                  f"  speedup:     python evaluation/speedup.py --baseline {log_dir} --treatment {twin}/version_0"]
    return lines
