"""Every experiment YAML in configs/ parses through the real CLI (all keys valid for their classes) and is reproduced
by ``--print_config``, without building the (possibly GPU-sized) model or touching its data."""

from pathlib import Path

import pytest
import yaml

from lit_overtok.cli import main as cli_main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_every_config_family_is_present():
    families = {p.parent.name for p in CONFIGS}
    assert {"cfg", "olmo2", "olmoe", "wiki"} <= families


def assert_contains(printed, given, where: str) -> None:
    """Everything the YAML gives is in the printed config (which adds the defaults)."""
    if isinstance(given, dict):
        for key, value in given.items():
            assert key in printed, f"{where}.{key} missing"
            assert_contains(printed[key], value, f"{where}.{key}")
    elif isinstance(given, list) and given and isinstance(given[0], dict):
        assert len(printed) == len(given), (where, printed, given)
        for i, (p, g) in enumerate(zip(printed, given)):
            assert_contains(p, g, f"{where}[{i}]")
    else:
        assert printed == given, (where, printed, given)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_and_prints_back(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    given = yaml.safe_load(path.read_text())
    for section in ("model", "trainer", "data", "global_batch"):
        if section in given:
            assert_contains(printed[section], given[section], section)
