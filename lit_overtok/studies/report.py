"""The report of a sweep (evaluation/sweep.py): markdown, JSON and PNG figures from its TensorBoard logs and checkpoints.

    python evaluation/report.py configs/sweeps/cfg3f_small.yaml                  # -> results/cfg3f_small/
    python evaluation/report.py configs/sweeps/wiki.yaml --limit 200 --output results/wiki
    python evaluation/report.py configs/sweeps/cfg3f_small.yaml --no-eval        # logs only, no checkpoint scoring

What it holds (docs/method.md §4.2, §4.7; docs/studies.md, "Reading a speedup"):

- **Verdicts** (``lit_overtok.studies.verdicts``): every arm against its baseline, seed by seed (one pair per
  seed both ran): the paired difference of final ``train/loss_next1`` and ``val/loss`` (mean with its 95%
  t-interval) and the token multiplier (geometric mean over pairs with its interval; a median counting censored
  and missing crossings where there are any), each with its verdict by the rules printed in the report.
- **Final values**: the fitted value at the last point (``convergence.final_value``: a straight line in log
  tokens through the last 25% of the run's tokens), the speedup's own target.
- **Convergence speedups** per pair by ``lit_overtok.studies.convergence`` on the training loss, ``val/loss`` and
  the in-training ``eval/*`` metrics, with their intervals; censored ("≥ X") and missing ("never") crossings as such.
- **Figures** (``lit_overtok.studies.figures``): ``loss_curves.png`` (fitted curves per seed and their mean, the
  paired difference to the baseline, parameter counts in the legend, CPU-seconds beside tokens) and, with at
  least 3 input vocabularies, ``vocab_law.png``: final loss against log10(V + m) (V: the model's vocabulary, m:
  Over-Encoding's rows) with the least-squares line through every seed's point and its slope's 95% interval (the
  paper's OLMoE fit: -0.0256 per decade). The law takes the arms that differ from the baseline in nothing but
  ``over_encoding`` (or ``report.law_arms``).
- **Benchmark scores** of the final checkpoints (``evaluation/evaluate.py``; ``paper`` = the five downstream tasks
  for text runs, ``grammar`` for cfg runs; near chance at CPU scale, reported all the same). ``--limit N`` scores
  a fixed random subset of about N documents of each task (evaluate.py's ``--limit``).
- **CPU-hours**: the sum of every point's recorded training CPU time (``done.json``), and the evaluation's own;
  beside them the commits and CPUs (model, timing flags) the points ran on (``provenance``, from ``attempts.jsonl``).

The grid file's optional ``report`` section: ``baseline`` (default: the first arm), ``baselines`` (a mapping arm ->
the arm it is compared with, for arms that differ from another baseline by one switch), ``law_arms`` (a list),
``tasks``, ``tokenizer`` (text runs whose checkpoints record none), ``limit``, ``cfg_num_docs`` (documents per grammar
task). A point resumed after an interruption has several ``version_N`` folders: they are read as one run
(``run_logs``: a later version replaces what the earlier ones logged after its first step), and the report lists which
versions each point used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from lit_overtok.checkpointing.files import find_resume_checkpoint
from lit_overtok.errors import InputError
from lit_overtok.evaluation import score_checkpoints
from lit_overtok.studies import convergence, figures, provenance, speedup, verdicts
from lit_overtok.studies.convergence import Curve
from lit_overtok.studies.run_logs import event_folders, read_run_scalars, Scalars
from lit_overtok.studies.sweep import GridError, load_grid

LOSS_METRICS = ("train/loss_next1", "val/loss")
REPORT_KEYS = {"baseline", "baselines", "law_arms", "tasks", "tokenizer", "limit", "cfg_num_docs"}
PAPER_LAW_SLOPE = -0.0256


@dataclass
class Run:
    arm: str
    seed: int
    folder: Path
    scalars: Scalars
    versions: list[str]
    done: Optional[dict[str, Any]]  # done.json; None: the point has not finished
    hparams: dict[str, Any]


# ---------------------------------------------------------------------------------------------------- reading
class _HparamsLoader(yaml.SafeLoader):
    """hparams.yaml as Lightning writes it (tuples tagged !!python/tuple), without executing anything else."""


_HparamsLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node)))


def read_run(arm: str, seed: int, folder: Path) -> Optional[Run]:
    """A point's stitched scalars (``run_logs``), or None when it has logged nothing yet."""
    try:
        versions = event_folders(str(folder))
    except FileNotFoundError:
        return None
    hparams_files = [v / "hparams.yaml" for v in versions if (v / "hparams.yaml").is_file()]
    hparams = yaml.load(hparams_files[-1].read_text(), Loader=_HparamsLoader) if hparams_files else {}
    done = json.loads((folder / "done.json").read_text()) if (folder / "done.json").is_file() else None
    return Run(arm, seed, folder, read_run_scalars(str(folder)), [v.name for v in versions], done, hparams or {})


