"""Run a study: a grid of ``train.py fit`` runs (arms x seeds) from a YAML file, resumable, in parallel or on SLURM.

    python evaluation/sweep.py configs/sweeps/cfg3f_small.yaml --jobs 2          # two single-threaded runs at a time
    python evaluation/sweep.py configs/sweeps/cfg3f_small.yaml --dry-run         # the points and their commands
    python evaluation/sweep.py configs/sweeps/wiki.yaml --executor slurm --jobs 16 --threads-per-job 8 \\
        --gpus-per-job 1 --slurm-partition gpu --time-min 720

The grid file (paths relative to the folder the command runs in, like ``train.py``'s):

    name: cfg3f_small                     # the study; output defaults to runs/sweeps/<name>
    output: runs/sweeps/cfg3f_small       # optional
    config: configs/cfg/cfg3f_small.yaml  # optional default --config of every arm (a path or a list of paths)
    overrides: {trainer.max_steps: 300}   # optional, every arm: train.py keys without "--", values in YAML
    seeds: [1, 2]                         # each point gets --seed_everything <seed> (see seed_keys)
    seed_keys: [seed_everything]          # optional: the train.py keys that receive the seed
    env: {}                               # optional extra environment of every run
    arms:                                 # in order; the first is the baseline of the report
      baseline: {}
      oe: {config: configs/cfg/cfg3f_small_oe.yaml, overrides: {...}, seeds: [1, 2, 3]}
    report: {...}                         # read by evaluation/report.py only

Every point (arm, seed) is a real ``train.py fit`` subprocess writing ``<output>/<arm>/seed<seed>/``: ``train.log``
(its output), ``point.json`` (its arguments), ``attempts.jsonl`` (wall and CPU seconds of each attempt, from the
kernel's accounting of that process tree) and, after a successful fit, ``done.json``. Lightning writes
``version_N/`` beside them. Re-running the command skips finished points and resumes an interrupted one from its
latest checkpoint (``--ckpt_path``); a point whose arguments changed since it started is refused, not mixed.
A failed point is reported with the end of its log and the others go on; the exit status is 1 if any failed.

Parallelism: ``--jobs N`` runs N points at once (``concurrent.futures``); each run's thread pools are pinned through
the environment (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ... = ``--threads-per-job``, default cores // jobs), so
N runs never ask for more threads than there are cores. On 2 cores two single-threaded runs do more work than one
two-threaded run (issue 12). ``--executor slurm`` submits the same points as a SLURM job array through submitit
(``--jobs`` = how many run at once); ``--executor local`` is submitit's local executor, for trying that path here.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import as_completed, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lit_overtok.checkpointing.files import find_resume_checkpoint
from lit_overtok.errors import InputError
from lit_overtok.studies import provenance

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS")
GRID_KEYS = {"name", "output", "config", "overrides", "seeds", "seed_keys", "env", "arms", "report"}
ARM_KEYS = {"config", "overrides", "seeds"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
LOG_TAIL_LINES = 20


class GridError(InputError):
    """A grid file that cannot be run; the message names the file and the field."""


@dataclass
class Arm:
    name: str
    configs: list[str]
    overrides: dict[str, Any]
    seeds: list[int]


@dataclass
class Grid:
    path: Path
    name: str
    output: Path
    arms: dict[str, Arm]
    seed_keys: list[str]
    env: dict[str, str]
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Point:
    """One run of the grid: everything a worker (a thread here, a SLURM job there) needs, picklable."""

    arm: str
    seed: int
    folder: str
    args: list[str]  # train.py's arguments, without --ckpt_path (what identifies the point)
    env: dict[str, str]  # set on top of the worker's environment
    workdir: str
    python: str = sys.executable
    launcher: tuple[str, ...] = ("-m", "lit_overtok")  # train.py's CLI, also in an installed copy without train.py

    @property
    def label(self) -> str:
        return f"{self.arm}/seed{self.seed}"

    @property
    def path(self) -> Path:
        return Path(self.workdir) / self.folder  # absolute even where a SLURM job starts in another folder


# ------------------------------------------------------------------------------------------------- grid files
def _seed_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise GridError(f"{where}: a non-empty list of integer seeds, e.g. [1, 2]; got {value!r}")
    if len(set(value)) != len(value):
        raise GridError(f"{where}: seeds repeat: {value}")
    return list(value)


def _config_list(value: Any, where: str) -> list[str]:
    configs = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise GridError(f"{where}: a config path or a list of them; got {value!r}")
    for config in configs:
        if not Path(config).is_file():
            raise GridError(f"{where}: {config} does not exist (paths are relative to {Path.cwd()})")
    return configs


def _overrides(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GridError(f"{where}: a mapping of train.py keys to values, e.g. {{trainer.max_steps: 300}}; got {value!r}")
    for key in value:
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise GridError(f"{where}: {key!r} is not a train.py key; write keys without '--', e.g. trainer.max_steps")
    return dict(value)


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; every error names the file and the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise GridError(f"{path}: cannot read the grid file: {error}") from None
    try:
        return _parse_grid(path, raw)
    except GridError as error:
        raise GridError(f"{path}: {error}") from None


def _parse_grid(path: Path, raw: Any) -> Grid:
    if not isinstance(raw, dict):
        raise GridError("the grid file must be a mapping with name, seeds and arms")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise GridError(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(GRID_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise GridError(f"name: a folder-safe study name (letters, digits, _ . -); got {name!r}")
    seeds = _seed_list(raw.get("seeds"), "seeds")
    configs = _config_list(raw.get("config"), "config")
    overrides = _overrides(raw.get("overrides"), "overrides")
    seed_keys = raw.get("seed_keys", ["seed_everything"])
    if not isinstance(seed_keys, list) or not seed_keys or not all(isinstance(k, str) for k in seed_keys):
        raise GridError(f"seed_keys: a list of train.py keys, e.g. [seed_everything, data.init_args.seed]; got {seed_keys!r}")
    env = raw.get("env") or {}
    if not isinstance(env, dict):
        raise GridError(f"env: a mapping of environment variables; got {env!r}")
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise GridError("arms: a mapping of arm names to {config, overrides, seeds}; got " + repr(arms_raw))
    arms = {}
    for arm_name, spec in arms_raw.items():
        where = f"arms.{arm_name}"
        if not isinstance(arm_name, str) or not SAFE_NAME.match(arm_name):
            raise GridError(f"{where}: arm names must be folder-safe (letters, digits, _ . -)")
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - ARM_KEYS:
            raise GridError(f"{where}: an arm takes {', '.join(sorted(ARM_KEYS))}; got {spec!r}")
        arm_configs = _config_list(spec["config"], f"{where}.config") if "config" in spec else configs
        if not arm_configs:
            raise GridError(f"{where}: no config; give the arm a config or the grid a default config")
        arm_seeds = _seed_list(spec["seeds"], f"{where}.seeds") if "seeds" in spec else seeds
        arms[arm_name] = Arm(arm_name, arm_configs, {**overrides, **_overrides(spec.get("overrides"), f"{where}.overrides")},
                             arm_seeds)
    report = raw.get("report") or {}
    if not isinstance(report, dict):
        raise GridError(f"report: a mapping (see evaluation/report.py); got {report!r}")
    output = Path(raw.get("output") or Path("runs") / "sweeps" / name)
    return Grid(path, name, output, arms, seed_keys, {str(k): str(v) for k, v in env.items()}, report)


def cli_value(value: Any) -> str:
    """A YAML value as jsonargparse reads it from the command line (mappings and lists as JSON)."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def thread_env(threads: int) -> dict[str, str]:
    """Pin every thread pool a run may start (torch's intra-op pool follows OMP_NUM_THREADS) to ``threads``."""
    return {variable: str(threads) for variable in THREAD_VARIABLES}


