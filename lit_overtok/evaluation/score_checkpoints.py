"""Score checkpoints on lm-eval tasks: one checkpoint or a glob of them, offline by default.

    python evaluation/evaluate.py --checkpoint 'runs/x/version_0/checkpoints/*.ckpt' --tasks paper \\
        --tokenizer ../shared/data/tokenizers/gpt2/tokenizer.json --limit 100
    python evaluation/evaluate.py --checkpoint runs/default/version_0/checkpoints/last.ckpt --tasks grammar

A checkpoint is a ``.ckpt`` file or the folder a sharded run (row-sharded Over-Encoding tables, FSDP2) saves at any
world size; it is evaluated here in one process.

Tasks: lm-eval names or groups (``hellaswag``, ``arc_easy``, ``arc_challenge``, ``piqa``, ``mmlu_continuation``,
``mmlu_var``, ``cfg_generation``, ``cfg_next_token_validity``) or the sets ``paper`` (the five downstream tasks)
and ``grammar``. Offline they read ``<data-dir>/<task>/*.jsonl``; ``--online`` uses lm-eval's own task files.
The tokenizer is the one the checkpoint was trained with (its grammar, or the tokenizer file recorded in it or in its
shards' manifest: ``checkpointing/tokenizer_binding.py``); a ``--tokenizer`` that is not that one (another sha256,
another grammar) is refused unless ``--allow-tokenizer-change``.
Every checkpoint is verified before it is loaded (``lit_overtok.checkpointing.files``); among several, a damaged one
(or a link to a removed file) is reported and the others are scored (exit status 1 when any was skipped); a single
checkpoint that cannot be read is a one-line error (exit status 2). A ``last.ckpt`` link is
scored once, under its step file's name, when the glob lists both.

For each checkpoint writes ``<output-dir>/<name>.json`` (default ``<run>/eval/`` of the run the checkpoints belong to) (lm-eval's results format, plus ``config`` with the
checkpoint, step and tokens) and ``<name>.md`` (lm-eval's tables); ``summary.md`` has one row per checkpoint.
``--limit N`` scores a fixed random subset of about N documents of each task, the in-training evaluation's
(``TaskSuite(subset=...)``): a group such as ``mmlu_continuation`` spreads them over its subjects, and ``mmlu_var``'s
are drawn from all its questions and variants, so a limited ``eval/downstream`` is not skewed to the first subject.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from lit_overtok.checkpointing.inference import is_sharded_checkpoint, network, read_checkpoint
from lit_overtok.checkpointing.outputs import output_path, run_folder
from lit_overtok.checkpointing.tokenizer_binding import TokenizerBinding
from lit_overtok.evaluation.runner import downstream_score, PRIMARY_METRICS, task_scores, TaskSuite
from lit_overtok.evaluation.tokenizers import load_tokenizer
from lit_overtok.errors import exit_on_user_error, InputError
from lit_overtok.evaluation.adapter import OverTokEvalLM
from lit_overtok.nn.transformer import Transformer


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, nargs="+", help="checkpoint files or globs")
    parser.add_argument("--tasks", default="paper", help="comma-separated task names or sets (paper, grammar)")
    parser.add_argument("--limit", type=int, default=None,
                        help="score a fixed random subset of about N documents per task (spread over a group's tasks)")
    parser.add_argument("--data-dir", default=None,
                        help="offline task data (default: $LIT_OVERTOK_DATA, else ../shared/data beside a checkout)")
    parser.add_argument("--tokenizer", default=None, help="tokenizers JSON path or grammar:<name> (default: from the "
                        "checkpoint; another one is refused)")
    parser.add_argument("--allow-tokenizer-change", action="store_true",
                        help="score with a --tokenizer other than the one the checkpoint was trained with (a warning)")
    parser.add_argument("--grammar", default=None, help="grammar of the cfg tasks (default: the checkpoint's)")
    parser.add_argument("--cfg-num-docs", type=int, default=None, help="documents per grammar task (default 256)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's, else 0)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed of generation tasks")
    parser.add_argument("--online", action="store_true", help="standard task names use lm-eval's own files and datasets")
    parser.add_argument("--output-dir", default=None,
                        help="where the results go (default: <run>/eval of the checkpoints' run folder)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        parser.error(f"--limit must be positive, got {args.limit}")
    return args


def find_checkpoints(patterns: list[str]) -> list[Path]:
    """The checkpoints to score, each once: a ``last.ckpt`` link to a step file already listed is that file.

    What a glob matches is kept even if it cannot be read (a link to a removed file): it is reported and skipped
    with the other bad checkpoints. A path named without a glob must exist.
    """
    paths: dict[Path, Path] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"--checkpoint {pattern!r} matches no file")
        for match in matches:
            if not glob.has_magic(pattern) and not (Path(match).is_file() or is_sharded_checkpoint(match)):
                raise FileNotFoundError(f"checkpoint {match} does not exist (a .ckpt file or a sharded checkpoint folder)")
            paths.setdefault(Path(match).resolve(), Path(match))
    return list(paths.values())


def load_checkpoint(path: Path, device: str) -> tuple[Transformer, dict[str, Any]]:
    """The network and the checkpoint's metadata (step, tokens, the data module's hyperparameters).
    A sharded run's checkpoint folder, saved at any world size, loads here at world size 1."""
    checkpoint = read_checkpoint(path)  # verified; training or inference (train.py strip) checkpoints alike
    module = network(checkpoint)  # sharded tables materialized whole (world size 1)
    meta = {
        "global_step": checkpoint.get("global_step"),
        "tokens_seen": checkpoint.get("tokens_seen"),
        "data": dict(checkpoint.get("datamodule_hyper_parameters") or {}),
        "tokenizer": TokenizerBinding.of_checkpoint(checkpoint, path),
        "model_config": checkpoint["hyper_parameters"]["model_config"],
    }
    return module.to(device).eval(), meta