def input_vocabulary(run: Run) -> Optional[int]:
    """V + m (docs/method.md §4.7): the model's vocabulary plus Over-Encoding's rows (m = 0 without it)."""
    model = run.hparams.get("model_config") or {}
    if not model.get("vocab_size"):
        return None
    return int(model["vocab_size"]) + int((model.get("over_encoding") or {}).get("m", 0))


def law_signature(run: Run) -> str:
    """The model config without its input vocabulary: arms with equal signatures differ only in Over-Encoding."""
    model = {k: v for k, v in (run.hparams.get("model_config") or {}).items() if k != "over_encoding"}
    return json.dumps(model, sort_keys=True, default=str)


def parameter_label(run: Run) -> str:
    """The arm with its parameter counts (hparams.yaml's ``parameter_counts``), for legends and tables."""
    counts = run.hparams.get("parameter_counts") or {}
    if not counts.get("total"):
        return run.arm
    return (f"{run.arm}: {counts['total'] / 1e6:.2f}M params, "
            f"{counts.get('non_embedding', 0) / 1e6:.2f}M non-embedding")


# ----------------------------------------------------------------------------------------------------- numbers
def curve(run: Run, metric: str) -> Curve:
    return speedup.token_curve(run.scalars, metric, f"{run.arm}/seed{run.seed}")


def finals(runs_by_arm: dict[str, list[Run]]) -> dict[str, dict[str, Any]]:
    """Per arm: input vocabulary, parameter counts, and per loss metric the seeds' final values (fitted, as the
    speedup's target), their mean and spread (max - min)."""
    table = {}
    for arm, runs in runs_by_arm.items():
        row: dict[str, Any] = {"input_vocab": input_vocabulary(runs[0]), "seeds": [r.seed for r in runs],
                               "tokens": float(curve(runs[0], LOSS_METRICS[0]).tokens[-1]),
                               "parameters": runs[0].hparams.get("parameter_counts"),
                               "label": parameter_label(runs[0])}
        for metric in LOSS_METRICS:
            values = {r.seed: convergence.final_value(curve(r, metric)) for r in runs if metric in r.scalars}
            if values:
                row[metric] = {"seeds": list(values), "per_seed": list(values.values()),
                               "mean": float(np.mean(list(values.values()))),
                               "spread": float(np.ptp(list(values.values())))}
        table[arm] = row
    return table


