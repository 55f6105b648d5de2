"""Loading and scoring lm-eval tasks for our models: offline task files, fixed subsets, the paper's downstream mean.

Task definitions live in ``lit_overtok/evaluation/tasks`` (package data): ``offline/`` holds lm-eval's standard tasks under their own names
(``hellaswag``, ``arc_easy``, ``arc_challenge``, ``piqa``, the ``mmlu_continuation`` group) reading local JSONL;
``local/`` holds ours (``mmlu_var``, ``cfg_generation``, ``cfg_next_token_validity``). Offline (the default) lm-eval
sees only these, with ``HF_DATASETS_OFFLINE=1``; online the standard names resolve to lm-eval's own task files
(which download their datasets) and ``local/`` still supplies ours.

The paper's downstream score (docs/method.md §3.1) is the mean over MMLU-Var, HellaSwag, ARC-Challenge, ARC-Easy and
PIQA, each under the metric OLMo's in-loop evaluator uses for it (``PRIMARY_METRICS``: ``len_norm`` = lm-eval's
``acc_norm``, except ARC-Easy's plain ``acc``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from lit_overtok.evaluation.grammar_tasks import cached_grammar, DEFAULT_GRAMMAR

TASK_ROOT = Path(__file__).resolve().parent / "tasks"  # package data: installed with the package
PAPER_TASKS = ("mmlu_var", "hellaswag", "arc_challenge", "arc_easy", "piqa")
GRAMMAR_TASKS = ("cfg_generation", "cfg_next_token_validity")
PRIMARY_METRICS = {"mmlu_var": "acc_norm", "hellaswag": "acc_norm", "arc_challenge": "acc_norm",
                   "arc_easy": "acc", "piqa": "acc_norm"}
TASK_SETS = {"paper": PAPER_TASKS, "grammar": GRAMMAR_TASKS}


def expand_task_names(names: Sequence[str]) -> list[str]:
    """Task names with the sets ``paper`` (the five downstream tasks) and ``grammar`` expanded, duplicates dropped."""
    out: list[str] = []
    for name in names:
        for task in TASK_SETS.get(name, (name,)):
            if task not in out:
                out.append(task)
    return out


def downstream_score(scores: dict[str, dict[str, float]]) -> Optional[float]:
    """Mean of the five paper tasks' primary metrics, or None unless all five were scored."""
    if not all(PRIMARY_METRICS[task] in scores.get(task, {}) for task in PAPER_TASKS):
        return None
    return sum(scores[task][PRIMARY_METRICS[task]] for task in PAPER_TASKS) / len(PAPER_TASKS)


