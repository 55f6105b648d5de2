"""Before training starts: the per-rank memory estimate (and its error when a configuration cannot fit the declared
devices), and the strategy checks for row-sharded tables (Over-Encoding's and Engram's)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import DDPStrategy

from lit_overtok.training.lightning_module import OverTokLM
from lit_overtok.distributed.memory import check_fits, estimate_per_rank, GIB
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.transformer import Transformer
from lit_overtok.distributed.parallel import check_strategy
from lit_overtok.distributed.strategies import FSDP2Strategy, ShardedDDPStrategy
from tests.distributed.lightning_cases import FixedGlobalBatches

OE_12_8M = {"m": 12_800_001, "n": 3, "k": 2, "sparse": True}


def test_estimate_counts_weights_gradients_moments_and_this_ranks_table_rows():
    config = ModelConfig(preset="olmo2-400m", vocab_size=50_280, over_encoding={**OE_12_8M, "sharded": True})
    rows = sum(config.over_encoding.row_counts())  # 4 tables of ~12.8M rows, width 256: 13.1B parameters
    one = estimate_per_rank(config, world=1)
    eight = estimate_per_rank(config, world=8, fsdp=True)
    # Sparse tables: the weight, RowSparseAdamW's int32 row step and a coverage byte per row; their two moments with
    # the optimizer state; 1/world of the rows per rank, and no dense gradient.
    assert one.tables == rows * (256 * 4 + 4 + 1)
    assert eight.tables == -(-rows // 8) * (256 * 4 + 4 + 1)
    assert one.optimizer_state == 2 * one.weights + rows * 256 * 4 * 2 and one.gradients == one.weights
    assert eight.weights == -(-one.weights // 4 // 8) * 4  # FSDP2 shards the backbone too
    assert one.total / GIB > 140 and eight.total / GIB < 21
    assert one.at_setup == one.weights + one.tables  # no process given: the part of the model that exists at setup
    # DDP keeps the backbone whole and adds its gradient buckets.
    assert estimate_per_rank(config, world=8, ddp=True).gradients == 2 * one.weights


def test_fsdp2_holds_the_root_and_the_largest_block_whole_within_a_step():
    # tiny: 2 blocks; the root (embedding, unembedding, final norm) is gathered with its gradient, the largest block
    # twice (computing, prefetched) with one gradient; a row-sharded table is never gathered, a dense one is.
    config = ModelConfig(preset="tiny", vocab_size=11)
    with torch.device("meta"):
        model = Transformer(config)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - len(model.blocks) * block
    assert estimate_per_rank(config, world=2, fsdp=True).gathered == (2 * root + 3 * block) * 4
    assert estimate_per_rank(config, world=2, fsdp=True, precision="bf16-true").gathered == (2 * root + 3 * block) * 2
    assert estimate_per_rank(config, world=2, ddp=True).gathered == 0
    tables = {"m": 31, "n": 2, "k": 1}
    sharded = ModelConfig(preset="tiny", vocab_size=11, over_encoding={**tables, "sharded": True})
    dense = ModelConfig(preset="tiny", vocab_size=11, over_encoding={**tables, "sparse": False})
    rows_bytes = sum(dense.over_encoding.row_counts()) * dense.over_encoding.slice_width(dense.d_model) * 4
    gathered_sharded = estimate_per_rank(sharded, world=2, fsdp=True).gathered
    assert estimate_per_rank(dense, world=2, fsdp=True).gathered == gathered_sharded + 2 * rows_bytes


def test_the_process_is_measured_at_the_start_of_a_fit_and_counted(tmp_path):
    module = OverTokLM(model_config={"preset": "tiny"}, vocab_size=11)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=FixedGlobalBatches(1))
    estimate = module.memory_estimate
    # torch and Lightning alone hold well over 100 MiB resident; the tiny model's own tensors are not part of it.
    assert 100 * 2**20 < estimate.process < 4 * GIB
    assert estimate.total == estimate_per_rank(module.model_config, 1, process=estimate.process).total
    assert estimate.at_setup == estimate.process + estimate.weights + estimate.tables


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
