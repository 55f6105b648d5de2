"""Before training starts: the per-rank memory estimate (and its error when a configuration cannot fit the declared
devices), and the strategy checks for row-sharded tables (Over-Encoding's and Engram's)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import DDPStrategy

from lit_overtok.training.lightning_module import OverTokLM
from lit_overtok.distributed.memory import check_fits, estimate_per_rank, GIB
from lit_overtok.nn.config import ModelConfig
from lit_overtok.distributed.parallel import check_strategy
from lit_overtok.distributed.strategies import FSDP2Strategy, ShardedDDPStrategy
from tests.distributed.lightning_cases import FixedGlobalBatches

OE_12_8M = {"m": 12_800_001, "n": 3, "k": 2, "sparse": True}


def test_estimate_counts_weights_gradients_moments_and_this_ranks_table_rows():
    config = ModelConfig(preset="olmo2-400m", vocab_size=50_280, over_encoding={**OE_12_8M, "sharded": True})
    rows = sum(config.over_encoding.row_counts())  # 4 tables of ~12.8M rows, width 256: 13.1B parameters
    one = estimate_per_rank(config, world=1)
    eight = estimate_per_rank(config, world=8, fsdp=True)
    # Sparse tables: weight and two moments (fp32), RowSparseAdamW's int32 row step and a coverage byte per row,
    # 1/world of the rows per rank.
    assert one.tables == rows * (256 * 12 + 4 + 1)
    assert eight.tables == -(-rows // 8) * (256 * 12 + 4 + 1)
    assert one.optimizer_state == 2 * one.weights and one.gradients == one.weights
    assert eight.weights == -(-one.weights // 4 // 8) * 4  # FSDP2 shards the backbone too
    assert one.total / GIB > 140 and eight.total / GIB < 20
    # DDP keeps the backbone whole and adds its gradient buckets.
    assert estimate_per_rank(config, world=8, ddp=True).gradients == 2 * one.weights


def test_estimate_counts_each_engram_layers_rows_on_this_rank():
    engram = {"layers": [0, 1], "table_size": 1_000_003, "heads": 2, "ngram_width": 64, "sparse": True}
    sharded = ModelConfig(preset="tiny", vocab_size=11, engram={**engram, "sharded": True})
    replicated = ModelConfig(preset="tiny", vocab_size=11, engram=engram)
    rows = [sum(primes) for primes in sharded.engram.head_primes().values()]  # 4 tables of ~1M rows per layer
    per_row = 32 * 12 + 4  # sparse: weight, two moments (fp32) and RowSparseAdamW's int32 step, width 32
    one, two = estimate_per_rank(replicated, world=2, ddp=True), estimate_per_rank(sharded, world=2, ddp=True)
    assert one.tables == sum(rows) * per_row
    # Sharded: each layer's weight is split on its own, and its RowShardedEmbedding keeps a coverage byte per row.
    assert two.tables == sum(-(-r // 2) for r in rows) * (per_row + 1)
    # The tables are not counted twice: the backbone's share is the same in both.
    assert one.weights == two.weights == estimate_per_rank(ModelConfig(preset="tiny", vocab_size=11), 2).weights \
        + 2 * (2 * 128 * 32 + 7 * 32) * 4


def test_a_configuration_that_cannot_fit_stops_with_one_clear_error_before_training(tmp_path):
    module = OverTokLM(model_config={"preset": "tiny", "over_encoding": {**OE_12_8M, "m": 10**11, "sharded": True}},
                       vocab_size=11)  # the sharded table is a meta placeholder: nothing was allocated
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"does not fit the declared devices: memory per rank .* tables .*"
                                         r"FSDP2Strategy with over_encoding.sharded: true fits it from \d+ devices"):
        trainer.fit(module, datamodule=FixedGlobalBatches(1))
    config = module.model_config
    with pytest.raises(ValueError, match="no world size up to 65536"):
        check_fits(estimate_per_rank(config, 1), 1, "a 1-byte device", config, "32-true")


def _on_two_ranks(strategy):
    environment = LightningEnvironment()
    environment.set_world_size(2)
    strategy.cluster_environment = environment
    return strategy


@pytest.mark.parametrize("family,tables", [("over_encoding", {"m": 31}), ("engram", {"table_size": 31})])
def test_sharded_tables_need_a_strategy_with_sharded_checkpoints(family, tables):
    config = ModelConfig(preset="tiny", vocab_size=11, **{family: {**tables, "sharded": True}})
    with pytest.raises(ValueError, match=f"model_config.{family}.sharded: .*rank 0 only.*ShardedDDPStrategy.*FSDP2"):
        check_strategy(config, _on_two_ranks(DDPStrategy()))
    check_strategy(config, _on_two_ranks(ShardedDDPStrategy()))
    check_strategy(config, _on_two_ranks(FSDP2Strategy()))
    check_strategy(config, DDPStrategy())  # one rank: nothing is split
    replicated_sparse = ModelConfig(preset="tiny", vocab_size=11, **{family: {**tables, "sparse": True}})
    with pytest.raises(ValueError, match=f"model_config.{family}.sparse: FSDP cannot shard sparse table gradients"):
        check_strategy(replicated_sparse, _on_two_ranks(FSDP2Strategy()))