def task_scores(results: dict[str, Any], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for the requested tasks and groups, from lm-eval's results dict."""
    scores: dict[str, dict[str, float]] = {}
    for name in names:
        entry = results.get("results", {}).get(name) or results.get("groups", {}).get(name) or {}
        metrics = {}
        for key, value in entry.items():
            metric, _, filter_name = key.partition(",")
            if filter_name == "none" and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                metrics[metric] = float(value)
        scores[name] = metrics
    return scores


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval warns once per task that custom datasets take --metadata; our hooks do, so hide it."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _without_lm_eval_bars():
    """lm-eval draws bars that take no ``disable`` flag from its callers (building requests, tokenizing them)."""
    import lm_eval.api.model
    import lm_eval.api.task

    modules = (lm_eval.api.model, lm_eval.api.task)
    saved = [module.tqdm for module in modules]
    for module, bar in zip(modules, saved):
        module.tqdm = functools.partial(_disabled, bar)
    try:
        yield
    finally:
        for module, bar in zip(modules, saved):
            module.tqdm = bar


def _disabled(bar, *args, **kwargs):
    return bar(*args, **{**kwargs, "disable": True})


class TaskSuite:
    """lm-eval tasks loaded once and scored any number of times (checkpoints, training steps)."""

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        data_dir: Optional[str] = None,
        grammar: Optional[str] = None,
        cfg_num_docs: Optional[int] = None,
        num_fewshot: Optional[int] = None,
        online: bool = False,
        task_root: Optional[str] = None,
        fewshot_seed: int = 1234,
        subset: Union[int, dict[str, int], None] = None,
        subset_seed: int = 0,
    ) -> None:
        """
        Args:
            tasks: task or group names; ``paper`` and ``grammar`` name the sets in ``TASK_SETS``.
            data_dir: folder of the offline task data (``<task>/<split>.jsonl``); default ``$LIT_OVERTOK_DATA``, else
                ``../shared/data`` beside a checkout (``lit_overtok.data.locations``).
            grammar: grammar of the ``cfg_*`` tasks (packaged name or JSON path); default cfg3f.
            cfg_num_docs: documents per grammar task (default 256, or the largest grammar-task ``subset``).
            num_fewshot: few-shot examples for every task that does not fix its own (default 0).
            online: resolve the standard task names to lm-eval's own files (their datasets must be reachable).
            task_root: folder with ``offline/`` and ``local/`` task files; default the package's ``TASK_ROOT``.
            fewshot_seed: seeds lm-eval's few-shot samplers.
            subset: keep only a fixed random subset of about this many documents per task (``fixed_samples``),
                so that repeated evaluations during training are cheap and comparable; a dict gives sizes per
                task (tasks it leaves out keep all their documents).
            subset_seed: chooses that subset.
        """
        self.names = expand_task_names(tasks)
        if not self.names:
            raise ValueError("no tasks given; name lm-eval tasks or one of the sets " + ", ".join(TASK_SETS))
        root = Path(task_root) if task_root is not None else TASK_ROOT
        if not (root / "local").is_dir() or not (root / "offline").is_dir():
            raise FileNotFoundError(
                f"lm-eval task folder {root} (with offline/ and local/) not found; pass task_root= a folder laid out "
                f"like {TASK_ROOT}"
            )
        if not online:
            # Nothing may download: lm-eval's datasets library reads this flag (also once imported).
            os.environ["HF_DATASETS_OFFLINE"] = "1"
            os.environ["HF_HUB_OFFLINE"] = "1"
        import datasets
        from lm_eval.tasks import TaskManager

        if not online:
            datasets.config.HF_DATASETS_OFFLINE = True
        self.grammar = str(grammar or DEFAULT_GRAMMAR)
        metadata: dict[str, Any] = {"grammar": self.grammar}
        if data_dir is not None:
            metadata["data_dir"] = str(Path(data_dir).resolve())
        self.subset = self._subset_sizes(subset)
        grammar_subsets = [self.subset[t] for t in GRAMMAR_TASKS if t in self.subset]
        if cfg_num_docs is not None or grammar_subsets:
            metadata["cfg_num_docs"] = int(cfg_num_docs if cfg_num_docs is not None else max(grammar_subsets))
        include = [root / "local"] if online else [root / "offline", root / "local"]
        with _quiet_lm_eval():
            manager = TaskManager(include_path=[str(p) for p in include], include_defaults=online, metadata=metadata)
            unknown = [name for name in self.names if name not in manager.all_tasks]
            if unknown:
                # Per-subject MMLU tasks are left out of the message for brevity.
                known = [n for n in manager.all_tasks if n == "mmlu_continuation" or not n.endswith("_continuation")]
                raise ValueError(f"unknown lm-eval task(s) {unknown}; available: {', '.join(known)}")
            self.task_dict = manager.load(self.names)
        self._configure(num_fewshot, fewshot_seed)
        if self.subset:
            self._restrict(self.fixed_samples(self.subset, subset_seed))

    def _subset_sizes(self, subset: Union[int, dict[str, int], None]) -> dict[str, int]:
        sizes = dict.fromkeys(self.names, subset) if isinstance(subset, int) else dict(subset or {})
        for name, size in sizes.items():
            if name not in self.names:
                raise ValueError(f"subset names task {name!r}, which is not among the tasks {self.names}")
            if size <= 0:
                raise ValueError(f"subset for {name} must be positive, got {size}")
        return sizes

    def _configure(self, num_fewshot: Optional[int], fewshot_seed: int) -> None:
        """What ``lm_eval.simple_evaluate`` does to tasks before scoring them, plus the grammar's generation length."""
        self.generation_budget = 0
        for task in self.task_dict["tasks"].values():
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=fewshot_seed)
            if task.get_config("task") == "cfg_generation":
                # Longest sentence + EOS: a sample that never ends is then longer than any sentence.
                max_new = cached_grammar(self.grammar).max_length + 1
                task.set_config(key="generation_kwargs", value={"max_gen_toks": max_new}, update=True)
                self.generation_budget = max_new

    def leaf_sizes(self) -> dict[str, int]:
        return {name: len(task.eval_docs) for name, task in self.task_dict["tasks"].items()}

    def _leaves(self, name: str) -> list[str]:
        children = self.task_dict.get("group_map", {}).get(name)
        if children is None:
            return [name]
        return [leaf for child in children for leaf in self._leaves(child)]

    def fixed_samples(self, limits: dict[str, int], seed: int = 0) -> dict[str, list[int]]:
        """A fixed random subset of about ``limits[task]`` documents per task, as lm-eval ``samples=`` ids.

        The subset depends only on (task, seed), so every evaluation in a run scores the same documents. A group
        spreads its subset over its tasks in proportion to their sizes, at least one document each.
        """
        sizes = self.leaf_sizes()
        samples: dict[str, list[int]] = {}
        for name, limit in limits.items():
            leaves = self._leaves(name)
            total = sum(sizes[leaf] for leaf in leaves)
            for leaf in leaves:
                share = sizes[leaf] if total <= limit else max(1, round(limit * sizes[leaf] / total))
                rng = random.Random(zlib.crc32(leaf.encode()) + seed)
                samples[leaf] = sorted(rng.sample(range(sizes[leaf]), min(share, sizes[leaf])))
        return samples

    def _restrict(self, samples: dict[str, list[int]]) -> None:
        """Replace each task's evaluation split by its chosen documents (already preprocessed).

        lm-eval's own ``samples=`` would do the same selection, but by reading every document of the split at each
        evaluation (seconds for HellaSwag or MMLU-Var); selecting once keeps in-training evaluations short.
        """
        import datasets

        for name, ids in samples.items():
            task = self.task_dict["tasks"][name]
            docs = task.eval_docs
            split = task.config.test_split if task.has_test_docs() else task.config.validation_split
            chosen = docs.select(ids) if isinstance(docs, datasets.Dataset) else datasets.Dataset.from_list([docs[i] for i in ids])
            task.dataset[split] = chosen
            task.config.process_docs = None  # the chosen documents are already processed

    def evaluate(self, lm, *, limit: Optional[int] = None, log_samples: bool = False,
                 progress: bool = True) -> Optional[dict[str, Any]]:
        """lm-eval's ``evaluate`` on the loaded tasks (no stderr bootstrap); the results dict on rank 0, else None.

        ``limit`` takes the first documents of each task (lm-eval's quick-look semantics). ``progress=False`` hides
        lm-eval's own progress bars (request building, tokenization), e.g. inside the training's progress bar.
        """
        from lm_eval.evaluator import evaluate

        if self.generation_budget and lm.max_length < self.generation_budget + 1:
            raise ValueError(
                f"cfg_generation needs a context of {self.generation_budget + 1} tokens (BOS + the longest "
                f"{self.grammar} sentence + EOS) but the model has {lm.max_length}; raise model_config.max_seq_len"
            )
        with contextlib.nullcontext() if progress else _without_lm_eval_bars():
            return evaluate(lm=lm, task_dict=self.task_dict, limit=limit, bootstrap_iters=0, log_samples=log_samples)
