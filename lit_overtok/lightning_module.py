"""The LightningModule: training objective, validation metrics, optimizer and schedule for every model variant.

Logged to TensorBoard (step axis = optimizer steps; ``train/tokens_seen`` gives the token axis):
``train/loss`` (the full objective), ``train/loss_next1`` (plain next-token CE) plus any per-head parts,
``train/lr``, ``train/tokens_seen``, ``val/loss``, ``val/ppl`` and, on grammar data, ``val/cfg_gen_acc``:
the fraction of sentences sampled from BOS that the grammar accepts (the paper's generation accuracy, §3.1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric

from lit_overtok.config import ModelConfig
from lit_overtok.generation import generate
from lit_overtok.heads import IGNORE_INDEX
from lit_overtok.model import Transformer
from lit_overtok.optim import build_optimizer, OptimizerConfig


def _as_config(value: Union[dict, Any], cls: type) -> Any:
    """Accept a dataclass or its dict form (how hparams come back from a checkpoint)."""
    return cls(**value) if isinstance(value, dict) else value


class OverTokLM(pl.LightningModule):
    def __init__(
        self,
        model: Optional[ModelConfig] = None,
        optimizer: Optional[OptimizerConfig] = None,
        generation_samples: int = 64,
        generation_temperature: float = 1.0,
        vocab_size: Optional[int] = None,
    ) -> None:
        """
        Args:
            model: the architecture (preset plus overrides, input embedding, heads); None = ModelConfig().
            optimizer: AdamW, parameter groups and the warmup-cosine schedule; None = OptimizerConfig().
            generation_samples: sentences sampled from BOS at each validation to measure ``val/cfg_gen_acc``
                on grammar data (0 disables it). The paper samples from the raw distribution (temperature 1).
            generation_temperature: sampling temperature for that measurement.
            vocab_size: the data's vocabulary; the CLI links it from the data module. It fills
                ``model.vocab_size``, and must agree with it when both are given.
        """
        super().__init__()
        model_cfg = _as_config(model, ModelConfig) if model is not None else ModelConfig()
        optimizer_cfg = _as_config(optimizer, OptimizerConfig) if optimizer is not None else OptimizerConfig()
        if vocab_size is not None:
            if model_cfg.vocab_size not in (None, vocab_size):
                raise ValueError(
                    f"model.vocab_size={model_cfg.vocab_size} disagrees with the data's vocabulary of {vocab_size} "
                    "tokens; remove model.vocab_size or use data that matches it"
                )
            model_cfg = model_cfg.replace(vocab_size=vocab_size)
        if generation_samples < 0:
            raise ValueError(f"generation_samples must be >= 0, got {generation_samples}")
        # Plain dicts in the checkpoint, so loading needs no unpickling of our classes.
        self.save_hyperparameters({
            "model": dataclasses.asdict(model_cfg), "optimizer": dataclasses.asdict(optimizer_cfg),
            "generation_samples": generation_samples, "generation_temperature": generation_temperature,
        })
        self.model_cfg, self.optimizer_cfg = model_cfg, optimizer_cfg
        self.model = Transformer(model_cfg)
        self.val_loss = MeanMetric()
        self.tokens_seen = 0
        self._flops_per_token: dict[int, float] = {}

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids_BT)

    # ----------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, parts = self.model.loss(batch["input_ids"], batch["labels"])
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        for name, value in parts.items():
            self.log(f"train/{name}", value)
        self.log("train/tokens_seen", float(self.tokens_seen))
        optimizer = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_multiplier"])
        # Lightning writes logged values when (step + 1) is a multiple of log_every_n_steps; compute them then.
        if (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log_dict({f"train/{k}": v for k, v in self.module_metrics().items()})
            if hasattr(self.trainer.datamodule, "training_metrics"):
                # Data diagnostics are counts per rank (e.g. corrupt shards skipped): log their sum over ranks.
                data_metrics = self.trainer.datamodule.training_metrics()
                self.log_dict({f"train/{k}": v for k, v in data_metrics.items()}, sync_dist=True, reduce_fx="sum")
        return loss

    def module_metrics(self) -> dict[str, torch.Tensor]:
        """Diagnostics that modules publish through a ``training_metrics()`` method (e.g. table coverage,
        expert load), collected here so no module needs to know about the logger."""
        metrics: dict[str, torch.Tensor] = {}
        for module in self.model.modules():
            if hasattr(module, "training_metrics"):
                metrics.update(module.training_metrics())
        return metrics

    def on_train_start(self) -> None:
        # Parameter counts, once per fit at the current step: ``params/non_embedding`` is the backbone, and modules
        # with a ``parameter_metrics()`` method (Over-Encoding) add their own beside it.
        counts = {f"params/{k}": float(v) for k, v in self.model.parameter_counts().as_dict().items()}
        for module in self.model.modules():
            if hasattr(module, "parameter_metrics"):
                counts.update({f"params/{k}": float(v) for k, v in module.parameter_metrics().items()})
        for logger in self.loggers:
            logger.log_metrics(counts, step=self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # torch's clip_grad_norm_ cannot take sparse row gradients (Over-Encoding's sparse path); that optimizer
        # clips dense and sparse gradients together by the same rule.
        if gradient_clip_val and hasattr(optimizer, "clip_grad_norm_"):
            if gradient_clip_algorithm in (None, "norm"):
                optimizer.clip_grad_norm_(gradient_clip_val)
            else:
                optimizer.clip_grad_value_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # ThroughputMonitor reads this attribute; FLOPs exclude lookup tables (PAPER.md §4.11).
        B, T = batch["input_ids"].shape
        if T not in self._flops_per_token:
            self._flops_per_token[T] = self.model_cfg.flops_per_token(T)
        self.flops_per_batch = int(self._flops_per_token[T] * B * T)

    def configure_optimizers(self):
        total_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        optimizer, scheduler = build_optimizer(self.model, self.optimizer_cfg, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)

    # --------------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits_BTV = self.model(batch["input_ids"])
        labels_BT = batch["labels"]
        n_targets = (labels_BT != IGNORE_INDEX).sum()
        loss = torch.nn.functional.cross_entropy(
            logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        # Token-weighted mean over the whole validation set (batches may hold different numbers of targets).
        self.val_loss.update(loss / n_targets.clamp(min=1), weight=n_targets)

    def on_validation_epoch_end(self) -> None:
        val_loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", val_loss, sync_dist=False)
        self.log("val/ppl", torch.exp(val_loss.clamp(max=50.0)))
        grammar = getattr(self.trainer.datamodule, "grammar", None) if self.trainer.datamodule is not None else None
        if grammar is not None and self.hparams.generation_samples > 0 and not self.trainer.sanity_checking:
            self.log("val/cfg_gen_acc", self.grammar_generation_accuracy(grammar), sync_dist=True)

    def grammar_generation_accuracy(self, grammar) -> float:
        """Sample from BOS until EOS (or the context fills) and count the sentences the grammar accepts.

        A sentence that never emits EOS counts as wrong: the whole string must parse from the root.
        """
        generator = torch.Generator(device=self.device).manual_seed(1_000_003 * (self.global_step + 1) + self.global_rank)
        n = self.hparams.generation_samples
        prompt_B1 = torch.full((n, 1), grammar.bos_id, dtype=torch.long, device=self.device)
        max_new = min(self.model_cfg.max_seq_len, grammar.max_length + 2) - 1
        ids_BT = generate(self.model, prompt_B1, max_new, temperature=self.hparams.generation_temperature,
                          eos_id=grammar.eos_id, generator=generator).tolist()
        accepted = 0
        for row in ids_BT:
            body = row[1:]
            if grammar.eos_id in body:
                accepted += grammar.accepts(body[: body.index(grammar.eos_id)])
        return accepted / n
