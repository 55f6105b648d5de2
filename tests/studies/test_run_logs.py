"""A run resumed into several version folders reads as one run: in read_run_scalars, speedup.py and the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lit_overtok.studies import report, speedup
from lit_overtok.studies.run_logs import event_folders, read_run_scalars

STEPS = 200


def loss(step: int) -> float:
    return 4.0 - 2.0 * min(1.0, step / STEPS)


def write(folder: Path, steps: range, value=loss) -> None:
    writer = SummaryWriter(str(folder))
    for step in steps:
        writer.add_scalar("train/tokens_seen", step * 1000, step)
        writer.add_scalar("train/loss_next1", value(step), step)
    writer.close()


def test_a_resumed_run_in_two_version_folders_is_its_uninterrupted_twin(tmp_path, capsys):
    write(tmp_path / "base" / "version_0", range(STEPS))
    # Interrupted after step 130, resumed from the checkpoint of step 100 into a new folder (the run logs steps
    # 101..130 twice: the second time wins).
    write(tmp_path / "resumed" / "version_0", range(131), value=lambda step: loss(step) + (step > 100))
    write(tmp_path / "resumed" / "version_1", range(100, STEPS))
    base, resumed = read_run_scalars(str(tmp_path / "base")), read_run_scalars(str(tmp_path / "resumed"))
    for tag in base:
        np.testing.assert_array_equal(resumed[tag][0], base[tag][0])
        np.testing.assert_array_equal(resumed[tag][1], base[tag][1])
    assert "version_1 continues from step 100 (the run before it reached step 130)" in capsys.readouterr().err
    results = speedup.main(["--baseline", str(tmp_path / "base"), "--treatment", str(tmp_path / "resumed"),
                            "--output", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png")])
    assert results[0].ratio == pytest.approx(1.0)


def test_a_later_version_that_starts_over_replaces_the_earlier_one(tmp_path):
    write(tmp_path / "run" / "version_0", range(50), value=lambda step: 9.0)
    write(tmp_path / "run" / "version_1", range(STEPS))
    steps, values = read_run_scalars(str(tmp_path / "run"))["train/loss_next1"]
    assert steps.tolist() == list(range(STEPS))
    np.testing.assert_allclose(values, [loss(s) for s in range(STEPS)], rtol=1e-6)  # float32 in the event files


def test_version_folders_are_read_in_numeric_order_and_unrelated_runs_are_refused(tmp_path):
    for version in (2, 10, 1):
        write(tmp_path / "run" / f"version_{version}", range(3))
    assert [f.name for f in event_folders(str(tmp_path / "run"))] == ["version_1", "version_2", "version_10"]
    write(tmp_path / "run" / "other", range(3))
    with pytest.raises(ValueError, match="holds several runs"):
        event_folders(str(tmp_path / "run"))


def test_every_tag_and_the_token_axis_are_cut_where_the_resumed_version_starts(tmp_path, capsys):
    """Version 0 ran to step 160 (evaluations at 50, 100, 150) and was resumed from step 100's checkpoint into
    version 1, which evaluated at 150 and 200. Its step-150 evaluation replaces the discarded one; and version 0's
    ``*_by_tokens`` twins (step = tokens, 1000 per step) up to step 100 stay, on their own axis. The report reads the
    point the same way."""
    def run(folder: Path, steps: range, evaluations: tuple[int, ...], offset: float) -> None:
        writer = SummaryWriter(str(folder))
        for step in steps:
            writer.add_scalar("train/loss_next1", loss(step) + offset, step)
            if step in evaluations:
                writer.add_scalar("eval/acc", step / 1000 + offset, step)
                writer.add_scalar("eval/acc_by_tokens", step / 1000 + offset, step * 1000)
        writer.close()

    run(tmp_path / "point" / "version_0", range(161), (50, 100, 150), offset=1.0)
    run(tmp_path / "point" / "version_1", range(101, 201), (150, 200), offset=0.0)
    scalars = read_run_scalars(str(tmp_path / "point"))
    assert scalars["eval/acc"][0].tolist() == [50, 100, 150, 200]
    assert scalars["eval/acc_by_tokens"][0].tolist() == [50_000, 100_000, 150_000, 200_000]
    np.testing.assert_allclose(scalars["eval/acc_by_tokens"][1], [1.05, 1.1, 0.15, 0.2], rtol=1e-6)
    # A tag the resumed version has not logged again yet loses its values from the discarded stretch too.
    run(tmp_path / "short" / "version_0", range(161), (50, 100, 150), offset=1.0)
    run(tmp_path / "short" / "version_1", range(101, 141), (), offset=0.0)
    assert read_run_scalars(str(tmp_path / "short"))["eval/acc"][0].tolist() == [50, 100]
    point = report.read_run("arm", 1, tmp_path / "point")
    assert point.versions == ["version_0", "version_1"]
    for tag, (steps, values) in scalars.items():
        np.testing.assert_array_equal(point.scalars[tag][0], steps)
        np.testing.assert_array_equal(point.scalars[tag][1], values)
