"""In-training benchmark evaluation: lm-eval tasks every N optimizer steps and at the end of fit.

The paper's convergence speedups (docs/method.md §4.2) compare downstream accuracy curves against training tokens, so
every run can log them. ``LMEvalCallback`` scores the configured tasks through ``OverTokEvalLM`` (next-token head,
the validation precision) on every rank (lm-eval shards the documents; rank 0 logs) and writes, at step = the
optimizer step:

* ``eval/<task>/<metric>`` for each metric the task reports (``acc``; ``acc_norm`` for multiple choice;
  ``valid_mass`` for next-token validity);
* ``eval/downstream``: the mean of the five paper tasks' primary metrics (``runner.PRIMARY_METRICS``) when
  all five are configured;
* ``eval/wall_time_s``: seconds the evaluation took, to budget it;

and to TensorBoard the same task metrics against tokens: ``eval/<task>/<metric>_by_tokens`` and
``eval/downstream_by_tokens`` whose step axis is ``train/tokens_seen``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_overtok.checkpointing.tokenizer_binding import TokenizerBinding
from lit_overtok.evaluation.adapter import OverTokEvalLM
from lit_overtok.evaluation.grammar_tasks import cached_grammar, DEFAULT_GRAMMAR
from lit_overtok.evaluation.runner import downstream_score, expand_task_names, task_scores, TaskSuite
from lit_overtok.evaluation.tokenizers import EvalTokenizer, load_tokenizer
from lit_overtok.nn.collectives import is_split_over_ranks


def log_by_tokens(trainer: pl.Trainer, metrics: dict[str, float], tokens: int) -> None:
    """Each metric's ``<tag>_by_tokens`` twin, whose step axis is training tokens (TensorBoard loggers only)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for tag, value in metrics.items():
                logger.experiment.add_scalar(f"{tag}_by_tokens", value, global_step=int(tokens))


