"""Every experiment YAML in configs/ parses through the real CLI (all keys valid for their classes) and is reproduced
by ``--print_config``, without building the (possibly GPU-sized) model or touching its data."""

from pathlib import Path

import pytest
import yaml

from lit_overtok.cli.main import main as cli_main

# configs/sweeps/ holds grid files of evaluation/sweep.py, checked in tests/studies/test_sweep.py.
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml") if p.parent.name != "sweeps")


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


def load(name: str) -> dict:
    return yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "cfg" / name).read_text())


@pytest.mark.parametrize("size", ["small", "large"])
def test_every_arm_of_figure_2_is_its_sizes_baseline_on_the_papers_fixed_data_but_one_switch(size):
    # Fig. 2 (right) and App. B.2 (a): baseline, 3-gram encoding (one table; and the hierarchical form), 3-gram
    # decoding (joint label; and App. C's product form), each on 20M sentences x 10 epochs with the paper's AdamW.
    import random

    from lit_overtok.data.grammar import Grammar

    base = load(f"cfg3f_{size}.yaml")
    data = base["data"]["init_args"]
    assert data["train_sentences"] == 20_000_000
    optimizer = base["model"]["init_args"]["optimizer"]
    assert (optimizer["lr"], optimizer["betas"], optimizer["weight_decay"]) == (3.0e-4, [0.9, 0.98], 0.1)
    trainer = base["trainer"]
    tokens_per_step = base["global_batch"]["sequences"] * data["seq_len"]
    assert tokens_per_step == 512 * 512
    rng, grammar = random.Random(0), Grammar.load("cfg3f")
    mean_document = sum(len(grammar.sample(rng)) + 2 for _ in range(4000)) / 4000  # BOS s EOS
    epochs = trainer["max_steps"] * tokens_per_step / (data["train_sentences"] * mean_document)
    assert 9.9 < epochs < 10.1, epochs
    switches = {
        "oe": {"over_encoding": {"m": 343, "n": 3, "k": 1}},
        "oe_single": {"over_encoding": {"form": "single", "m": 343, "n": 3}, "tie_embeddings": False},
        "od3": {"multi_token": {"mode": "joint", "n": 3}, "tie_embeddings": False},
        "od3_product": {"multi_token": {"mode": "od", "n": 3, "loss_weights": [1.0, 1.0]}},
    }
    for arm, switch in switches.items():
        config = load(f"cfg3f_{size}_{arm}.yaml")
        assert config["data"] == base["data"], arm
        assert config["seed_everything"] == base["seed_everything"]
        assert config["global_batch"] == base["global_batch"], arm
        assert {**config["trainer"], "default_root_dir": None} == {**trainer, "default_root_dir": None}, arm
        assert config["trainer"]["default_root_dir"] == f"runs/cfg3f_{size}_{arm}"
        assert config["model"]["init_args"]["optimizer"] == optimizer, arm
        assert config["model"]["init_args"]["model_config"] == {
            **base["model"]["init_args"]["model_config"], **switch}, arm
