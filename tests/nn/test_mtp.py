"""MTP-DS (DeepSeek-V3 sequential multi-token prediction) and OT = Over-Encoding + MTP-DS."""

import torch
import torch.nn.functional as F

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.heads import MultiTokenConfig
from lit_overtok.nn.losses import IGNORE_INDEX
from lit_overtok.nn.transformer import Transformer

V = 11


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def test_mtp_ds_matches_a_direct_computation():
    """Depth k: W_k[RMSNorm(h_t); RMSNorm(Emb(x_{t+k}))] -> block -> norm -> shared head, predicting x_{t+k+1}."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset="tiny", vocab_size=V, multi_token=MultiTokenConfig(
        mode="mtp_ds", n=3, loss_weights=[0.3, 0.2])))
    ids_BT = torch.randint(0, V, (2, 10))
    labels_BT = ids_BT.roll(-1, 1)
    labels_BT[1, -2:] = IGNORE_INDEX
    total, parts = model.loss(ids_BT, labels_BT)

    hidden_BTD = model.hidden_states(ids_BT)
    embedded_BTD = model.embed.wte(ids_BT)
    expected = F.cross_entropy(model(ids_BT).flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX)
    state = hidden_BTD
    for k, (depth, weight) in enumerate(zip(model.multi_token_head.depths, [0.3, 0.2]), start=1):
        L = 10 - k
        x = torch.cat([rms(state[:, :L], depth.hidden_norm.weight), rms(embedded_BTD[:, k:], depth.embed_norm.weight)], -1)
        x = x @ depth.proj.weight.T
        cos, sin = model.rotary(0, L)
        state = depth.block(x, cos, sin)
        logits = rms(state, depth.norm.weight) @ model.lm_head.proj.weight.T
        ce = F.cross_entropy(logits.flatten(0, 1), labels_BT[:, k:].flatten(), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(parts[f"loss_next{k + 1}"], ce)
        expected = expected + weight * ce
    torch.testing.assert_close(total, expected)


def test_mtp_ds_shares_the_output_head_and_registers_nothing_twice():
    model = Transformer(ModelConfig(preset="tiny", vocab_size=V, multi_token=MultiTokenConfig(mode="mtp_ds")))
    assert model.multi_token_head.shared_head is model.lm_head
    keys = model.state_dict().keys()
    assert not any(k.startswith("multi_token_head.") and ("lm_head" in k or "shared_head" in k) for k in keys)
    assert sorted({k.split(".")[3] for k in keys if k.startswith("multi_token_head.")}) == [
        "block", "embed_norm", "hidden_norm", "norm", "proj"]


def mtp_only_gradients(model, ids_BT):
    """Backward of the MTP-DS loss alone (the trunk's hidden state detached), so any gradient on the input
    embedding got there through the next token's embedding fed to the MTP module."""
    labels_BT = ids_BT.roll(-1, 1)
    embedded_BTD = model.embed(ids_BT)
    hidden_BTD = model.backbone(embedded_BTD).detach()
    extra, _ = model.multi_token_head.loss(hidden_BTD, ids_BT, labels_BT, embedded_BTD=embedded_BTD)
    model.zero_grad()
    extra.backward()


def test_mtp_ds_feeds_the_next_tokens_input_embedding():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset="tiny", vocab_size=V, multi_token=MultiTokenConfig(mode="mtp_ds")))
    # Token 0 only at position 0: MTP reads Emb(x_{t+1}), so position 0's embedding must get no gradient.
    ids_BT = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 7, 8, 9, 1, 2, 3]])
    mtp_only_gradients(model, ids_BT)
    touched = model.embed.wte.weight.grad.abs().sum(-1) > 0
    assert touched.nonzero().flatten().tolist() == list(range(1, 10))


def test_ot_gradients_reach_the_over_encoding_tables_through_mtp_ds():
    """OT: the next token's embedding is the Over-Encoding vector (its n-gram context), so the OE tables learn
    from the future-token loss too."""
    torch.manual_seed(0)
    config = ModelConfig(preset="tiny", vocab_size=V, over_encoding={"m": 101, "n": 3, "k": 2},
                      multi_token=MultiTokenConfig(mode="mtp_ds"))
    model = Transformer(config)
    ids_BT = torch.randint(0, V, (2, 12))
    mtp_only_gradients(model, ids_BT)
    oe_params = [(name, p) for name, p in model.embed.named_parameters() if not name.startswith("wte")]
    assert oe_params, "the Over-Encoding embedding has no parameters besides the 1-gram table"
    for name, param in oe_params:
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name} through MTP-DS"
    # The OE vector at t+1 depends on x_t too (its 2-gram), so changing x_0 changes the MTP loss even though
    # Emb(x_0) itself is never fed to the MTP module.
    changed_BT = ids_BT.clone()
    changed_BT[:, 0] = (ids_BT[:, 0] + 1) % V
    hidden_BTD = model.hidden_states(ids_BT).detach()
    losses = [model.multi_token_head.loss(hidden_BTD, x, ids_BT.roll(-1, 1), embedded_BTD=model.embed(x))[0]
              for x in (ids_BT, changed_BT)]
    assert not torch.allclose(*losses)
