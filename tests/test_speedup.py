"""evaluation/speedup.py on synthetic TensorBoard runs whose speedups are known exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from evaluation import speedup
from lit_overtok.evaluation.run_logs import event_folders

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


def test_known_speedups_without_smoothing_and_a_treatment_that_never_gets_there(tmp_path, capsys):
    write_run(tmp_path / "base", rate=1.0)
    write_run(tmp_path / "oe", rate=2.5)
    results = speedup.main(["--baseline", str(tmp_path / "base"), "--treatment", str(tmp_path / "oe"),
                            "--loss-ema", "0", "--eval-ema", "0", "--output", str(tmp_path / "s.md"),
                            "--plot", str(tmp_path / "s.png")])
    by_metric = {r.metric: r for r in results}
    assert set(by_metric) == {"train/loss_next1", "eval/piqa/acc_norm", "eval/downstream"}
    loss = by_metric["train/loss_next1"]
    assert loss.lower_is_better and loss.target == pytest.approx(2.0)
    assert loss.baseline_tokens == pytest.approx(STEPS * TOKENS_PER_STEP)
    assert loss.ratio == pytest.approx(2.5)
    assert by_metric["eval/piqa/acc_norm"].ratio == pytest.approx(2.5)
    assert not by_metric["eval/piqa/acc_norm"].lower_is_better
    # The downstream curves reach only half their range by the end; the treatment's 2.5x pace still gets there.
    assert by_metric["eval/downstream"].ratio == pytest.approx(2.5)
    table = (tmp_path / "s.md").read_text()
    assert "| train/loss_next1 | lower | 2.0000 | 200k | 80k | 2.50x |" in table
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    slow = speedup.main(["--baseline", str(tmp_path / "oe"), "--treatment", str(tmp_path / "base"),
                         "--metrics", "eval/downstream", "--output", str(tmp_path / "t.md"), "--plot", str(tmp_path / "t.png")])
    assert slow[0].treatment_tokens is None and slow[0].ratio is None
    assert "never reaches the baseline's final smoothed value" in capsys.readouterr().err
    assert "not reached" in (tmp_path / "t.md").read_text()


def test_ema_is_tensorboards_debiased_average():
    values = np.array([1.0, 3.0, 2.0, 5.0])
    reference, last = [], 0.0
    for i, v in enumerate(values):
        last = 0.9 * last + 0.1 * v
        reference.append(last / (1 - 0.9 ** (i + 1)))
    np.testing.assert_allclose(speedup.ema(values, 0.9), reference)
    assert speedup.ema(values, 0.9)[0] == 1.0  # debiased: no pull towards zero at the start
    np.testing.assert_array_equal(speedup.ema(values, 0.0), values)


def test_smoothed_curves_that_differ_only_in_tokens_per_step_give_exactly_that_ratio(tmp_path):
    # The same values per step, but each treatment step is worth 2.5x fewer tokens: the EMA (over logged points)
    # is identical in steps, so the smoothed crossing lands 2.5x earlier in tokens.
    write_run(tmp_path / "base", rate=1.0, eval_every=1)
    write_run(tmp_path / "oe", rate=1.0, eval_every=1, tokens_per_step=TOKENS_PER_STEP * 2 // 5)
    results = speedup.main(["--baseline", str(tmp_path / "base"), "--treatment", str(tmp_path / "oe"),
                            "--output", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png")])
    assert {r.metric for r in results} == {"train/loss_next1", "eval/piqa/acc_norm", "eval/downstream"}
    for result in results:
        assert result.ratio == pytest.approx(2.5)
    loss = next(r for r in results if r.metric == "train/loss_next1")
    assert loss.target > 2.0 + 0.3  # the 0.99 EMA lags the raw final loss of 2.0 by much on 200 points


def test_a_folder_with_several_runs_is_refused(tmp_path):
    write_run(tmp_path / "a", rate=1.0)
    write_run(tmp_path / "b", rate=1.0)
    with pytest.raises(ValueError, match="holds several runs"):
        event_folders(str(tmp_path))


def test_a_baseline_that_starts_at_its_final_value_is_flagged(tmp_path, capsys):
    write_run(tmp_path / "flat", rate=0.0)
    write_run(tmp_path / "oe", rate=2.0)
    results = speedup.main(["--baseline", str(tmp_path / "flat"), "--treatment", str(tmp_path / "oe"),
                            "--metrics", "eval/piqa/acc_norm", "--output", str(tmp_path / "s.md"),
                            "--plot", str(tmp_path / "s.png")])
    assert results[0].ratio == pytest.approx(1.0)
    assert "starts at or beyond its final value" in capsys.readouterr().err