def output_names(paths: list[Path]) -> list[str]:
    """File names for the results: the checkpoint paths below their common folder, '/' -> '__'."""
    given = [Path(os.path.abspath(p)) for p in paths]  # links not followed: named as given, even if their file is gone
    common = Path(os.path.commonpath([p.parent for p in given]))
    return ["__".join(p.with_suffix("").relative_to(common).parts) for p in given]


def markdown_report(name: str, results: dict[str, Any], downstream: Optional[float]) -> str:
    from lm_eval.utils import make_table

    config = results["config"]
    lines = [f"# {name}", "", f"checkpoint `{config['checkpoint']}`, step {config['global_step']}, "
             f"tokens {config['tokens_seen']}, limit {config['limit']}", "", make_table(results)]
    if results.get("groups"):
        lines += ["", make_table(results, "groups")]
    if downstream is not None:
        lines += ["", f"downstream (mean of the paper's five tasks, OLMo's metric per task): {downstream:.4f}"]
    return "\n".join(lines) + "\n"


def summary_table(rows: list[dict[str, Any]], names: list[str]) -> str:
    header = ["checkpoint", "step", "tokens"] + [f"{n} {PRIMARY_METRICS.get(n, 'acc')}" for n in names] + ["downstream"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | skipped: {row['error']} |")
            continue
        cells = [row["name"], str(row["step"]), str(row["tokens"])]
        cells += [f"{row['scores'].get(n, {}).get(PRIMARY_METRICS.get(n, 'acc'), float('nan')):.4f}" for n in names]
        cells.append("" if row["downstream"] is None else f"{row['downstream']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def task_suite(args: argparse.Namespace, grammar: Optional[str]) -> TaskSuite:
    """The tasks to score; ``--limit`` selects the same documents for every checkpoint (a seeded subset)."""
    return TaskSuite(args.tasks.split(","), data_dir=args.data_dir, grammar=grammar, cfg_num_docs=args.cfg_num_docs,
                     num_fewshot=args.num_fewshot, online=args.online, subset=args.limit)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    from lm_eval.utils import handle_non_serializable

    args = parse_args(argv)
    paths = find_checkpoints(args.checkpoint)
    runs = sorted({str(run_folder(path)) for path in paths})
    if args.output_dir is None and len(runs) > 1:
        raise InputError(f"--checkpoint: the checkpoints belong to {len(runs)} runs ({', '.join(runs[:3])}"
                         f"{', ...' if len(runs) > 3 else ''}); give --output-dir for their results")
    out_dir = output_path(args.output_dir, paths[0], "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    suite: Optional[TaskSuite] = None
    rows = []
    for path, name in tqdm(list(zip(paths, output_names(paths))), desc="checkpoints", disable=len(paths) == 1):
        start = time.perf_counter()
        try:
            module, meta = load_checkpoint(path, args.device)
            tokenizer = load_tokenizer(meta["tokenizer"].resolve(args.tokenizer, args.allow_tokenizer_change))
        except (InputError, ValueError, FileNotFoundError) as error:  # this checkpoint only: score the others
            if len(paths) == 1:
                raise  # nothing else to score: the one-line error of a bad input (exit status 2)
            print(f"skipping {path}: {error}", file=sys.stderr)
            rows.append({"name": name, "error": str(error)})
            continue
        if suite is None:
            grammar = args.grammar or meta["data"].get("grammar")
            suite = task_suite(args, grammar)
        lm = OverTokEvalLM(module, tokenizer, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                           seed=args.seed)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            results = suite.evaluate(lm)
        scores = task_scores(results, suite.names)
        downstream = downstream_score(scores)
        results["config"] = {
            "model": type(module).__name__, "checkpoint": str(path), "global_step": meta["global_step"],
            "tokens_seen": meta["tokens_seen"], "model_config": meta["model_config"], "tokenizer": tokenizer.name,
            "limit": args.limit, "num_fewshot": args.num_fewshot, "device": args.device, "precision": args.precision,
            "data_dir": args.data_dir, "online": args.online, "seed": args.seed,
            "wall_time_s": time.perf_counter() - start,
        }
        results["downstream"] = downstream
        results["date"] = time.time()
        (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable))
        (out_dir / f"{name}.md").write_text(markdown_report(name, results, downstream))
        rows.append({"name": name, "step": meta["global_step"], "tokens": meta["tokens_seen"], "scores": scores,
                     "downstream": downstream})
    table = summary_table(rows, suite.names if suite is not None else [])
    (out_dir / "summary.md").write_text(table)
    print(table)
    print(f"results in {out_dir}/", file=sys.stderr)
    return rows


def run(argv: Optional[list[str]] = None) -> None:
    """The command: exit status 1 when any checkpoint was skipped, 2 for bad input (one line)."""
    sys.exit(1 if any("error" in row for row in exit_on_user_error(main, argv)) else 0)