class LMEvalCallback(Callback):
    def __init__(
        self,
        tasks: Sequence[str] = ("grammar",),
        every_n_steps: int = 100,
        final_tasks: Sequence[str] = (),
        limit: Union[int, dict[str, int], None] = None,
        data_dir: Optional[str] = None,
        tokenizer: Optional[str] = None,
        grammar: Optional[str] = None,
        num_fewshot: Optional[int] = None,
        batch_size: int = 64,
        max_batch_tokens: int = 32768,
        seed: int = 1234,
        online: bool = False,
        task_root: Optional[str] = None,
        allow_tokenizer_change: bool = False,
    ) -> None:
        """
        Args:
            tasks: lm-eval task or group names; ``paper`` = the five downstream tasks, ``grammar`` = the cfg tasks.
            every_n_steps: evaluate after every this many optimizer steps (and always at the end of fit).
            final_tasks: further tasks scored only at the end of fit (e.g. whole generations, the costly part).
            limit: a fixed random subset of about this many documents per task (None: all), or a dict of sizes
                per task; grammar tasks draw exactly this many.
            data_dir: folder of the offline task data; default ``$LIT_OVERTOK_DATA``, else ``../shared/data`` beside
                the repository (``lit_overtok.data.locations``).
            tokenizer: ``grammar:<name>`` or a ``tokenizers`` JSON path; default: the data's own (its grammar, or
                the tokenizer of its shards). Another one is refused (``checkpointing/tokenizer_binding.py``).
            grammar: grammar of the cfg tasks; default the data module's.
            num_fewshot: few-shot examples for tasks that do not fix their own (default 0).
            batch_size, max_batch_tokens: adapter batching (see ``OverTokEvalLM``).
            seed: sampling seed of generation tasks (the same at every evaluation, so curves compare like with like).
            online: standard task names use lm-eval's own files and datasets (must be reachable).
            task_root: folder with the task files; default the package's task files (``runner.TASK_ROOT``).
            allow_tokenizer_change: score with a ``tokenizer`` that is not the data's (a warning).
        """
        super().__init__()
        if every_n_steps <= 0:
            raise ValueError(f"LMEvalCallback: every_n_steps must be positive, got {every_n_steps}")
        self.tasks, self.every_n_steps, self.limit = list(tasks), every_n_steps, limit
        self.final_tasks = list(final_tasks)
        self.data_dir, self.tokenizer_spec, self.grammar, self.num_fewshot = data_dir, tokenizer, grammar, num_fewshot
        self.batch_size, self.max_batch_tokens, self.seed = batch_size, max_batch_tokens, seed
        self.online, self.task_root, self.allow_tokenizer_change = online, task_root, allow_tokenizer_change
        self.suite: Optional[TaskSuite] = None
        self.final_suite: Optional[TaskSuite] = None
        self.tokenizer: Optional[EvalTokenizer] = None
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}
        """Rank 0: what the latest evaluation logged (the end-of-run summary prints it)."""

    @property
    def last_step(self) -> int:
        """Optimizer step of the latest evaluation (-1 before the first)."""
        return self._last_step

    @classmethod
    def for_grammar_run(cls, datamodule: object) -> Optional["LMEvalCallback"]:
        """The default of runs on grammar data (None for other data): 64 next-token-validity prefixes every 50
        steps, and 16 generations at the end of fit only: decoding whole sentences dominates the cost, and a
        CPU-sized run generates no valid sentence before its end (BENCHMARKS.md, the default run)."""
        if getattr(datamodule, "grammar", None) is None:
            return None
        return cls(tasks=["cfg_next_token_validity"], final_tasks=["cfg_generation"], every_n_steps=50,
                   limit={"cfg_generation": 16, "cfg_next_token_validity": 64})

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.suite is not None or self.final_suite is not None:
            return
        if not self.tasks and not self.final_tasks:
            return
        datamodule = trainer.datamodule
        data_grammar = getattr(datamodule, "grammar", None)
        binding = TokenizerBinding.of_datamodule(datamodule)
        self.tokenizer = load_tokenizer(binding.resolve(self.tokenizer_spec, self.allow_tokenizer_change,
                                                        option="LMEvalCallback tokenizer="))
        grammar = self.grammar
        if grammar is None and data_grammar is not None:
            grammar = getattr(datamodule, "hparams", {}).get("grammar", data_grammar.name)
        periodic, final = expand_task_names(self.tasks), expand_task_names(self.final_tasks)
        context = getattr(getattr(pl_module, "model_config", None), "max_seq_len", None)
        needed = cached_grammar(str(grammar or DEFAULT_GRAMMAR)).max_length + 2  # BOS + longest sentence + EOS
        if "cfg_generation" in periodic + final and context is not None and context < needed:
            rank_zero_warn(f"model_config.max_seq_len={context} cannot hold a whole {grammar or DEFAULT_GRAMMAR} sentence "
                           f"({needed} tokens with BOS and EOS); the in-training evaluation skips cfg_generation")
            periodic, final = ([task for task in tasks if task != "cfg_generation"] for tasks in (periodic, final))
        self.suite, self.final_suite = (self._suite(tasks, grammar) for tasks in (periodic, final))

    def _suite(self, tasks: list[str], grammar: Optional[str]) -> Optional[TaskSuite]:
        if not tasks:
            return None
        limit = self.limit
        if isinstance(limit, dict):
            limit = {task: size for task, size in limit.items() if task in tasks}
        return TaskSuite(tasks, data_dir=self.data_dir, grammar=grammar, num_fewshot=self.num_fewshot,
                         online=self.online, task_root=self.task_root, subset=limit)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        # Under gradient accumulation several batches share a step; evaluate once per step.
        step = trainer.global_step
        # The last step's evaluation is on_train_end's, which adds the final-only tasks.
        if step > 0 and step % self.every_n_steps == 0 and step not in (self._last_step, trainer.max_steps):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module, final=True)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 final: bool = False) -> Optional[dict[str, float]]:
        """Score the tasks now (with ``final`` also the final-only ones); returns the logged metrics on rank 0
        (None elsewhere or when disabled)."""
        self._last_step = trainer.global_step
        suites = [suite for suite in (self.suite, self.final_suite if final else None) if suite is not None]
        if not suites:
            return None
        if is_split_over_ranks(pl_module):
            # Every forward is then a collective, and lm-eval gives each rank its own number of requests: skip.
            rank_zero_warn("LMEvalCallback: the model is split over ranks (row-sharded Over-Encoding tables or "
                           "FSDP2), so in-training evaluation is skipped; score checkpoints with evaluation/evaluate.py",
                           category=UserWarning)
            return None
        start = time.perf_counter()
        lm = OverTokEvalLM(pl_module, self.tokenizer, batch_size=self.batch_size,
                           max_batch_tokens=self.max_batch_tokens, seed=self.seed, progress=False)
        with trainer.precision_plugin.val_step_context():
            results = [suite.evaluate(lm, progress=False) for suite in suites]
        if not trainer.is_global_zero or results[0] is None:
            return None
        scores = {task: values for suite, result in zip(suites, results)
                  for task, values in task_scores(result, suite.names).items()}
        metrics = {f"eval/{task}/{metric}": value for task, values in scores.items() for metric, value in values.items()}
        downstream = downstream_score(scores)
        if downstream is not None:
            metrics["eval/downstream"] = downstream
        tokens = getattr(pl_module, "tokens_seen", None)
        if tokens is not None:
            log_by_tokens(trainer, metrics, tokens)
        metrics["eval/wall_time_s"] = time.perf_counter() - start
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.last_metrics = metrics
        rank_zero_info(f"step {trainer.global_step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return metrics
