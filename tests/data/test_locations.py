"""The data folder is found in one order (an explicit folder, ``$LIT_OVERTOK_DATA``, ``../shared/data`` beside the
checkout), and its absence is one line saying what is missing and how to provide it."""

from __future__ import annotations

import pytest

from lit_overtok.data import locations
from lit_overtok.errors import InputError
from lit_overtok.evaluation.runner import TaskSuite
from tests.fixtures import BENCHMARKS, rows


@pytest.fixture
def no_data_folder(tmp_path, monkeypatch):
    """Neither the variable nor a checkout neighbour: what a fresh clone sees."""
    monkeypatch.delenv(locations.ENV_VAR, raising=False)
    monkeypatch.setattr(locations, "BESIDE_CHECKOUT", tmp_path / "shared" / "data")


def test_an_explicit_folder_then_the_variable_then_the_checkouts_neighbour(tmp_path, monkeypatch, no_data_folder):
    beside, from_env = tmp_path / "shared" / "data", tmp_path / "env"
    beside.mkdir(parents=True)
    from_env.mkdir()
    assert locations.data_dir() == beside
    monkeypatch.setenv(locations.ENV_VAR, str(from_env))
    assert locations.data_dir() == from_env
    assert locations.data_dir(tmp_path / "given") == tmp_path / "given"


def test_no_data_folder_is_one_line_naming_what_is_missing_and_the_ways_to_provide_it(tmp_path, monkeypatch,
                                                                                       no_data_folder):
    with pytest.raises(InputError) as error:
        TaskSuite(["piqa"])  # lm-eval reads the split through the task's custom_dataset hook
    message = str(error.value)
    assert "\n" not in message and message.startswith("no data folder for the piqa validation split")
    for way in ("--data-dir", "LIT_OVERTOK_DATA", str(tmp_path / "shared" / "data"), "--online"):
        assert way in message
    monkeypatch.setenv(locations.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match=f"LIT_OVERTOK_DATA={tmp_path / 'nowhere'} is not a folder"):
        TaskSuite(["piqa"])


def test_the_variable_points_every_task_at_its_folder(monkeypatch, no_data_folder):
    monkeypatch.setenv(locations.ENV_VAR, str(BENCHMARKS))
    task = TaskSuite(["piqa"]).task_dict["tasks"]["piqa"]
    assert [doc["goal"] for doc in task.eval_docs] == [row["goal"] for row in rows("piqa", "validation")]
