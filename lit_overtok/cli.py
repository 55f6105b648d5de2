"""The LightningCLI used by ``train.py``: subclass mode for model and data, the vocabulary linked from the data.

With no arguments, ``fit`` runs the embedded default (DEFAULT_TRAINER plus the defaults of ``OverTokLM`` and
``CFGDataModule``): a small model on the cfg3f grammar that finishes within 5 minutes on 2 idle CPU cores, then
prints what happened and what to try next (``run_summary``).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_overtok.callbacks import TokenThroughputMonitor
from lit_overtok.data.cfg_datamodule import CFGDataModule
from lit_overtok.evaluation.callback import LMEvalCallback
from lit_overtok.global_batch import GlobalBatch, GlobalBatchError, apply_global_batch
from lit_overtok.lightning_module import OverTokLM
from lit_overtok.run_summary import run_summary

# The default run ends within 5 minutes on an idle 2-core CPU, evaluations included (BENCHMARKS.md: the default run).
DEFAULT_TRAINER = {
    "max_steps": 250,
    "val_check_interval": 50,
    "check_val_every_n_epoch": None,
    "limit_val_batches": 4,
    "log_every_n_steps": 10,
    "gradient_clip_val": 1.0,
    # Our data modules shard by rank themselves (streams cannot take a DistributedSampler).
    "use_distributed_sampler": False,
    "default_root_dir": "runs/default",
}


class OverTokCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "model": {"class_path": f"{OverTokLM.__module__}.{OverTokLM.__qualname__}"},
            "data": {"class_path": f"{CFGDataModule.__module__}.{CFGDataModule.__qualname__}"},
        })
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.add_argument("--global_batch", type=Optional[GlobalBatch], default=None,
                            help="Sequences or tokens per optimizer step over all ranks; trainer.accumulate_grad_batches "
                                 "is derived from it at start (lit_overtok/global_batch.py)")

    def _instantiate_trainer(self, config, callbacks):
        # Our defaults unless the config gives its own: TensorBoard without the placeholder hp_metric, throughput
        # in tokens and FLOPs, and a checkpoint that always keeps the latest step.
        if config.get("logger") in (None, True):
            config["logger"] = TensorBoardLogger(config.get("default_root_dir") or "runs", name="", default_hp_metric=False)
        given = list(config.get("callbacks") or []) + list(callbacks)
        if not any(isinstance(c, ModelCheckpoint) for c in given):
            callbacks.append(ModelCheckpoint(save_last=True, every_n_train_steps=100))
        if not any(isinstance(c, TokenThroughputMonitor) for c in given):
            callbacks.append(TokenThroughputMonitor())
        # Grammar runs score the cfg tasks in-loop (eval/*); small subsets keep the default run within minutes.
        if not any(isinstance(c, LMEvalCallback) for c in given):
            default_eval = LMEvalCallback.for_grammar_run(self.datamodule)
            callbacks += [default_eval] if default_eval is not None else []
        trainer = super()._instantiate_trainer(config, callbacks)
        global_batch = self._get(self.config_init, "global_batch")
        if global_batch is not None:
            apply_global_batch(trainer, self.datamodule, global_batch, config.get("accumulate_grad_batches", 1))
        return trainer

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        # What happened and what to try next, on rank 0 (``run_summary``). ``log_dir`` is a collective under DDP
        # (a broadcast from rank 0): every rank reads it.
        log_dir = self.trainer.log_dir
        if self.trainer.is_global_zero:
            config = str(Path(log_dir) / "config.yaml") if log_dir is not None else None
            print(run_summary(self.trainer, time.perf_counter() - self._fit_started, config, log_dir), flush=True)


def _root_cause(error: BaseException) -> BaseException:
    """The deepest ValueError in the chain: ours (config validation, GrammarError), not the I/O error beneath."""
    found = error
    while error is not None:
        if isinstance(error, ValueError):
            found = error
        error = error.__cause__ or error.__context__
    return found


_RENAMED_KEY = re.compile(r"^--model\.(init_args\.)?model(\.|=|$)")
_RENAMED_MESSAGE = ("the model's architecture is configured under model.init_args.model_config (renamed from "
                    "model.init_args.model); e.g. --model.init_args.model_config.preset cfg-small")


def reject_renamed_keys(args: Optional[list[str]]) -> None:
    """One clear error for the architecture key of earlier versions, on the command line or in a --config file."""
    args = sys.argv[1:] if args is None else args
    for i, arg in enumerate(args):
        if _RENAMED_KEY.match(arg):
            raise ValueError(f"{arg.split('=')[0]}: {_RENAMED_MESSAGE}")
        if arg == "--config" and i + 1 < len(args) or arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1] if "=" in arg else args[i + 1])
            config = yaml.safe_load(path.read_text()) if path.is_file() else None
            model = config.get("model") if isinstance(config, dict) else None
            init_args = model.get("init_args", model) if isinstance(model, dict) else None
            if isinstance(init_args, dict) and "model" in init_args:
                raise ValueError(f"{path}: model.init_args.model: {_RENAMED_MESSAGE}")


def main(args=None) -> None:
    try:
        reject_renamed_keys(args)
    except ValueError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None
    try:
        OverTokCLI(
            OverTokLM,
            LightningDataModule,  # any data module (CFGDataModule is the default, WebDatasetDataModule for text)
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=DEFAULT_TRAINER,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=1234,  # reproducible unless a config says otherwise
            args=args,
        )
    except ValueError as error:
        # jsonargparse wraps a config error from our classes in union-type noise; show the user our message.
        root = _root_cause(error)
        if root is error and not isinstance(error, GlobalBatchError):
            raise
        sys.stderr.write(f"error: {root}\n")
        raise SystemExit(2) from error
