"""docs/configs.md says, for every shipped config, its token budget and where it runs, and says it truly: the file is
what ``lit_overtok.studies.config_table`` computes from the YAML files today."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lit_overtok.studies import config_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def table() -> str:
    return config_table.render()


def test_docs_configs_md_is_the_table_the_configs_give_today(table):
    written = (ROOT / "docs" / "configs.md").read_text() if (ROOT / "docs" / "configs.md").is_file() else ""
    assert written == table, "docs/configs.md is stale: python -m lit_overtok.studies.config_table"


def test_every_config_of_every_family_has_a_row_with_a_where_it_runs_column(table):
    for family in ("cfg", "wiki", "olmo2", "olmoe"):
        paths = sorted((ROOT / "configs" / family).glob("*.yaml"))
        assert paths, family
        for path in paths:
            row = next(line for line in table.splitlines() if f"`configs/{family}/{path.name}`" in line)
            assert row.rstrip().endswith(("**CPU** |", "**GPU** |")), row


def test_budget_is_steps_times_global_batch_times_seq_len():
    small = config_table.plan(ROOT / "configs" / "cfg" / "cfg3f_small.yaml")
    assert small.tokens == 192_000 * 512 * 512  # global_batch.sequences, not the per-device batch of 64
    default = config_table.plan(ROOT / "configs" / "default.yaml")
    assert default.tokens == 250 * 8 * 256
    # The default run is CPU-sized (minutes) and the paper's grammar recipe is not.
    assert default.cpu_minutes < 10 < small.cpu_minutes


@pytest.mark.parametrize("name", ["allenai_dolma2.json", "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"])
def test_the_vocabulary_of_each_named_tokenizer_is_the_files(name):
    path = Path(os.environ.get("LIT_OVERTOK_DATA", ROOT.parent / "shared" / "data")) / "tokenizers" / "olmo" / name
    if not path.is_file():
        pytest.skip(f"{path} not here (a clone without the shared data)")
    from tokenizers import Tokenizer

    assert config_table.VOCABULARIES[name] == Tokenizer.from_file(str(path)).get_vocab_size()
