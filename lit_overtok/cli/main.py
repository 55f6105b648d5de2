"""The training command line: ``train.py fit | validate | test`` (LightningCLI) and ``generate | export | strip``.

With no arguments, ``fit`` runs the embedded default (DEFAULT_TRAINER plus the defaults of ``OverTokLM`` and
``CFGDataModule``): a small model on the cfg3f grammar that finishes within 5 minutes on 2 idle CPU cores, then
prints what happened and what to try next (``run_summary``). Model and data are in subclass mode (``class_path`` /
``init_args``) and the vocabulary is linked from the data. Keys are checked before jsonargparse sees them
(``config_keys``), so a wrong one is one line naming the nearest valid name.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lit_overtok.checkpointing import inference as checkpoints
from lit_overtok.cli import generate
from lit_overtok.training.callbacks import StepProgressBar, TokenThroughputMonitor
from lit_overtok.checkpointing.files import resolve_ckpt_path, run_version, with_atomic_checkpoint_io
from lit_overtok.checkpointing.outputs import evaluation_logger_kwargs
from lit_overtok.checkpointing.resume_check import refuse_changed_config, resume_state, schedule_change
from lit_overtok.checkpointing.tokenizer_binding import TokenizerBinding
from lit_overtok.checkpointing.version_claim import abandon_version, claim_version, release_claims
from lit_overtok.training.console import ConsoleLine, QuietModelSummary, quiet_lightning
from lit_overtok.training.run_logger import RunLogger
from lit_overtok.cli.config_keys import check_keys, field_help, OPTIMIZER_MESSAGE, REFUSED_ROOTS, resolve_model_config
from lit_overtok.data.cfg_datamodule import CFGDataModule
from lit_overtok.training.lm_eval_callback import LMEvalCallback
from lit_overtok.cli import export as export_command
from lit_overtok.training.global_batch import GlobalBatch, apply_global_batch
from lit_overtok.training.lightning_module import OverTokLM
from lit_overtok.checkpointing.run_checkpoint import RunCheckpoint
from lit_overtok.training.run_summary import run_summary
from lit_overtok.errors import exit_on_user_error, InputError, one_line, USER_ERRORS

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

# Commands beside Lightning's fit / validate / test: (main(argv), what it does).
COMMANDS = {
    "generate": (generate.main, "sample text from a checkpoint (temperature, top-k, max tokens, stop at EOS)"),
    "export": (export_command.main, "write a Hugging Face transformers folder (Olmo2 / FlexOlmo / OLMoE)"),
    "strip": (checkpoints.main, "write a small inference checkpoint (no optimizer state, no OD / MTP-DS heads)"),
}


class OverTokArgumentParser(LightningArgumentParser):
    """Dumps (``--print_config``, the saved ``config.yaml``) show the model config with its preset resolved; a value
    of the wrong type is one line (jsonargparse prints its 60-line usage first)."""

    def dump(self, config, *args, **kwargs):
        return super().dump(resolve_model_config(config), *args, **kwargs)

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error or os.environ.get("LIT_OVERTOK_TRACEBACK"):
            return super().error(message, ex)
        raise InputError(parse_error_line(message, self.prog.replace(" [options]", "")))


def parse_error_line(message: str, prog: str) -> str:
    """jsonargparse's several-line message for a bad value as one line: the key, the value, what was expected."""
    key = re.search(r'Parser key "([^"]+)"', message)
    given = re.search(r"(?:Given|Got) value: (.*)", message)
    expected = [re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", re.sub(r"<class '(\w+)'>", r"\1", line.strip(
        " -").removeprefix("Expected a ").split(". Got value")[0].rstrip("."))) for line in message.splitlines()
        if "Expected a" in line]
    if key is None or given is None:
        return f"{' '.join(message.split())} ({prog} --help lists the options)"
    return (f"{key.group(1)}={given.group(1).strip()} is not valid: expected {' or '.join(expected) or 'another type'} "
            f"({prog} --help lists the options)")


class OverTokCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict has no prompts to read from a data module; `train.py generate` samples from a checkpoint.
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def _add_subcommands(self, parser, **kwargs) -> None:
        # `train.py --help` lists every command; generate / export / strip are dispatched in main() before parsing.
        super()._add_subcommands(parser, **kwargs)
        for name, (_, summary) in COMMANDS.items():
            parser._subcommands_action.add_subcommand(name, LightningArgumentParser(prog=f"train.py {name}"), help=summary)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "model": {"class_path": f"{OverTokLM.__module__}.{OverTokLM.__qualname__}"},
            "data": {"class_path": f"{CFGDataModule.__module__}.{CFGDataModule.__qualname__}"},
        })
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.add_argument("--global_batch", type=Optional[GlobalBatch], default=None,
                            help="Sequences or tokens per optimizer step over all ranks; trainer.accumulate_grad_batches "
                                 "is derived from it at start (lit_overtok/training/global_batch.py)")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for key in REFUSED_ROOTS:
            if config.get(key) is not None:
                raise ValueError(f"{key}: {OPTIMIZER_MESSAGE}")

    def _parse_ckpt_path(self) -> None:
        # Before Lightning opens the checkpoint: --ckpt_path auto (or a run folder) is the newest checkpoint of the
        # latest run that verifies (a fresh run if none), and any path is verified (one line if damaged). fit keeps
        # the command line's config and compares it with the checkpoint's (``_check_resume``); validate and test
        # take the model's hyperparameters from the checkpoint, as Lightning does.
        subcommand = self.config.get("subcommand")
        if not subcommand:  # run=False has neither the option nor a run to resume
            return
        config = self.config[subcommand]
        root = config["trainer"].get("default_root_dir") or "runs"
        config["ckpt_path"] = resolve_ckpt_path(config.get("ckpt_path"), root)
        if subcommand != "fit":
            super()._parse_ckpt_path()

    def _check_resume(self, resume: str, max_steps: Optional[int]) -> dict:
        """The checkpoint's state after refusing a resume whose model, optimizer or data differ (nothing written)."""
        checkpoint = resume_state(resume)
        data_hparams = dict(getattr(self.datamodule, "hparams", None) or {})
        refuse_changed_config(resume, checkpoint, dict(self.model.hparams), data_hparams)
        check_tokenizer = getattr(self.datamodule, "check_resume_tokenizer", None)
        if check_tokenizer is not None:
            check_tokenizer(TokenizerBinding.of_checkpoint(checkpoint, resume).record())
        change = schedule_change(checkpoint, max_steps)
        if change is not None:
            print(f"--ckpt_path {resume}: {change}", file=sys.stderr)
        return checkpoint

    def _instantiate_trainer(self, config, callbacks):
        # Our defaults unless the config gives its own: TensorBoard without the placeholder hp_metric (continuing the
        # resumed run's folder), speed and memory (timed first, before any other callback's batch-end work), a
        # progress bar counted in optimizer steps, and checkpoints that are atomic, verified on load and saved on
        # Ctrl-C / SIGTERM, with last.ckpt always the latest step.
        root = config.get("default_root_dir") or "runs"
        resume = self.config[self.subcommand].get("ckpt_path") if self.subcommand == "fit" else None
        resume = resume if resume is not None and Path(resume).exists() else None
        checkpoint = self._check_resume(resume, config.get("max_steps")) if resume is not None else {}
        if config.get("logger") in (None, True) and self.subcommand in ("validate", "test"):
            # Into the run they evaluate (its validate/ or test/ sub-folder), not a new version_N beside it.
            where = evaluation_logger_kwargs(self.config[self.subcommand].get("ckpt_path"), root, self.subcommand)
            config["logger"] = TensorBoardLogger(default_hp_metric=False, **where)
        if config.get("logger") in (None, True):
            version = run_version(resume, root) if resume is not None else None
            if rank_zero_only.rank == 0:  # the other ranks write no logs; Lightning broadcasts rank 0's folder
                version = claim_version(root, version)
            resumed = version is not None and resume is not None and run_version(resume, root) == version
            config["logger"] = RunLogger(root, version, resumed_step=checkpoint.get("global_step") if resumed else None,
                                         resumed_tokens=checkpoint.get("tokens_seen") if resumed else None)
        config["plugins"] = with_atomic_checkpoint_io(config.get("plugins"))
        given = list(config.get("callbacks") or []) + list(callbacks)
        if not any(isinstance(c, TokenThroughputMonitor) for c in given):
            config["callbacks"] = [TokenThroughputMonitor()] + list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks.append(StepProgressBar())
        if not any(isinstance(c, ConsoleLine) for c in given):
            callbacks.append(ConsoleLine())
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in given):
            callbacks.append(QuietModelSummary())
            config["enable_model_summary"] = False  # Lightning would announce that it adds no summary of its own
        if not any(isinstance(c, ModelCheckpoint) for c in given):
            callbacks.append(RunCheckpoint(every_n_train_steps=100))
        # Grammar runs score the cfg tasks in-loop (eval/*); small subsets keep the default run within minutes.
        if not any(isinstance(c, LMEvalCallback) for c in given):
            default_eval = LMEvalCallback.for_grammar_run(self.datamodule)
            callbacks += [default_eval] if default_eval is not None else []
        try:
            trainer = super()._instantiate_trainer(config, callbacks)
        except BaseException:
            if isinstance(config.get("logger"), RunLogger):  # a Trainer argument refused: leave no empty folder
                abandon_version(config["logger"].root_dir, config["logger"].version)
            raise
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
    """The deepest ValueError in the chain: ours (config validation, GrammarError), not the I/O error beneath.

    ``LIT_OVERTOK_TRACEBACK=1`` shows the whole traceback instead."""
    found = error
    while error is not None:
        if isinstance(error, ValueError):
            found = error
        # ``raise ... from None`` hides the context: the message raised is the one meant for the user.
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return found


