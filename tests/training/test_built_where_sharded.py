"""Built where sharded (``nn.deferred_init``): ``OverTokLM`` builds its parameters on the meta device and draws them
in ``configure_model``, to exactly what an eager ``Transformer`` build holds, buffers included (RoPE tables, Engram's
compressed ids and multipliers, coverage flags); and the chunked draw is ``nn.init.trunc_normal_`` to the bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_overtok.nn import deferred_init
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.sharded_table import place_sharded_tables
from lit_overtok.nn.transformer import Transformer
from lit_overtok.training.lightning_module import OverTokLM

OE = {"m": 301, "n": 3, "k": 2}
NE = {"m": 40, "n": 3, "k": 2, "flavor": "longcat", "combine": "sqrt", "ignore_ids": [2, 5]}
ENGRAM = {"layers": [0, 1], "table_size": 31, "heads": 2, "ngram_width": 8}
MODELS = {
    "dense": {"preset": "tiny"},
    "dense_tied": {"preset": "tiny", "tie_embeddings": True},
    "moe": {"preset": "moe-tiny"},
    "oe": {"preset": "tiny", "over_encoding": OE},
    "ot": {"preset": "tiny", "over_encoding": {**OE, "sparse": True}, "multi_token": {"mode": "mtp_ds", "n": 2}},
    "sharded_oe": {"preset": "tiny", "over_encoding": {**OE, "sharded": True}},
    "sharded_ne": {"preset": "tiny", "over_encoding": {**NE, "sharded": True}},
    "engram": {"preset": "tiny", "engram": ENGRAM},
    "moe_engram_ne": {"preset": "moe-tiny", "engram": ENGRAM, "over_encoding": NE},
}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent ones (RoPE tables, MoE load counts) included."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


@pytest.mark.parametrize("name", MODELS)
def test_the_meta_device_build_draws_the_eager_models_values_and_keeps_its_buffers(name):
    config = ModelConfig(vocab_size=11, **MODELS[name])
    torch.manual_seed(7)
    eager = Transformer(config)
    place_sharded_tables(eager, None)
    torch.manual_seed(7)
    module = OverTokLM(model_config=config)
    assert all(p.is_meta for p in module.transformer.parameters())  # nothing allocated at construction
    # Buffers are real from the start (a sharded table's placeholder is placed whole, buffer included, later).
    assert not any(b.is_meta for name, b in module.transformer.named_buffers() if "tables." not in name)
    module.cpu()  # before configure_model a move is a no-op (Lightning's teardown after an early error)
    torch.manual_seed(123)  # the seed in force at construction counts, not the one at configure_model
    module.configure_model()
    built, expected = _tensors(module.transformer), _tensors(eager)
    assert built.keys() == expected.keys()
    for key, value in expected.items():
        assert not built[key].is_meta, key
        assert torch.equal(built[key], value), key
    assert module.transformer.state_dict().keys() == eager.state_dict().keys()
    if config.tie_embeddings:  # still one tensor, not two copies
        assert module.transformer.lm_head.proj.weight is module.transformer.embed.wte.weight
    module.configure_model()  # again (every fit/validate/test calls it): a no-op, no second draw
    assert all(torch.equal(built[key], value) for key, value in _tensors(module.transformer).items())


@pytest.mark.parametrize("shape", [(5,), (16,), (17, 3), (64,), (65,), (64 * 3 + 15,), (64 * 3 + 16,), (300, 41)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_draw_is_trunc_normal_to_the_bit(monkeypatch, shape, dtype):
    # Small chunks, so the shapes cross chunk bounds, end on short tails and need several rejection rounds (std 1).
    monkeypatch.setattr(deferred_init, "DRAW_CHUNK", 64)
    for std in (0.02, 1.0):
        expected = torch.empty(shape, dtype=dtype)
        nn.init.trunc_normal_(expected, 0.0, std, -3 * std, 3 * std, generator=torch.Generator().manual_seed(3))
        drawn = torch.empty(shape, dtype=dtype)
        deferred_init.trunc_normal_part_(drawn, std, torch.Generator().manual_seed(3))
        assert torch.equal(drawn, expected), (std, (drawn != expected).sum())
