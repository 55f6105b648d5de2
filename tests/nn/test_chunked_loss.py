"""Cross-entropy by chunks of positions (``ModelConfig.loss_chunk_logits``): the same loss and gradients as the plain
path for every head (next-token, Over-Decoding with and without low rank, MTP-DS, joint), in fp32 and bf16 autocast,
and no tensor as large as the full logits while it runs."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.heads import MultiTokenConfig
from lit_overtok.nn.losses import IGNORE_INDEX
from lit_overtok.nn.transformer import Transformer

V = 37
MODES = {
    "next_token": None,
    "od": MultiTokenConfig(mode="od", n=3),
    "od_low_rank": MultiTokenConfig(mode="od", n=2, low_rank=8),
    "mtp_ds": MultiTokenConfig(mode="mtp_ds", n=3),
    "joint": MultiTokenConfig(mode="joint", n=2),
}
# A hashed n-gram memory changes nothing the heads see but the hidden states (MTP-DS also reads NE's embedding): two
# modes suffice. NE: LongCat's N-gram Embedding with ignored ids.
ENGRAM = {"engram": {"layers": [1], "table_size": 31, "heads": 2, "ngram_width": 8}}
NE = {"over_encoding": {"m": 40, "n": 3, "k": 2, "flavor": "longcat", "combine": "sqrt", "ignore_ids": [2, 5]}}
CASES = [(mode, {}) for mode in MODES] + [(mode, memory) for memory in (ENGRAM, NE) for mode in ("next_token", "mtp_ds")]


def model_pair(multi_token, chunk_logits, **overrides):
    """The plain model and one computing its losses by chunks, with equal weights."""
    config = ModelConfig(preset="tiny", vocab_size=V, multi_token=multi_token, vocab_pad_multiple=8, **overrides)
    torch.manual_seed(0)
    plain = Transformer(config)
    torch.manual_seed(0)
    chunked = Transformer(config.replace(loss_chunk_logits=chunk_logits))
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked


def batch(B=3, T=20):
    generator = torch.Generator().manual_seed(1)
    ids_BT = torch.randint(0, V, (B, T + 1), generator=generator)
    labels_BT = ids_BT[:, 1:].clone()
    labels_BT[-1, -5:] = IGNORE_INDEX  # padding, as validation rows have
    return ids_BT[:, :-1], labels_BT


def loss_and_grads(model, ids_BT, labels_BT):
    model.zero_grad()
    loss, parts = model.loss(ids_BT, labels_BT)
    loss.backward()
    return loss.detach(), parts, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode, memory", CASES, ids=[mode + "".join(f"_{name}" for name in memory) for mode, memory in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_and_gradients_equal_the_plain_path(mode, memory, dtype):
    # 9 positions' worth of logits per chunk (7 for the joint head's 37^2 columns is 1 position): many chunks,
    # the last one partial.
    plain, chunked = model_pair(MODES[mode], chunk_logits=9 * 40, **memory)
    ids_BT, labels_BT = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        plain_loss, plain_parts, plain_grads = loss_and_grads(plain, ids_BT, labels_BT)
        loss, parts, grads = loss_and_grads(chunked, ids_BT, labels_BT)
    # bf16: the logits are rounded to bf16 by the matmul in both paths, so the losses agree to bf16's epsilon.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss, plain_loss, **tol)
    assert parts.keys() == plain_parts.keys()
    for name in parts:
        torch.testing.assert_close(parts[name], plain_parts[name], **tol)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], **tol, msg=lambda m: f"{name}: {m}")


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op produced."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("mode", ["next_token", "od", "mtp_ds"])
def test_no_tensor_holds_the_full_logits(mode):
    V_big, B, T, chunk = 1000, 2, 128, 48  # the logits (256k elements) dwarf the other tensors (V × d_model = 32k)
    ids_BT = torch.randint(0, V_big, (B, T))
    config = ModelConfig(preset="tiny", vocab_size=V_big, multi_token=MODES[mode])
    largest = {}
    for chunk_logits in (None, chunk * V_big):
        model = Transformer(config.replace(loss_chunk_logits=chunk_logits))
        tracker = LargestTensor()
        with tracker:
            model.loss(ids_BT, ids_BT)[0].backward()
        largest[chunk_logits] = tracker.largest
    # The plain path builds the full logits (so the tracker sees them); the chunked one never holds more than a
    # chunk's, in forward or in backward.
    assert largest[None] >= B * T * V_big
    assert largest[chunk * V_big] == chunk * V_big


def test_loss_chunk_logits_must_be_positive():
    with pytest.raises(ValueError, match="model_config.loss_chunk_logits must be a positive"):
        ModelConfig(preset="tiny", vocab_size=V, loss_chunk_logits=0)