def fit_line(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Least squares y = intercept + slope x, with R² and the slope's 95% t-interval (n - 2 degrees of freedom;
    None with two points, through which any line passes)."""
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(((y - (intercept + slope * x)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    low = high = None
    if x.size > 2:
        half = verdicts.t975(x.size - 2) * math.sqrt(residual / (x.size - 2) / float(((x - x.mean()) ** 2).sum()))
        low, high = float(slope - half), float(slope + half)
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1.0 - residual / total if total > 0 else 1.0,
            "points": int(x.size), "distinct": int(np.unique(x).size), "slope_low": low, "slope_high": high}


def vocabulary_law(final: dict[str, dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """The log-linear fit of each loss metric through every seed's point of ``arms`` (None where fewer than
    ``figures.MIN_LAW_POINTS`` input vocabularies)."""
    law: dict[str, Any] = {"arms": arms}
    for metric in LOSS_METRICS:
        points = [(math.log10(final[a]["input_vocab"]), value) for a in arms
                  if final[a]["input_vocab"] and metric in final[a] for value in final[a][metric]["per_seed"]]
        distinct = len({x for x, _ in points})
        law[metric] = fit_line(*map(np.array, zip(*points))) if distinct >= figures.MIN_LAW_POINTS else None
    return law


def speedups(baseline: list[Run], treatment: list[Run], skipped: set[str]) -> list[dict[str, Any]]:
    """``convergence.estimate`` for every metric both runs of a seed logged (speedup.py's), seed by seed; metrics
    of unknown direction are left out and named in ``skipped``."""
    rows = []
    base_by_seed = {r.seed: r for r in baseline}
    for treat in treatment:
        base = base_by_seed.get(treat.seed)
        if base is None:
            continue
        for metric in speedup.default_metrics(base.scalars, treat.scalars):
            try:
                lower = convergence.lower_is_better(metric)
            except InputError:
                skipped.add(metric)
                continue
            result, _, _ = speedup.measure(metric, curve(base, metric), curve(treat, metric), lower)
            rows.append({"arm": treat.arm, "baseline": base.arm, "seed": treat.seed, **result.as_dict()})
    return rows


def paired(final: dict[str, dict[str, Any]], baselines: dict[str, str]) -> list[dict[str, Any]]:
    """The paired difference of each arm's final losses from its baseline's, with its verdict."""
    rows = []
    for arm, base in baselines.items():
        for metric in LOSS_METRICS:
            if metric not in final[arm] or metric not in final[base]:
                continue
            by_seed = [dict(zip(final[a][metric]["seeds"], final[a][metric]["per_seed"])) for a in (base, arm)]
            result = verdicts.paired_difference(*by_seed)
            if result is not None:
                rows.append({"arm": arm, "baseline": base, "metric": metric, **vars(result), "text": result.text()})
    return rows


def multipliers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The token multiplier of each arm and metric over its pairs (``verdicts.multiplier``)."""
    groups: dict[tuple[str, str, str], list[convergence.Speedup]] = {}
    fields = {f.name for f in dataclasses.fields(convergence.Speedup)}
    for row in rows:
        groups.setdefault((row["arm"], row["baseline"], row["metric"]), []).append(
            convergence.Speedup(**{k: v for k, v in row.items() if k in fields}))
    return [{"arm": arm, "baseline": base, "metric": metric, **vars(summary), "text": summary.text(),
             "per_seed": [f"{r['seed']}: {r['text']}" for r in rows if (r["arm"], r["metric"]) == (arm, metric)]}
            for (arm, base, metric), results in groups.items() for summary in [verdicts.multiplier(results)]]


def evaluate_checkpoints(runs: list[Run], tasks: str, limit: Optional[int], tokenizer: Optional[str],
                         cfg_num_docs: Optional[int], out_dir: Path) -> dict[str, Any]:
    """Score each finished point's final checkpoint (its newest sound one) with evaluation/evaluate.py; its files go
    to ``out_dir``."""
    scored = [(run, find_resume_checkpoint(run.folder)) for run in runs]
    scored = [(run, ckpt) for run, ckpt in scored if ckpt is not None]
    before = resource.getrusage(resource.RUSAGE_SELF)
    argv = ["--checkpoint", *[str(c) for _, c in scored], "--tasks", tasks, "--output-dir", str(out_dir)]
    argv += ["--limit", str(limit)] if limit else []
    argv += ["--tokenizer", tokenizer] if tokenizer else []
    argv += ["--cfg-num-docs", str(cfg_num_docs)] if cfg_num_docs else []
    try:
        rows, error = (score_checkpoints.main(argv) if scored else []), None
    except (ValueError, FileNotFoundError) as failure:  # e.g. a task the model cannot hold: report it, keep the rest
        rows, error = [], f"{type(failure).__name__}: {failure}"
        print(f"evaluation failed: {error}", file=sys.stderr)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"tasks": tasks, "limit": limit, "cfg_num_docs": cfg_num_docs, "error": error,
            "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "per_point": [{"arm": run.arm, "seed": run.seed, "checkpoint": str(ckpt), "step": row["step"],
                           "scores": row["scores"], "downstream": row["downstream"]}
                          for (run, ckpt), row in zip(scored, rows)]}


# ------------------------------------------------------------------------------------------------------ output
def plot_curves(runs_by_arm: dict[str, list[Run]], baselines: dict[str, str], final: dict[str, dict[str, Any]],
                seconds_per_token: Optional[float], path: Path) -> None:
    curves = {metric: {arm: {r.seed: curve(r, metric) for r in runs if metric in r.scalars}
                       for arm, runs in runs_by_arm.items() if any(metric in r.scalars for r in runs)}
              for metric in LOSS_METRICS}
    figures.plot_study(curves, baselines, {arm: row["label"] for arm, row in final.items()}, seconds_per_token, path)


