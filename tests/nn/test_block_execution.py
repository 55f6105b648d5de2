"""How the blocks run: activation checkpointing (``nn.recompute``) and per-block ``torch.compile`` give the plain
eager model's loss and gradients, and checkpointing an MoE model counts its expert load and losses once."""

import pytest
import torch
from torch._dynamo.utils import counters

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.heads import MultiTokenConfig
from lit_overtok.nn.transformer import Transformer

V = 29


# Hashed n-gram memories: Engram inside the backbone; LongCat's N-gram Embedding with an ignored id (3), whose output
# feeds the checkpointed blocks and MTP-DS.
MEMORIES = {"": {}, "engram": {"engram": {"layers": [0, 1], "table_size": 31, "heads": 2, "ngram_width": 8}},
            "ne": {"over_encoding": {"m": 40, "n": 3, "k": 2, "flavor": "longcat", "ignore_ids": [3]}}}


def model_pair(preset, memory=None, **option):
    config = ModelConfig(preset=preset, vocab_size=V, multi_token=MultiTokenConfig(mode="mtp_ds"), **(memory or {}))
    plain = Transformer(config)
    other = Transformer(config.replace(**option))
    other.load_state_dict(plain.state_dict())
    return plain, other


def loss_and_grads(model, ids_BT):
    model.train()
    model.zero_grad()
    loss, parts = model.loss(ids_BT[:, :-1], ids_BT[:, 1:])
    loss.backward()
    return loss.detach(), parts, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(plain, other, ids_BT, **tol):
    plain_loss, plain_parts, plain_grads = loss_and_grads(plain, ids_BT)
    loss, parts, grads = loss_and_grads(other, ids_BT)
    torch.testing.assert_close(loss, plain_loss, **tol)
    torch.testing.assert_close(parts, plain_parts, **tol)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("preset", ["tiny", "moe-tiny"])
def test_activation_checkpointing_gives_the_plain_gradients(preset, memory):
    plain, checkpointed = model_pair(preset, MEMORIES[memory], activation_checkpointing=True)
    ids_BT = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(0))
    # The rerun in backward repeats the same ops on the same inputs: equal bit for bit.
    assert_same_training_step(plain, checkpointed, ids_BT, rtol=0, atol=0)
    if preset == "moe-tiny":
        # The rerun neither counts the tokens' experts again nor leaves auxiliary losses behind for the next step.
        for name, buffer in plain.named_buffers():
            if name.endswith("load_counts_E"):
                torch.testing.assert_close(checkpointed.get_buffer(name), buffer, rtol=0, atol=0)
        assert all(getattr(m, "pending_aux_losses", None) is None for m in checkpointed.modules())


def test_compiled_blocks_match_eager_output_and_gradients():
    # One small block: inductor compiles a forward and a backward graph, which takes a while on a loaded CPU.
    config = ModelConfig(preset="tiny", vocab_size=V, n_layer=1)
    eager = Transformer(config)
    compiled = Transformer(config.replace(compile_blocks=True))
    compiled.load_state_dict(eager.state_dict())
    ids_BT = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    counters.clear()
    assert_same_training_step(eager, compiled, ids_BT, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] >= 1  # the block did go through dynamo (and inductor)
    # The parameter names, hence checkpoints, are the eager model's.
    assert list(compiled.state_dict()) == list(eager.state_dict())
