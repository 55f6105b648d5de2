"""The LightningModule: training objective, validation loss, optimizer and schedule for every model variant.

Logged to TensorBoard (step axis = optimizer steps; ``train/tokens_seen`` gives the token axis):
``train/loss`` (the full objective), ``train/loss_next1`` (plain next-token CE) plus any per-head parts,
``train/lr``, ``train/tokens_seen``, what modules publish through ``nn.hooks`` (``train/oe/*``, ``train/moe/*``),
``val/loss`` and ``val/ppl``. Benchmark and grammar scores (``eval/*``, the paper's generation accuracy among them)
come from ``evaluation.callback.LMEvalCallback``.

Data parallelism (``parallel``, ``strategies``): ``configure_model`` materializes row-sharded Over-Encoding tables
over the data-parallel group and prepares DDP or FSDP2; ``setup`` checks the strategy and prints (and checks) the
per-rank memory estimate (``memory``); gradient clipping takes the global norm when gradients are split over ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from lit_overtok.configuration import config_from
from lit_overtok.memory import check_fits, device_capacity, estimate_per_rank
from lit_overtok.nn import hooks
from lit_overtok.nn.collectives import is_split_over_ranks
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import flops_per_token
from lit_overtok.nn.losses import IGNORE_INDEX
from lit_overtok.nn.transformer import Transformer
from lit_overtok.optim.build import build_optimizer
from lit_overtok.optim.clipping import clip_grad_norm_across_ranks_, clip_grad_value_
from lit_overtok.optim.config import OptimizerConfig
from lit_overtok.parallel import check_strategy, configure_parallelism


class OverTokLM(pl.LightningModule):
    def __init__(
        self,
        model_config: Optional[ModelConfig] = None,
        optimizer: Optional[OptimizerConfig] = None,
        vocab_size: Optional[int] = None,
    ) -> None:
        """
        Args:
            model_config: the architecture (preset plus overrides, input embedding, heads); None = ModelConfig().
            optimizer: AdamW, parameter groups and the warmup-cosine schedule; None = OptimizerConfig().
            vocab_size: the data's vocabulary; the CLI links it from the data module. It fills
                ``model_config.vocab_size``, and must agree with it when both are given.
        """
        super().__init__()
        model_config = config_from(ModelConfig, model_config if model_config is not None else {}, "model_config")
        optimizer_config = config_from(OptimizerConfig, optimizer if optimizer is not None else {}, "optimizer")
        if vocab_size is not None:
            if model_config.vocab_size not in (None, vocab_size):
                raise ValueError(
                    f"model_config.vocab_size={model_config.vocab_size} disagrees with the data's vocabulary of "
                    f"{vocab_size} tokens; remove model_config.vocab_size or use data that matches it"
                )
            model_config = model_config.replace(vocab_size=vocab_size)
        # Plain dicts in the checkpoint, so loading needs no unpickling of our classes.
        self.save_hyperparameters({
            "model_config": dataclasses.asdict(model_config), "optimizer": dataclasses.asdict(optimizer_config),
        })
        self.model_config, self.optimizer_config = model_config, optimizer_config
        self.transformer = Transformer(model_config)
        self.val_loss = MeanMetric()
        self.tokens_seen = 0
        self._flops_per_token: dict[int, float] = {}

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids_BT)

    # ----------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, parts = self.transformer.loss(batch["input_ids"], batch["labels"])
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        for name, value in parts.items():
            self.log(f"train/{name}", value)
        self.log("train/tokens_seen", float(self.tokens_seen))
        optimizer = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_multiplier"])
        # Lightning writes logged values when (step + 1) is a multiple of log_every_n_steps; compute them then.
        if (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log_dict({f"train/{k}": v for k, v in hooks.training_metrics(self.transformer).items()})
            if isinstance(self.trainer.datamodule, hooks.PublishesTrainingMetrics):
                # Data diagnostics are counts per rank (e.g. corrupt shards skipped): log their sum over ranks.
                data_metrics = self.trainer.datamodule.training_metrics()
                self.log_dict({f"train/{k}": v for k, v in data_metrics.items()}, sync_dist=True, reduce_fx="sum")
        return loss

    def on_train_start(self) -> None:
        # Parameter counts, once per fit at the current step: ``params/non_embedding`` is the backbone, and modules
        # that publish ``parameter_metrics`` (Over-Encoding) add their own beside it.
        counts = {**self.transformer.parameter_counts().as_dict(), **hooks.parameter_metrics(self.transformer)}
        for logger in self.loggers:
            logger.log_metrics({f"params/{k}": float(v) for k, v in counts.items()}, step=self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Gradients split over ranks (row-sharded tables, FSDP2 shards): the global norm needs every rank's pieces.
        if gradient_clip_val and is_split_over_ranks(self.transformer):
            if gradient_clip_algorithm in (None, "norm"):
                clip_grad_norm_across_ranks_(self.transformer.parameters(), gradient_clip_val, self._data_group())
            else:
                clip_grad_value_(self.transformer.parameters(), gradient_clip_val)
            return
        # torch's clip_grad_norm_ cannot take sparse row gradients (Over-Encoding's sparse path); an optimizer that
        # clips its own gradients (``hooks.ClipsOwnGradients``) clips dense and sparse ones together by the same rule.
        if gradient_clip_val and isinstance(optimizer, hooks.ClipsOwnGradients):
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
            self._flops_per_token[T] = flops_per_token(self.model_config, T)
        self.flops_per_batch = int(self._flops_per_token[T] * B * T)

    def on_train_end(self) -> None:
        # The sparse tables' AdamW catches rows up when they are read or saved; bring every row current, so that
        # weights read after fit (exports walking parameters, copies) are what dense AdamW holds.
        flush = getattr(self.optimizers(use_pl_optimizer=False), "flush", None)
        if flush is not None:
            flush()

    # ------------------------------------------------------------------------------------------- parallelism
    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        check_strategy(self.model_config, strategy)
        if stage == "fit":
            # Printed (rank 0) and checked (every rank) before any table or optimizer state is allocated.
            fsdp, ddp = isinstance(strategy, ModelParallelStrategy), isinstance(strategy, DDPStrategy)
            precision = self.trainer.precision
            estimate = estimate_per_rank(self.model_config, self.trainer.world_size, fsdp, ddp, precision)
            capacity, device = device_capacity(strategy.root_device, self.trainer.num_devices)
            rank_zero_info(estimate.report(capacity, device))
            check_fits(estimate, capacity, device, self.model_config, precision)

    def configure_model(self) -> None:
        # After the process group exists and before DDP/FSDP2 wrap the model (Lightning also calls it in
        # load_from_checkpoint, without a Trainer): sharded tables are materialized here (``parallel``).
        configure_parallelism(self, self.transformer, self._trainer.strategy if self._trainer is not None else None)

    def _data_group(self):
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy):
            return strategy.device_mesh["data_parallel"].get_group()
        return None

    def configure_optimizers(self):
        total_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        optimizer, scheduler = build_optimizer(self.transformer, self.optimizer_config, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)

    # --------------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits_BTV = self.transformer(batch["input_ids"])
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
