"""Before training starts: the per-rank memory estimate (and its error when a configuration cannot fit the declared
devices), and the strategy checks for row-sharded Over-Encoding tables."""

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


def test_sharded_tables_need_a_strategy_with_sharded_checkpoints():
    config = ModelConfig(preset="tiny", vocab_size=11, over_encoding={"m": 31, "sharded": True})
    with pytest.raises(ValueError, match="rank 0 only.*ShardedDDPStrategy.*FSDP2Strategy"):
        check_strategy(config, _on_two_ranks(DDPStrategy()))
    check_strategy(config, _on_two_ranks(ShardedDDPStrategy()))
    check_strategy(config, DDPStrategy())  # one rank: nothing is split
    replicated_sparse = ModelConfig(preset="tiny", vocab_size=11, over_encoding={"m": 31, "sparse": True})
    with pytest.raises(ValueError, match="FSDP cannot shard sparse table gradients"):
        check_strategy(replicated_sparse, _on_two_ranks(FSDP2Strategy()))
