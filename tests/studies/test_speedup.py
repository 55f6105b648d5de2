"""evaluation/speedup.py (lit_overtok.studies.speedup) on synthetic TensorBoard runs whose speedups are known; the
estimator itself is tested on many noisy curves in test_convergence.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lit_overtok.studies import convergence, speedup
from lit_overtok.studies.run_logs import event_folders
from tests.studies.sweep_grids import REPOSITORY

TOKENS_PER_STEP = 1000
STEPS = 200


def write_run(folder: Path, rate: float, eval_every: int = 20, tokens_every: int = 10,
              tokens_per_step: int = TOKENS_PER_STEP) -> None:
    """Loss falls and accuracy rises linearly in tokens at ``rate`` x the baseline's pace, then level off.

    Tokens are logged every ``tokens_every`` steps and evaluations every ``eval_every`` steps, so the script has to
    map evaluation steps to tokens between logged points.
    """
    writer = SummaryWriter(str(folder / "version_0"))
    for step in range(1, STEPS + 1):
        progress = min(1.0, rate * step / STEPS)
        if step % tokens_every == 0:
            writer.add_scalar("train/tokens_seen", step * tokens_per_step, step)
        writer.add_scalar("train/loss_next1", 4.0 - 2.0 * progress, step)
        if step % eval_every == 0:
            writer.add_scalar("eval/piqa/acc_norm", 0.5 + 0.2 * progress, step)
            writer.add_scalar("eval/downstream", 0.3 + 0.1 * min(1.0, 0.5 * rate * step / STEPS), step)
    writer.close()


def test_known_speedups_and_a_treatment_that_never_gets_there(tmp_path, capsys):
    write_run(tmp_path / "base", rate=1.0)
    write_run(tmp_path / "oe", rate=2.5)
    results = speedup.main(["--baseline", str(tmp_path / "base"), "--treatment", str(tmp_path / "oe"),
                            "--output", str(tmp_path / "s.md"), "--json", str(tmp_path / "s.json"),
                            "--plot", str(tmp_path / "s.png")])
    by_metric = {r.metric: r for r in results}
    assert set(by_metric) == {"train/loss_next1", "eval/piqa/acc_norm", "eval/downstream"}
    loss = by_metric["train/loss_next1"]
    # The fitted final value: a line in log tokens through a loss that is linear in tokens, read at its end.
    assert loss.lower_is_better and loss.target == pytest.approx(2.0, abs=0.02)
    assert loss.baseline_tokens == pytest.approx(STEPS * TOKENS_PER_STEP)
    # The treatment's loss falls linearly in tokens to 2.0 at 80k tokens and stays there: 2.5x.
    assert loss.status == convergence.REACHED and loss.ratio == pytest.approx(2.5, rel=0.01)
    assert loss.high / loss.low < 1.001  # no noise: only the interpolation's own error
    # Evaluations every 20 steps, the treatment's curve levels off at the crossing (a kink the cubic rounds): 3%.
    assert by_metric["eval/piqa/acc_norm"].ratio == pytest.approx(2.5, rel=0.03)
    assert not by_metric["eval/piqa/acc_norm"].lower_is_better
    # The downstream curves reach only half their range by the end; the treatment's 2.5x pace still gets there.
    assert by_metric["eval/downstream"].ratio == pytest.approx(2.5, rel=0.03)
    table = (tmp_path / "s.md").read_text()
    assert f"| train/loss_next1 | lower | {loss.target:.4f} | 200k | 80" in table and "| 2.50x [" in table
    assert "fitted value at its last point" in table  # the definition is printed with the numbers
    saved = json.loads((tmp_path / "s.json").read_text())
    assert {r["metric"]: r["status"] for r in saved} == dict.fromkeys(by_metric, "reached")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    slow = speedup.main(["--baseline", str(tmp_path / "oe"), "--treatment", str(tmp_path / "base"),
                         "--metrics", "eval/downstream", "--output", str(tmp_path / "t.md"),
                         "--json", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png")])
    assert slow[0].status == convergence.NEVER and slow[0].ratio is None
    assert f"| never (best value {slow[0].treatment_best:.4f}) |" in (tmp_path / "t.md").read_text()


def write_logged_curve(folder: Path, tag: str, curve, every: int, noise: float, seed: int, steps: int = 20_000,
                       tokens_per_step: int = TOKENS_PER_STEP) -> None:
    """``curve(tokens)`` plus Gaussian noise, logged with the tokens every ``every`` optimizer steps (as Lightning's
    ``log_every_n_steps`` writes the value of that step)."""
    logged = np.arange(every, steps + 1, every)
    values = curve(logged * tokens_per_step) + noise * np.random.default_rng(seed).standard_normal(len(logged))
    writer = SummaryWriter(str(folder / "version_0"))
    for step, value in zip(logged.tolist(), values.tolist()):
        writer.add_scalar("train/tokens_seen", step * tokens_per_step, step)
        writer.add_scalar(tag, value, step)
    writer.close()


def loss_curve(tokens):
    return 2.0 + 3.0 / (1.0 + tokens / 2e6)


@pytest.mark.parametrize("every", [(10, 10), (100, 100), (10, 50), (50, 10)])
def test_the_loss_speedup_read_from_event_files_does_not_depend_on_how_often_the_runs_logged(tmp_path, every):
    # 20,000 steps; the treatment reaches every loss value with 5.7x fewer tokens. A 0.99 EMA over *logged points*
    # read 4.3x, 3.4x, 2.5x for the same runs at intervals of 10, 50, 100.
    base, treat = tmp_path / "base", tmp_path / "treat"
    write_logged_curve(base, "train/loss_next1", loss_curve, every[0], 0.005, seed=1)
    write_logged_curve(treat, "train/loss_next1", lambda tokens: loss_curve(5.7 * tokens), every[1], 0.005, seed=2)
    [result] = speedup.main(["--baseline", str(base), "--treatment", str(treat), "--metrics", "train/loss_next1",
                             "--output", str(tmp_path / "s.md"), "--json", str(tmp_path / "s.json"),
                             "--plot", str(tmp_path / "s.png")])
    assert result.ratio == pytest.approx(5.7, rel=0.03) and result.low <= 5.7 <= result.high


def test_a_metric_of_unknown_direction_is_one_line_naming_the_flag_unless_given(tmp_path):
    write_logged_curve(tmp_path / "base", "eval/x/weirdness", loss_curve, 100, 0.0, seed=1, steps=2000)
    write_logged_curve(tmp_path / "oe", "eval/x/weirdness", lambda t: loss_curve(2 * t), 100, 0.0, seed=1, steps=2000)
    files = ["--output", str(tmp_path / "s.md"), "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")]
    command = [sys.executable, str(REPOSITORY / "evaluation" / "speedup.py"), "--baseline", str(tmp_path / "base"),
               "--treatment", str(tmp_path / "oe"), "--metrics", "eval/x/weirdness", *files]
    # This checkout's package, not an installed copy.
    failed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1
    assert "'eval/x/weirdness'" in failed.stderr and "--lower-is-better eval/x/weirdness" in failed.stderr
    [result] = speedup.main(command[2:] + ["--lower-is-better", "eval/x/weirdness"])
    assert result.lower_is_better and result.ratio == pytest.approx(2.0, rel=0.02)


def test_a_folder_with_several_runs_is_refused(tmp_path):
    write_run(tmp_path / "a", rate=1.0)
    write_run(tmp_path / "b", rate=1.0)
    with pytest.raises(ValueError, match="holds several runs"):
        event_folders(str(tmp_path))


def test_a_baseline_that_starts_at_its_final_value_is_flagged(tmp_path, capsys):
    write_run(tmp_path / "flat", rate=0.0)
    write_run(tmp_path / "oe", rate=2.0)
    speedup.main(["--baseline", str(tmp_path / "flat"), "--treatment", str(tmp_path / "oe"),
                  "--metrics", "eval/piqa/acc_norm", "--output", str(tmp_path / "s.md"),
                  "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert "starts at or beyond its final value" in capsys.readouterr().err
