"""Built where sharded under FSDP2 (``nn.deferred_init``): at 2 gloo ranks the meta-device model, sharded by
``fully_shard`` and then drawn shard by shard (each rank only its rows), starts from the one-process model's exact
values and trains to the losses the eager build gave before (main at 8805bd4 and e099a72, recorded below)."""

from __future__ import annotations

import torch

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.sharded_table import place_sharded_tables
from lit_overtok.nn.transformer import Transformer
from tests.distributed.harness import run_ranks
from tests.distributed.lightning_cases import fit_on_rank, MODELS, SEED, VOCAB

# ``fit_on_rank`` of moe_oe under fsdp2 at 2 ranks, 3 steps, with the eager build (main at 8805bd4 and e099a72).
LOSSES_OF_THE_EAGER_BUILD = [2.4116220474243164, 2.366915225982666, 2.4207637310028076]


def test_fsdp2_at_two_ranks_initialises_after_sharding_to_the_eager_values_and_losses(tmp_path):
    run_ranks(2, fit_on_rank, [dict(model="moe_oe", strategy="fsdp2", out=str(tmp_path), steps=3)])
    record = torch.load(tmp_path / "record.pt", weights_only=False)
    assert record["losses"] == LOSSES_OF_THE_EAGER_BUILD  # bit for bit
    torch.manual_seed(SEED)
    eager = Transformer(ModelConfig(vocab_size=VOCAB, **MODELS["moe_oe"]))
    place_sharded_tables(eager, None)
    expected = dict(eager.named_parameters())
    assert record["initial"].keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(record["initial"][name], value), name
