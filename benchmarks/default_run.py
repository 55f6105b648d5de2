"""Wall and CPU time of the default run, ``python train.py fit``, with where the time goes.

    python benchmarks/default_run.py                       # the default run, one torch thread
    python benchmarks/default_run.py -- --trainer.max_steps 300   # anything after -- goes to train.py fit

The goal (README: "The two commands") is that the default run, evaluations included, ends within 5 minutes on an
idle 2-core machine. Shared machines are rarely idle, so besides the wall time this reports the CPU time of the
run (user + system, the training process and its children). With one torch thread the run is sequential, so on an
idle machine its wall time is about its CPU time (plus a little I/O): the CPU time measured under load, which
contention inflates rather than shrinks, is an upper-bound estimate of the idle wall time. The phases come from
the run's TensorBoard events: training steps (first to last ``train/loss``), the in-training evaluations
(``eval/wall_time_s``) and the rest (start-up, validation, checkpoints, shutdown). Last line: one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPOSITORY = Path(__file__).resolve().parents[1]
BUDGET_S = 300.0


def main(argv: list[str]) -> dict:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    root = Path(tempfile.mkdtemp(prefix="default_run_"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPOSITORY)}
    load_before = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    subprocess.run([sys.executable, str(REPOSITORY / "train.py"), "fit", f"--trainer.default_root_dir={root}", *extra],
                   cwd=REPOSITORY, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    events = EventAccumulator(str(root / "version_0"))
    events.Reload()
    losses = events.Scalars("train/loss")
    evaluations = [e.value for e in events.Scalars("eval/wall_time_s")] if "eval/wall_time_s" in events.Tags()["scalars"] else []
    training_span = losses[-1].wall_time - losses[0].wall_time
    result = {
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cpu_over_budget": round(cpu / BUDGET_S, 3),
        "threads": env["OMP_NUM_THREADS"], "steps": losses[-1].step + 1,
        "first_to_last_step_s": round(training_span, 1), "evaluations": len(evaluations),
        "evaluation_s": round(sum(evaluations), 1),
        "start_to_first_step_s": round(losses[0].wall_time - start, 1),
        "after_last_step_s": round(start + wall - losses[-1].wall_time, 1),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "run_dir": str(root / "version_0"),
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
