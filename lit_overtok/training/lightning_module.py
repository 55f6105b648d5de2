"""The LightningModule: training objective, validation and test loss, optimizer and schedule for every model variant.

Logged (step axis = optimizer steps completed, for every tag: a training step's values at the step it completes,
validation and evaluation after that many steps; ``train/tokens_seen`` gives the token axis):
``train/loss`` (the full objective), ``train/loss_next1`` (plain next-token CE) plus any per-head parts,
``train/lr``, ``train/tokens_seen``, ``train/grad_norm`` (+ ``/<part>``, ``optim.gradients``), what modules publish
through ``nn.hooks`` (``train/oe/*``, ``train/moe/*``), ``val/loss``, ``val/ppl`` (+ ``val/loss_by_tokens``) and
``test/loss``, ``test/ppl``. Benchmark and grammar scores (``eval/*``) come from ``evaluation.callback.LMEvalCallback``,
speed and memory from ``callbacks.TokenThroughputMonitor``, the HPARAMS tab and parameter counts from ``hparams_tab``.

Data parallelism (``parallel``, ``strategies``): the model is built with its parameters on the meta device;
``configure_model`` shards it (FSDP2), allocates and draws what each rank holds, materializes row-sharded
Over-Encoding tables over the data-parallel group and prepares DDP; ``setup`` checks the strategy and prints (and
checks) the per-rank memory estimate (``memory``); gradient clipping takes the global norm when gradients are split
over ranks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from lit_overtok.checkpointing.resume_check import SCHEDULE_STEPS_KEY
from lit_overtok.configuration import config_from
from lit_overtok.data.shards import file_sha256
from lit_overtok.errors import InputError
from lit_overtok.training.lm_eval_callback import log_by_tokens
from lit_overtok.distributed.memory import (MemoryEstimate, check_fits, device_capacity, estimate_per_rank,
                                            process_bytes)
from lit_overtok.nn import hooks
from lit_overtok.nn.collectives import is_split_over_ranks
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import flops_per_token
from lit_overtok.nn.deferred_init import parameters_on_meta
from lit_overtok.nn.losses import IGNORE_INDEX
from lit_overtok.nn.transformer import Transformer
from lit_overtok.optim.build import build_optimizer
from lit_overtok.optim.clipping import clip_grad_norm_across_ranks_, clip_grad_value_
from lit_overtok.optim.config import OptimizerConfig
from lit_overtok.optim.gradients import gradient_norms
from lit_overtok.training.dashboards import log_hparams_tab, run_shape
from lit_overtok.distributed.parallel import check_strategy, configure_parallelism


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
        # Plain dicts and lists (JSON types) in the checkpoint and hparams.yaml: loading unpickles none of our classes
        # and yaml.safe_load reads them (a tuple would be written as !!python/tuple).
        self.save_hyperparameters(json.loads(json.dumps({
            "model_config": dataclasses.asdict(model_config), "optimizer": dataclasses.asdict(optimizer_config),
        })))
        self.model_config, self.optimizer_config = model_config, optimizer_config
        # Parameters on the meta device (no memory): ``configure_model`` allocates and draws them where the strategy
        # places them (``nn.deferred_init``); call ``configure_model()`` to use the module outside a Trainer.
        with parameters_on_meta():
            self.transformer = Transformer(model_config)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.tokens_seen = 0
        self._checkpoint_step = 0
        self._schedule_steps: Optional[int] = None
        self._flops_per_token: dict[int, float] = {}
        self.memory_estimate: Optional[MemoryEstimate] = None  # this rank's, from the start of the last fit

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids_BT)

    # ----------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, parts = self.transformer.loss(batch["input_ids"], batch["labels"])
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        self.log("step", float(self.global_step + 1))  # the step this batch completes: the axis of every tag
        self.log("train/loss", loss, prog_bar=True)
        for name, value in parts.items():
            self.log(f"train/{name}", value)
        self.log("train/tokens_seen", float(self.tokens_seen))
        optimizer = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_multiplier"])
        if self._writes_logs():
            self.log_dict({f"train/{k}": v for k, v in hooks.training_metrics(self.transformer).items()})
            if isinstance(self.trainer.datamodule, hooks.PublishesTrainingMetrics):
                # Data diagnostics are counts per rank (e.g. corrupt shards skipped): log their sum over ranks.
                data_metrics = self.trainer.datamodule.training_metrics()
                self.log_dict({f"train/{k}": v for k, v in data_metrics.items()}, sync_dist=True, reduce_fx="sum")
        return loss

    def _writes_logs(self) -> bool:
        """Lightning writes logged values when (step + 1) is a multiple of log_every_n_steps; compute them then."""
        return (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0

    def on_train_start(self) -> None:
        # Parameter counts, once per fit, into the hyperparameters (HPARAMS tab, hparams.yaml) and a text table:
        # ``non_embedding`` is the backbone, and modules that publish ``parameter_metrics`` (Over-Encoding) add theirs.
        counts = {**self.transformer.parameter_counts().as_dict(), **hooks.parameter_metrics(self.transformer)}
        log_hparams_tab(self.loggers, dict(self.hparams), counts, self.global_step, run_shape(self.trainer))

    def on_before_optimizer_step(self, optimizer) -> None:
        # Before clipping: the norm that clipping acts on (the sparse path clips inside its optimizer, later).
        if self._writes_logs():
            norms = gradient_norms(self.transformer)
            self.log_dict({f"train/{name}": value for name, value in norms.items()})

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
        # ThroughputMonitor reads this attribute; FLOPs exclude lookup tables (docs/method.md §4.11).
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
        # Checked before any step, so a mismatch is one line rather than a traceback from inside the model.
        seq_len = (getattr(self.trainer.datamodule, "hparams", None) or {}).get("seq_len")
        if seq_len is not None and seq_len > self.model_config.max_seq_len:
            raise InputError(f"data.seq_len={seq_len} exceeds model_config.max_seq_len={self.model_config.max_seq_len}"
                             "; raise model_config.max_seq_len or lower data.seq_len")
        check_engram_tokenizer(self.model_config, getattr(self.trainer.datamodule, "tokenizer_record", None))
        strategy = self.trainer.strategy
        check_strategy(self.model_config, strategy)
        if stage == "fit":
            # Printed (rank 0) and checked (every rank) before any table or optimizer state is allocated.
            fsdp, ddp = isinstance(strategy, ModelParallelStrategy), isinstance(strategy, DDPStrategy)
            precision = self.trainer.precision
            process = process_bytes(self, strategy.root_device)
            estimate = estimate_per_rank(self.model_config, self.trainer.world_size, fsdp, ddp, precision, process)
            capacity, device = device_capacity(strategy.root_device, self.trainer.num_devices)
            rank_zero_info(estimate.report(capacity, device))
            check_fits(estimate, capacity, device, self.model_config, precision)
            self.memory_estimate = estimate

    def configure_model(self) -> None:
        # After the process group exists and before DDP/FSDP2 wrap the model (Lightning also calls it in
        # load_from_checkpoint, without a Trainer): the meta-device parameters are sharded, allocated and drawn here,
        # the sharded tables placed (``parallel``).
        configure_parallelism(self, self.transformer, self._trainer.strategy if self._trainer is not None else None)

    def _data_group(self):
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy):
            return strategy.device_mesh["data_parallel"].get_group()
        return None

    def configure_optimizers(self):
        total_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        if not 0 < total_steps < float("inf"):
            raise InputError(f"trainer.max_steps={self.trainer.max_steps}: the learning-rate schedule needs a finite "
                             "number of optimizer steps and our data streams are endless; set trainer.max_steps to a "
                             "positive number")
        self._schedule_steps = int(total_steps)
        optimizer, scheduler = build_optimizer(self.transformer, self.optimizer_config, int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        if self._schedule_steps is not None:  # a resume with another max_steps says how the schedule changes
            checkpoint[SCHEDULE_STEPS_KEY] = self._schedule_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        # validate/test restore the weights but not the loops: the checkpoint's step is their point on the axis.
        self._checkpoint_step = checkpoint.get("global_step", 0)

    # ---------------------------------------------------------------------------------- validation and test
    def _update_loss(self, metric: MeanMetric, batch: dict[str, torch.Tensor]) -> None:
        logits_BTV = self.transformer(batch["input_ids"])
        labels_BT = batch["labels"]
        n_targets = (labels_BT != IGNORE_INDEX).sum()
        loss = torch.nn.functional.cross_entropy(
            logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        # Token-weighted mean over the whole set (batches may hold different numbers of targets).
        metric.update(loss / n_targets.clamp(min=1), weight=n_targets)

    def _log_loss(self, metric: MeanMetric, split: str) -> float:
        loss = metric.compute()
        metric.reset()
        self.log("step", float(self.global_step or self._checkpoint_step))  # after this many optimizer steps
        self.log(f"{split}/loss", loss, sync_dist=False, prog_bar=split == "val")  # the bar shows the last val/loss
        self.log(f"{split}/ppl", torch.exp(loss.clamp(max=50.0)))
        return float(loss)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._update_loss(self.val_loss, batch)

    def on_validation_epoch_end(self) -> None:
        val_loss = self._log_loss(self.val_loss, "val")
        if not self.trainer.sanity_checking:
            log_by_tokens(self.trainer, {"val/loss": val_loss}, self.tokens_seen)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._update_loss(self.test_loss, batch)

    def on_test_epoch_end(self) -> None:
        self._log_loss(self.test_loss, "test")


def check_engram_tokenizer(model_config: ModelConfig, tokenizer_record) -> None:
    """Engram's compressed ids must come from the tokenizer the data was made with (a config that moves
    ``data.train_shards`` must move ``engram.tokenizer`` too); a file that is gone (a resumed run: the map is in the
    checkpoint) or data without a tokenizer file (grammars) is not checked."""
    engram = model_config.engram
    if engram is None or engram.tokenizer is None or tokenizer_record is None or not Path(engram.tokenizer).is_file():
        return
    record = tokenizer_record()
    if file_sha256(engram.tokenizer) != record["sha256"]:
        raise InputError(f"model_config.engram.tokenizer {engram.tokenizer} is not the tokenizer the data was made "
                         f"with ({record['file'] or record['manifest']}); give that file, so the compressed ids "
                         "match the data's ids")