def grid_points(grid: Grid, threads: int) -> list[Point]:
    """Seed-major order (every arm's first seed, then the second, ...), so a partial sweep is already a comparison."""
    points = []
    for seed in sorted({s for arm in grid.arms.values() for s in arm.seeds}):
        for arm in grid.arms.values():
            if seed not in arm.seeds:
                continue
            folder = grid.output / arm.name / f"seed{seed}"
            args = ["fit"] + [f"--config={c}" for c in arm.configs]
            args += [f"--{key}={cli_value(value)}" for key, value in arm.overrides.items()]
            args += [f"--{key}={seed}" for key in grid.seed_keys]
            args += [f"--trainer.default_root_dir={folder}"]
            points.append(Point(arm.name, seed, str(folder), args, {**grid.env, **thread_env(threads)}, str(Path.cwd())))
    return points


# --------------------------------------------------------------------------------------------- a point's folder
def point_state(point: Point) -> str:
    """'done', 'changed' (run before with other arguments), 'resume' or 'new'."""
    folder = point.path
    for marker in ("done.json", "point.json"):
        if (folder / marker).is_file():
            if json.loads((folder / marker).read_text())["args"] != point.args:
                return "changed"
            if marker == "done.json":
                return "done"
    return "resume" if find_resume_checkpoint(folder) is not None else "new"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log; progress bars' carriage returns count as line ends."""
    if not path.is_file():
        return "(no log)"
    text = path.read_bytes()[-65536:].decode(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _result(point: Point, status: str, **extra: Any) -> dict[str, Any]:
    return {"arm": point.arm, "seed": point.seed, "folder": point.folder, "status": status, "returncode": None,
            "wall_seconds": 0.0, "cpu_seconds": 0.0, "error": None, **extra}


def run_point(point: Point) -> dict[str, Any]:
    """Run (or skip, or resume) one point; never raises for a failed fit, returns its status and log tail.

    Needs the standard library and ``lit_overtok`` (the checkpoint search), which any job that trains has, so
    submitit can ship it to a SLURM job as it is. It resumes from the newest checkpoint that verifies (a damaged
    newest one is skipped with a warning, as ``--ckpt_path auto`` skips it).
    """
    folder = point.path
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:  # two sweeps (or a requeued SLURM job) must not train the same point at once
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _result(point, "failed", error=f"{folder} is being run by another process (locked)")
        state = point_state(point)
        if state == "done":
            return _result(point, "skipped")
        if state == "changed":
            return _result(point, "failed", error=f"{folder} was run with other arguments (see its point.json); "
                           "delete the folder to rerun it, or give the arm another name")
        (folder / "point.json").write_text(json.dumps({"arm": point.arm, "seed": point.seed, "args": point.args}, indent=1))
        checkpoint = find_resume_checkpoint(folder)
        command = [point.python, *point.launcher, *point.args] + ([f"--ckpt_path={checkpoint}"] if checkpoint else [])
        log_path = folder / "train.log"
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
            log.flush()
            start = time.perf_counter()
            process = subprocess.Popen(command, cwd=point.workdir, env={**os.environ, **point.env},
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            # wait4 reports this child's own CPU time (and its reaped children's: data loader workers), which
            # RUSAGE_CHILDREN cannot separate when several points run in threads of one process.
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        attempt = {"started": time.time(), "wall_seconds": time.perf_counter() - start,
                   "cpu_seconds": usage.ru_utime + usage.ru_stime, "returncode": process.returncode,
                   "ckpt_path": str(checkpoint) if checkpoint else None,
                   "commit": provenance.commit(point.workdir), "cpu": provenance.cpu()}
        with open(folder / "attempts.jsonl", "a") as attempts:
            attempts.write(json.dumps(attempt) + "\n")
        if process.returncode != 0:
            return _result(point, "failed", returncode=process.returncode, wall_seconds=attempt["wall_seconds"],
                           cpu_seconds=attempt["cpu_seconds"], error=log_tail(log_path))
        recorded = [json.loads(line) for line in (folder / "attempts.jsonl").read_text().splitlines() if line]
        done = {"arm": point.arm, "seed": point.seed, "args": point.args, "attempts": len(recorded),
                "wall_seconds": sum(a["wall_seconds"] for a in recorded),
                "cpu_seconds": sum(a["cpu_seconds"] for a in recorded),
                "checkpoint": str(find_resume_checkpoint(folder)), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        (folder / "done.json").write_text(json.dumps(done, indent=1))
        return _result(point, "done", returncode=0, wall_seconds=attempt["wall_seconds"],
                       cpu_seconds=attempt["cpu_seconds"])


# --------------------------------------------------------------------------------------------------- executors
def _report_progress(result: dict[str, Any], finished: int, total: int) -> None:
    where = f"[{finished}/{total}] {result['arm']}/seed{result['seed']}"
    if result["status"] == "failed":
        code = result["returncode"]
        how = "FAILED" if code is None else f"killed by signal {-code}" if code < 0 else f"FAILED (exit {code})"
        print(f"{where} {how}, {result['folder']}:\n{result['error']}", flush=True)
    elif result["status"] == "skipped":
        print(f"{where} already done, skipped", flush=True)
    else:
        print(f"{where} done in {result['wall_seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU", flush=True)


def run_processes(points: list[Point], jobs: int) -> list[dict[str, Any]]:
    """Up to ``jobs`` points at once on this machine, each a train.py subprocess."""
    results = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_point, point): point for point in points}
        for future in as_completed(futures):
            results.append(future.result())
            _report_progress(results[-1], len(results), len(points))
    return results


def run_submitit(points: list[Point], args: argparse.Namespace, output: Path) -> list[dict[str, Any]]:
    """The same points as one submitit job array (SLURM, or submitit's local executor)."""
    try:
        import cloudpickle
        import submitit
    except ImportError:
        raise InputError("--executor slurm/local needs submitit: pip install 'lit_overtok[cluster]'") from None

    if __name__ != "__main__":  # ship run_point by value: the job need not import this file from the checkout
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    executor = submitit.AutoExecutor(folder=output / ".submitit" / "%j", cluster=args.executor)
    slurm = {f"slurm_{key}": yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.slurm_param)}
    executor.update_parameters(name=f"sweep-{output.name}", timeout_min=args.time_min, cpus_per_task=args.threads_per_job,
                               gpus_per_node=args.gpus_per_job, slurm_partition=args.slurm_partition,
                               slurm_array_parallelism=args.jobs, **slurm)
    jobs = executor.map_array(run_point, points)
    by_job = {id(job): point for job, point in zip(jobs, points)}
    print(f"submitted {len(jobs)} {args.executor} jobs: {', '.join(str(job.job_id) for job in jobs)}", flush=True)
    results = []
    poll = 1.0 if args.executor == "local" else 30.0
    for job in submitit.helpers.as_completed(jobs, poll_frequency=poll):
        try:
            result = job.result()
        except Exception as error:  # the job itself died (preempted, out of memory, node failure)
            result = _result(by_job[id(job)], "failed", error=f"submitit job {job.job_id}: {error}"[-4000:])
        results.append(result)
        _report_progress(result, len(results), len(points))
    return results


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="the grid YAML file")
    parser.add_argument("--jobs", type=int, default=1, help="points run at once (SLURM: the array's parallelism)")
    parser.add_argument("--threads-per-job", type=int, default=None,
                        help="threads of each run (default: this machine's cores // jobs, at least 1)")
    parser.add_argument("--executor", choices=["processes", "slurm", "local"], default="processes",
                        help="processes: subprocesses here; slurm: submitit SLURM array; local: submitit's local executor")
    parser.add_argument("--dry-run", action="store_true", help="list the points, their state and commands; run nothing")
    parser.add_argument("--only", default=None, help="comma-separated arm names to run (default: all)")
    parser.add_argument("--time-min", type=int, default=24 * 60, help="submitit: time limit of each job in minutes")
    parser.add_argument("--gpus-per-job", type=int, default=0, help="submitit: GPUs of each job")
    parser.add_argument("--slurm-partition", default=None, help="submitit: the SLURM partition")
    parser.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                        help="submitit: any further slurm_<KEY> parameter (e.g. account=abc, mem_per_cpu=4G); repeatable")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.threads_per_job is None:
        args.threads_per_job = max(1, (os.cpu_count() or 1) // args.jobs)
    elif args.threads_per_job < 1:
        parser.error(f"--threads-per-job must be at least 1, got {args.threads_per_job}")
    if any("=" not in item for item in args.slurm_param):
        parser.error("--slurm-param takes KEY=VALUE, e.g. --slurm-param account=abc")
    return args


def select_arms(grid: Grid, only: Optional[str]) -> list[str]:
    if only is None:
        return list(grid.arms)
    names = only.split(",")
    unknown = [n for n in names if n not in grid.arms]
    if unknown:
        raise GridError(f"--only: no arm {', '.join(unknown)} in {grid.path}; arms: {', '.join(grid.arms)}")
    return names


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    grid = load_grid(args.grid)  # a bad grid raises GridError: the script makes it one line, exit status 2
    arms = select_arms(grid, args.only)
    points = [p for p in grid_points(grid, args.threads_per_job) if p.arm in arms]
    print(f"{grid.name}: {len(points)} points -> {grid.output}/ ({args.executor}, {args.jobs} at once, "
          f"{args.threads_per_job} thread(s) each)", flush=True)
    if args.dry_run:
        pins = " ".join(f"{k}={v}" for k, v in points[0].env.items()) if points else ""
        for point in points:
            state = point_state(point)
            resume = f" from {find_resume_checkpoint(point.path)}" if state == "resume" else ""
            print(f"{point.label}: {state}{resume}\n  {pins} {shlex.join([point.python, *point.launcher, *point.args])}")
        return 0
    grid.output.mkdir(parents=True, exist_ok=True)
    (grid.output / "grid.yaml").write_text(grid.path.read_text())  # the study as run, beside its results
    if args.executor == "processes":
        results = run_processes(points, args.jobs)
    else:
        results = run_submitit(points, args, grid.output)
    failed = [r for r in results if r["status"] == "failed"]
    counts = {status: sum(r["status"] == status for r in results) for status in ("done", "skipped", "failed")}
    print(f"{grid.name}: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
          + (": " + ", ".join(f"{r['arm']}/seed{r['seed']}" for r in failed) if failed else ""), flush=True)
    return 1 if failed else 0