def main(args=None) -> None:
    """``train.py`` (console script ``lit-overtok-train``): bad input ends it in one line (``errors``)."""
    return exit_on_user_error(_run, args)


def _run(args=None) -> None:
    given, args = args, list(sys.argv[1:] if args is None else args)
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]][0](args[1:])
    if args and args[0] == "predict":
        raise InputError("train.py predict is not available; sample from a checkpoint with train.py generate "
                         "(train.py generate --help)")
    try:
        asked_help = check_keys(args)
    except (OSError, yaml.YAMLError) as error:  # a config file that cannot be read or parsed
        raise InputError(one_line(error)) from error
    if asked_help is not None:
        sys.stdout.write(field_help(*asked_help))
        raise SystemExit(0)
    quiet_lightning()
    try:
        _run_cli(given)
    except (*USER_ERRORS, MisconfigurationException) as error:  # Lightning's name for a bad Trainer argument
        # jsonargparse wraps a config error from our classes in union-type noise; show the user our message. Bad
        # input met while running (a file, a checkpoint, a field checked at setup) is an InputError that says it all.
        if isinstance(error, InputError):
            raise
        raise InputError(one_line(_root_cause(error))) from error
    finally:
        release_claims()  # the run's version folder is free for the next command (of this process too)


def _run_cli(given) -> None:
    OverTokCLI(
        OverTokLM,
        LightningDataModule,  # any data module (CFGDataModule is the default, WebDatasetDataModule for text)
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=DEFAULT_TRAINER,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=1234,  # reproducible unless a config says otherwise
        parser_class=OverTokArgumentParser,
        parser_kwargs={"description": __doc__.split("\n\n")[0],
                       "formatter_class": argparse.RawDescriptionHelpFormatter},
        args=given,
    )
