"""evaluation/report.py on a synthetic sweep whose numbers are known exactly, and on a real tiny sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from lit_overtok.studies import report, sweep, verdicts
from lit_overtok.studies.run_logs import event_folders, read_run_scalars
from tests.studies.sweep_grids import REPOSITORY

V = 1000
STEPS = 200
# Input vocabularies V + m of 10^3 .. 10^6; the final validation loss follows L = 3 - 0.05 log10(V + m).
ROWS = {"base": 0, "oe_a": 9_000, "oe_b": 99_000, "oe_c": 999_000}
SEED_OFFSETS = {1: 0.01, 2: -0.01, 3: 0.0}


def final_val(m: int) -> float:
    return 3.0 - 0.05 * math.log10(V + m)


def train_loss(step: int) -> float:
    return 4.0 - 2.0 * min(1.0, step / STEPS)


def write_version(folder: Path, steps: range, final: float, tokens_per_step: int, garbage_after: int = STEPS) -> None:
    """One version folder; points after ``garbage_after`` are wrong (a killed run's tail the resume replaces)."""
    writer = SummaryWriter(str(folder))
    for step in steps:
        wrong = 5.0 if step > garbage_after else 0.0
        if step % 10 == 0:
            writer.add_scalar("train/tokens_seen", step * tokens_per_step * (3 if wrong else 1), step)
        writer.add_scalar("train/loss_next1", train_loss(step) + wrong, step)
        if step % 50 == 0:
            writer.add_scalar("val/loss", final + (4.0 - final) * (1 - step / STEPS) + wrong, step)
    writer.close()


def write_point(folder: Path, m: int, seed: int, multi_token: bool = False, split: bool = False) -> None:
    final = final_val(m) + SEED_OFFSETS[seed] - (0.2 if multi_token else 0.0)
    tokens_per_step = 1000 if m == 0 and not multi_token else 500  # every treatment: the same curve at 2x the pace
    if split:  # killed after step 120 with a checkpoint at 80, resumed into version_1
        write_version(folder / "version_0", range(1, 121), final, tokens_per_step, garbage_after=80)
        write_version(folder / "version_1", range(81, STEPS + 1), final, tokens_per_step)
    else:
        write_version(folder / "version_0", range(1, STEPS + 1), final, tokens_per_step)
    over_encoding = f"{{m: {m}, n: 2, k: 1}}" if m else "null"
    multi = "{mode: od, n: 2}" if multi_token else "null"
    (sorted(folder.glob("version_*"))[-1] / "hparams.yaml").write_text(
        f"model_config:\n  preset: tiny\n  vocab_size: {V}\n  over_encoding: {over_encoding}\n  multi_token: {multi}\n"
        "optimizer:\n  betas: !!python/tuple\n  - 0.9\n  - 0.95\n")
    (folder / "done.json").write_text(json.dumps({"cpu_seconds": 36.0 * seed}))


@pytest.fixture
def synthetic_sweep(tmp_path) -> Path:
    arms = {name: {} for name in [*ROWS, "od"]}
    grid = {"name": "synthetic", "output": str(tmp_path / "out"), "config": str(REPOSITORY / "configs" / "default.yaml"),
            "seeds": list(SEED_OFFSETS), "arms": arms}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    for seed in SEED_OFFSETS:
        for name, m in ROWS.items():
            write_point(tmp_path / "out" / name / f"seed{seed}", m, seed, split=(name, seed) == ("base", 1))
        write_point(tmp_path / "out" / "od" / f"seed{seed}", 0, seed, multi_token=True)
    return tmp_path / "grid.yaml"


def test_known_law_verdicts_speedups_and_cpu_hours_of_a_synthetic_sweep(synthetic_sweep, tmp_path):
    result = report.build(str(synthetic_sweep), str(tmp_path / "report"), evaluate=False)
    # The arms that differ from the baseline only in over_encoding: not the od arm. Every seed's point is fitted.
    law = result["law"]
    assert law["arms"] == list(ROWS)
    assert law["val/loss"]["slope"] == pytest.approx(-0.05) and law["val/loss"]["intercept"] == pytest.approx(3.0)
    assert (law["val/loss"]["points"], law["val/loss"]["distinct"]) == (12, 4) and law["val/loss"]["r2"] < 1
    assert law["val/loss"]["slope_low"] < -0.05 < law["val/loss"]["slope_high"]
    for name, m in ROWS.items():
        row = result["final"][name]
        assert row["input_vocab"] == V + m and row["seeds"] == [1, 2, 3]
        # Validations at steps 150 and 200 in the last 25% of the tokens: the fitted line passes through both.
        assert row["val/loss"]["per_seed"] == pytest.approx([final_val(m) + off for off in SEED_OFFSETS.values()])
        assert row["val/loss"]["mean"] == pytest.approx(final_val(m)) and row["val/loss"]["spread"] == pytest.approx(0.02)
        # The training loss's fitted final value: its line in log tokens over steps 150..200, read at step 200.
        assert row["train/loss_next1"]["mean"] == pytest.approx(train_loss(STEPS), abs=0.02)
    assert result["final"]["od"]["val/loss"]["mean"] == pytest.approx(final_val(0) - 0.2)
    # Same curve per step at twice the tokens per step: the treatment reaches the baseline's final value with exactly
    # half its tokens, for every seed, and the resumed baseline (seed 1: version_0 + version_1, a wrong tail
    # replaced) gives the same.
    rows = [r for r in result["speedups"] if r["metric"] == "train/loss_next1"]
    assert len(rows) == 12 and all(r["ratio"] == pytest.approx(2.0) and r["status"] == "reached" for r in rows)
    held_out = [r for r in result["speedups"] if r["metric"] == "val/loss"]
    assert len(held_out) == 12 and all(r["ratio"] > 1 for r in held_out)
    # Paired by seed: each OE arm's val/loss is below the baseline's by the law's amount in every seed.
    [oe_c] = [p for p in result["paired"] if (p["arm"], p["metric"]) == ("oe_c", "val/loss")]
    assert oe_c["differences"] == pytest.approx([final_val(999_000) - final_val(0)] * 3)
    assert oe_c["verdict"] == verdicts.RESOLVED and oe_c["baseline"] == "base"
    [train] = [m for m in result["multipliers"] if (m["arm"], m["metric"]) == ("oe_c", "train/loss_next1")]
    assert train["summary"] == "geometric mean" and train["value"] == pytest.approx(2.0)
    base_seed1 = next(r for r in result["runs"] if (r["arm"], r["seed"]) == ("base", 1))
    assert base_seed1["versions"] == ["version_0", "version_1"] and base_seed1["last_step"] == STEPS
    assert result["cpu_hours"] == pytest.approx(5 * 36 * (1 + 2 + 3) / 3600)

    text = (tmp_path / "report" / "report.md").read_text()
    assert verdicts.rules_markdown() in text
    assert "L = 3.0000 -0.0500 [" in text and "over 12 runs at 4 input vocabularies" in text
    assert "| base | " in text and "2.8500 ± 0.0100 (3 seeds)" in text
    assert "| oe_c | base | val/loss | 1: -0.1500, 2: -0.1500, 3: -0.1500 | -0.1500 [-0.1500, -0.1500] (3 pairs): " \
           "resolved |" in text
    assert "| oe_c | base | train/loss_next1 | 1: 2.00x [" in text
    for figure in ("loss_curves.png", "vocab_law.png"):
        assert (tmp_path / "report" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["law"]["val/loss"]["slope"] == pytest.approx(-0.05) and saved["verdict_rules"] == verdicts.VERDICT_RULES


def test_censored_and_missing_crossings_are_counted_not_averaged(synthetic_sweep, tmp_path):
    # Against oe_c (its grid.report.baselines), the base arm never reaches oe_c's final val/loss.
    grid = yaml.safe_load(synthetic_sweep.read_text())
    grid["report"] = {"baselines": {"base": "oe_c"}}
    synthetic_sweep.write_text(yaml.safe_dump(grid))
    result = report.build(str(synthetic_sweep), str(tmp_path / "report"), evaluate=False)
    assert result["baselines"] == {"base": "oe_c", "oe_a": "base", "oe_b": "base", "oe_c": "base", "od": "base"}
    slower = [r for r in result["speedups"] if (r["arm"], r["baseline"], r["metric"]) == ("base", "oe_c", "val/loss")]
    assert len(slower) == 3 and all(r["status"] == "never" and r["text"].startswith("never (best value ") for r in slower)
    [summary] = [m for m in result["multipliers"] if (m["arm"], m["metric"]) == ("base", "val/loss")]
    assert summary["text"] == "median never (3 pairs; 3 never): direction consistent"
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| base | oe_c | val/loss | 1: never (best value " in text


def test_the_grid_can_name_the_arms_of_the_law_and_the_baseline(synthetic_sweep, tmp_path):
    grid = yaml.safe_load(synthetic_sweep.read_text())
    grid["report"] = {"law_arms": ["base", "oe_c"], "baseline": "oe_a"}
    synthetic_sweep.write_text(yaml.safe_dump(grid))
    result = report.build(str(synthetic_sweep), str(tmp_path / "report"), evaluate=False)
    # Two input vocabularies: no law (a line through two points says nothing), and no law figure.
    assert result["law"]["arms"] == ["base", "oe_c"] and result["law"]["val/loss"] is None
    assert not result["law_plot"] and not (tmp_path / "report" / "vocab_law.png").exists()
    assert "fewer than 3 input vocabularies among the arms: no fit" in (tmp_path / "report" / "report.md").read_text()
    assert {r["arm"] for r in result["speedups"]} == {"base", "oe_b", "oe_c", "od"}
    grid["report"] = {"baseline": "nope"}
    synthetic_sweep.write_text(yaml.safe_dump(grid))
    with pytest.raises(sweep.GridError, match="report.baseline: no arm 'nope'"):
        report.build(str(synthetic_sweep), str(tmp_path / "report"), evaluate=False)




def test_the_report_of_a_real_sweep_matches_its_event_files_and_scores_its_checkpoints(tiny_sweep, tmp_path):
    result = report.build(str(tiny_sweep), str(tmp_path / "report"), evaluate=True, limit=2,
                          tasks="cfg_next_token_validity")
    output = Path(yaml.safe_load(tiny_sweep.read_text())["output"])
    for arm, vocabulary in (("base", 7), ("oe", 7 + 343)):
        [version] = event_folders(str(output / arm / "seed1"))
        logged = read_run_scalars(str(version))
        assert result["final"][arm]["val/loss"]["per_seed"] == [logged["val/loss"][1][-1]]
        assert result["final"][arm]["input_vocab"] == vocabulary
    done = [json.loads((output / arm / "seed1" / "done.json").read_text()) for arm in ("base", "oe")]
    assert result["cpu_hours"] == pytest.approx(sum(d["cpu_seconds"] for d in done) / 3600)
    assert result["law"]["val/loss"] is None  # two input vocabularies

    evaluation = result["evaluation"]
    assert evaluation["error"] is None and [(p["arm"], p["step"]) for p in evaluation["per_point"]] == [("base", 5), ("oe", 5)]
    [written] = (tmp_path / "report" / "eval").glob("base*.json")
    scores = json.loads(written.read_text())["results"]["cfg_next_token_validity"]
    assert evaluation["per_point"][0]["scores"]["cfg_next_token_validity"]["acc"] == scores["acc,none"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| base | 1 | 5 | acc " in text
    assert f"Ran on: {result['provenance']}." in text and result["provenance"].startswith("commit ")
    assert "CPU not recorded" not in text  # the sweep recorded it with each attempt
    # The in-training evaluation ran once, at the end: its "speedup" is flagged as saying nothing.
    flagged = [r for r in result["speedups"] if r["metric"].startswith("eval/")]
    assert flagged and all(r["uninformative"] for r in flagged) and "Uninformative readings" in text
    assert not any(r["uninformative"] for r in result["speedups"] if r["metric"] == "train/loss_next1")