def plot_law(final: dict[str, dict[str, Any]], law: dict[str, Any], path: Path) -> bool:
    points = {metric: {arm: (math.log10(final[arm]["input_vocab"]), final[arm][metric]["per_seed"])
                       for arm in law["arms"] if final[arm]["input_vocab"] and metric in final[arm]}
              for metric in LOSS_METRICS}
    return figures.plot_law(points, {m: law[m] for m in LOSS_METRICS}, PAPER_LAW_SLOPE, path)


def seed_summary(values: dict[str, Any]) -> str:
    """Mean over seeds ± half their range (max - min), and the number of seeds."""
    count = len(values["per_seed"])
    if count == 1:
        return f"{values['mean']:.4f} (1 seed)"
    return f"{values['mean']:.4f} ± {values['spread'] / 2:.4f} ({count} seeds)"


def law_line(metric: str, fit: Optional[dict[str, Any]]) -> str:
    if fit is None:
        return (f"- {metric}: fewer than {figures.MIN_LAW_POINTS} input vocabularies among the arms: no fit (a line "
                "through two points says nothing)")
    interval = "" if fit["slope_low"] is None else f" [{fit['slope_low']:+.4f}, {fit['slope_high']:+.4f}]"
    return (f"- {metric}: L = {fit['intercept']:.4f} {fit['slope']:+.4f}{interval} · log10(V + m), R² = "
            f"{fit['r2']:.3f} over {fit['points']} runs at {fit['distinct']} input vocabularies (95% interval of "
            f"the slope; paper, OLMoE-1.3B: {PAPER_LAW_SLOPE} per decade)")


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Study `{report['name']}`", "", f"Grid: `{report['grid']}`; baseline arm `{report['baseline']}`"
             + "".join(f"; `{arm}` against `{base}`" for arm, base in report["baselines"].items()
                       if base != report["baseline"]) + ". "
             f"Training CPU-hours: **{report['cpu_hours']:.3f}** over {report['points_done']} finished points "
             f"(attempts killed before they could record their time are not counted). Ran on: "
             f"{report['provenance']}.", "",
             "## Verdicts", "", "Each arm against its baseline, seed by seed (one pair per seed both ran). The rules "
             "(docs/studies.md, \"Reading a speedup\"):", "", verdicts.rules_markdown(), "",
             "### Final loss: treatment − baseline, paired by seed", "",
             "Final value: the fitted value at the last point (a straight line in log tokens through the last 25% of "
             "the run's tokens). Mean over pairs [95% t-interval].", "",
             "| arm | against | metric | per seed | mean [95% interval] (pairs): verdict |", "|---|---|---|---|---|"]
    for row in report["paired"]:
        per_seed = ", ".join(f"{seed}: {d:+.4f}" for seed, d in zip(row["seeds"], row["differences"]))
        lines.append(f"| {row['arm']} | {row['baseline']} | {row['metric']} | {per_seed} | {row['text']} |")
    lines += ["", "### Token multiplier: how many times fewer tokens the arm needs to reach its baseline's final value",
              "", speedup.DEFINITION.format(window=convergence.DEFAULT_WINDOW) + " Summary over pairs: the geometric "
              "mean [95% t-interval], or with one pair the estimator's interval; where a pair is censored or never "
              "crosses, the median over pairs (a censored pair counting above every finite one, a missing crossing "
              "below), which may itself be a bound.", "",
              "| arm | against | metric | per seed | summary (pairs): verdict |", "|---|---|---|---|---|"]
    for row in report["multipliers"]:
        lines.append(f"| {row['arm']} | {row['baseline']} | {row['metric']} | {'; '.join(row['per_seed'])} | "
                     f"{row['text']} |")
    if any(r["uninformative"] for r in report["speedups"]):
        lines += ["", "Uninformative readings (the baseline's fitted curve starts at or beyond its final value, e.g. a "
                  "single evaluation): " + ", ".join(sorted({f"{r['arm']}/{r['metric']}" for r in report["speedups"]
                                                             if r["uninformative"]})) + "."]
    if report["skipped_metrics"]:
        lines += ["", "Not measured (direction unknown; `evaluation/speedup.py --lower-is-better/--higher-is-better` "
                  "measures them): " + ", ".join(report["skipped_metrics"]) + "."]
    lines += ["", "## Loss curves", "", "![loss curves](loss_curves.png)", "", "## Final loss", "",
              "Mean over seeds ± half their range.", "",
              "| arm | parameters | input vocab V + m | tokens | " + " | ".join(f"final {m}" for m in LOSS_METRICS) + " |",
              "|---|---|---|---|" + "---|" * len(LOSS_METRICS)]
    for arm, row in report["final"].items():
        cells = [seed_summary(row[m]) if m in row else "—" for m in LOSS_METRICS]
        lines.append(f"| {arm} | {row['label'].partition(': ')[2] or '—'} | {row['input_vocab'] or '—'} | "
                     f"{speedup.format_tokens(row['tokens'])} | " + " | ".join(cells) + " |")
    law = report["law"]
    lines += ["", "## Loss against log10(input vocabulary)", "", f"Arms fitted: {', '.join(law['arms'])}.", ""]
    lines += [law_line(metric, law[metric]) for metric in LOSS_METRICS]
    if report["law_plot"]:
        lines += ["", "![vocabulary law](vocab_law.png)"]
    evaluation = report.get("evaluation")
    lines += ["", "## Benchmarks of the final checkpoints", ""]
    if evaluation is None:
        lines.append("Not run (`--no-eval`).")
    elif evaluation["error"]:
        lines.append(f"`evaluation/evaluate.py --tasks {evaluation['tasks']}` failed: {evaluation['error']}")
    else:
        tasks = sorted({t for p in evaluation["per_point"] for t in p["scores"]})
        documents = f", {evaluation['cfg_num_docs']} documents per grammar task" if evaluation["cfg_num_docs"] else ""
        lines += [f"`evaluation/evaluate.py --tasks {evaluation['tasks']}`, limit {evaluation['limit']}{documents}, "
                  f"{evaluation['cpu_seconds']:.0f} CPU s; files in `eval/`.", "",
                  "| arm | seed | step | " + " | ".join(tasks) + " | downstream |", "|---|---|---|" + "---|" * (len(tasks) + 1)]
        for point in evaluation["per_point"]:
            scores = [" / ".join(f"{k} {v:.3f}" for k, v in sorted(point["scores"].get(t, {}).items())) for t in tasks]
            downstream = "—" if point["downstream"] is None else f"{point['downstream']:.4f}"
            lines.append(f"| {point['arm']} | {point['seed']} | {point['step']} | " + " | ".join(scores) + f" | {downstream} |")
    lines += ["", "## Runs", "", "| arm | seed | finished | last step | versions | CPU s |", "|---|---|---|---|---|---|"]
    for run in report["runs"]:
        lines.append(f"| {run['arm']} | {run['seed']} | {'yes' if run['done'] else 'no'} | {run['last_step']} | "
                     f"{' + '.join(run['versions'])} | {run['cpu_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def report_baselines(options: dict[str, Any], grid_path: Path, arms: list[str], baseline: str) -> dict[str, str]:
    """Arm -> the arm it is compared with: ``report.baselines``, else the baseline (which itself has none)."""
    given = options.get("baselines") or {}
    if not isinstance(given, dict):
        raise GridError(f"{grid_path}: report.baselines: a mapping of arm to its baseline arm; got {given!r}")
    for arm, base in given.items():
        for name, role in ((arm, "arm"), (base, "baseline")):
            if name not in arms:
                raise GridError(f"{grid_path}: report.baselines: no {role} {name!r}; arms: {', '.join(arms)}")
    return {arm: given.get(arm, baseline) for arm in arms if arm != baseline or arm in given}


# ------------------------------------------------------------------------------------------------------ main
def build(grid_path: str, output: Optional[str] = None, evaluate: bool = True, limit: Optional[int] = None,
          tasks: Optional[str] = None, tokenizer: Optional[str] = None) -> dict[str, Any]:
    """Read a sweep's finished points and write its report (report.md, report.json, figures) to ``output``."""
    grid = load_grid(grid_path)
    options = grid.report
    unknown = sorted(set(options) - REPORT_KEYS)
    if unknown:
        raise GridError(f"{grid.path}: report: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(REPORT_KEYS))}")
    baseline = options.get("baseline", next(iter(grid.arms)))
    if baseline not in grid.arms:
        raise GridError(f"{grid.path}: report.baseline: no arm {baseline!r}; arms: {', '.join(grid.arms)}")
    out = Path(output or Path("results") / grid.name)
    out.mkdir(parents=True, exist_ok=True)

    runs = [run for arm in grid.arms.values() for seed in arm.seeds
            if (run := read_run(arm.name, seed, grid.output / arm.name / f"seed{seed}")) is not None]
    if not runs:
        raise GridError(f"{grid.output}: no point has logged anything yet; run evaluation/sweep.py {grid.path} first")
    finished: dict[str, list[Run]] = {}
    for run in runs:
        if run.done is not None:
            finished.setdefault(run.arm, []).append(run)
    if baseline not in finished:
        raise GridError(f"{grid.output}: the baseline arm {baseline!r} has no finished point yet")
    final = finals(finished)
    baselines = {arm: base for arm, base in report_baselines(options, grid.path, list(grid.arms), baseline).items()
                 if arm in finished and base in finished}
    law_arms = options.get("law_arms") or [a for a in finished
                                           if law_signature(finished[a][0]) == law_signature(finished[baseline][0])]
    missing = [a for a in law_arms if a not in finished]
    if missing:
        raise GridError(f"{grid.path}: report.law_arms: {', '.join(missing)} has no finished point")
    attempts = [json.loads(line) for rs in finished.values() for r in rs if (r.folder / "attempts.jsonl").is_file()
                for line in (r.folder / "attempts.jsonl").read_text().splitlines() if line]
    report: dict[str, Any] = {
        "name": grid.name, "grid": str(grid.path), "baseline": baseline, "provenance": provenance.describe(attempts),
        "cpu_hours": sum(r.done["cpu_seconds"] for rs in finished.values() for r in rs) / 3600,
        "points_done": sum(len(rs) for rs in finished.values()),
        "runs": [{"arm": r.arm, "seed": r.seed, "done": r.done is not None, "versions": r.versions,
                  "last_step": int(max(s[-1] for t, (s, _) in r.scalars.items() if s.size and not t.endswith("_by_tokens"))),
                  "cpu_seconds": r.done["cpu_seconds"] if r.done else 0.0} for r in runs],
        "baselines": baselines, "verdict_rules": verdicts.VERDICT_RULES, "final": final,
        "law": vocabulary_law(final, law_arms), "paired": paired(final, baselines),
    }
    skipped: set[str] = set()
    report["speedups"] = [row for arm, base in baselines.items()
                          for row in speedups(finished[base], finished[arm], skipped)]
    report["multipliers"] = multipliers(report["speedups"])
    report["skipped_metrics"] = sorted(skipped)
    if evaluate:
        all_finished = [r for rs in finished.values() for r in rs]
        default_tasks = "grammar" if all_finished[0].hparams.get("grammar") else "paper"
        report["evaluation"] = evaluate_checkpoints(all_finished, tasks or options.get("tasks", default_tasks),
                                                    limit or options.get("limit"), tokenizer or options.get("tokenizer"),
                                                    options.get("cfg_num_docs"), out / "eval")
    base_runs = finished[baseline]
    seconds_per_token = float(np.mean([r.done["cpu_seconds"] / final[baseline]["tokens"] for r in base_runs]))
    plot_curves(finished, baselines, final, seconds_per_token or None, out / "loss_curves.png")
    (out / "vocab_law.png").unlink(missing_ok=True)  # a law plot of an earlier report must not outlive its law
    report["law_plot"] = plot_law(final, report["law"], out / "vocab_law.png")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
    print(f"report: {out / 'report.md'}", file=sys.stderr)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="the sweep's grid YAML file")
    parser.add_argument("--output", default=None, help="report folder (default results/<name>)")
    parser.add_argument("--no-eval", action="store_true", help="skip scoring the final checkpoints")
    parser.add_argument("--limit", type=int, default=None, help="score a fixed random subset of about N documents per task")
    parser.add_argument("--tasks", default=None, help="evaluate.py tasks (default: grammar for cfg runs, else paper)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer of text runs whose checkpoints record none")
    args = parser.parse_args(argv)
    # A bad grid or a missing run raises: the script (exit_on_user_error) makes it one line, exit status 2.
    report = build(args.grid, args.output, not args.no_eval, args.limit, args.tasks, args.tokenizer)
    return 1 if (report.get("evaluation") or {}).get("error") else 0

