"""The OLMo2-style backbone: shapes, causality, the recipe's details, presets, errors (generation: test_generation)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import parameter_counts
from lit_overtok.nn.norms import RMSNorm
from lit_overtok.nn.transformer import Transformer


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(preset="tiny", vocab_size=13, **overrides)


def test_shapes_and_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    model = Transformer(tiny())
    ids_BT = torch.randint(0, 13, (3, 17))
    logits_BTV = model(ids_BT)
    assert logits_BTV.shape == (3, 17, 13)
    loss, parts = model.loss(ids_BT, ids_BT.roll(-1, 1))
    assert set(parts) == {"loss_next1"}
    # std-0.02 init gives almost uniform predictions.
    assert abs(loss.item() - math.log(13)) < 0.05


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Transformer(tiny())
    ids_BT = torch.randint(0, 13, (2, 20))
    changed_BT = ids_BT.clone()
    changed_BT[:, 12:] = torch.randint(0, 13, (2, 8))
    before, after = model(ids_BT), model(changed_BT)
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=0)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_reordered_norm_block_and_qk_norm_match_a_direct_computation():
    torch.manual_seed(0)
    config = tiny()
    model = Transformer(config)
    block = model.blocks[0]
    x_BTD = torch.randn(2, 6, config.d_model)
    cos_TK, sin_TK = model.rotary(0, 6)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rope(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos_TK + torch.cat([-x2, x1], -1) * sin_TK

    att = block.attention
    heads = lambda t: t.view(2, 6, config.n_head, config.head_dim).transpose(1, 2)
    q = rope(heads(rms(x_BTD @ att.q_proj.weight.T, att.q_norm.weight)))
    k = rope(heads(rms(x_BTD @ att.k_proj.weight.T, att.k_norm.weight)))
    v = heads(x_BTD @ att.v_proj.weight.T)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(config.head_dim)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, config.d_model) @ att.o_proj.weight.T
    h = x_BTD + rms(attn, block.attention_norm.weight)
    ff = block.feed_forward
    mlp = (F.silu(h @ ff.w1.weight.T) * (h @ ff.w3.weight.T)) @ ff.w2.weight.T
    expected = h + rms(mlp, block.feed_forward_norm.weight)
    torch.testing.assert_close(block(x_BTD, cos_TK, sin_TK), expected, rtol=1e-5, atol=1e-5)


def test_no_biases_and_init_std():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset="cfg-small", vocab_size=7))
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("bias") for n in names)
    w = model.blocks[3].feed_forward.w1.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert w.abs().max().item() <= 0.06 + 1e-6  # truncated at 3 std


def test_rmsnorm_computes_in_fp32_under_bf16():
    norm = RMSNorm(8)
    x = (torch.randn(4, 8) * 1e3).bfloat16()
    expected = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert norm(x).dtype == torch.bfloat16
    torch.testing.assert_close(norm(x), expected)


def test_weight_tying_shares_the_table():
    model = Transformer(tiny(tie_embeddings=True))
    assert model.lm_head.proj.weight is model.embed.wte.weight
    untied = Transformer(tiny(tie_embeddings=False))
    assert untied.lm_head.proj.weight is not untied.embed.wte.weight


@pytest.mark.parametrize("preset,vocab,non_embedding", [
    ("cfg-small", 7, 2.4e6), ("cfg-large", 7, 85e6),
    ("olmo2-151m", 100_278, 151e6), ("olmo2-400m", 100_278, 400e6), ("olmo2-1b", 100_278, 1.0e9),
])
def test_preset_parameter_counts(preset, vocab, non_embedding):
    config = ModelConfig(preset=preset, vocab_size=vocab)
    counts = parameter_counts(config)
    assert abs(counts.non_embedding - non_embedding) / non_embedding < 0.08
    assert counts.total == counts.embedding + counts.non_embedding
    assert counts.active == counts.total  # dense
    padded = config.padded_vocab_size
    tables = 1 if config.tie_embeddings else 2
    assert counts.embedding == tables * padded * config.d_model


def test_parameter_counts_match_a_materialised_model():
    config = tiny()
    model = Transformer(config)
    assert parameter_counts(config).total == sum(p.numel() for p in model.parameters())


def test_padded_vocab_rows_are_never_predicted():
    config = ModelConfig(preset="tiny", vocab_size=13, vocab_pad_multiple=8)
    assert config.padded_vocab_size == 16
    model = Transformer(config)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape[-1] == 13


@pytest.mark.parametrize("changes,field", [
    (dict(preset="gpt-17"), "model_config.preset"),
    (dict(d_model=33), "model_config.n_head"),
    (dict(n_layer=0), "model_config.n_layer"),
    (dict(d_ff=-4), "model_config.d_ff"),
    (dict(vocab_size=0), "model_config.vocab_size"),
])
def test_bad_config_names_the_field(changes, field):
    base = dict(preset="tiny", vocab_size=13)
    base.update(changes)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig(**base)


def test_too_long_sequence_is_a_clear_error():
    model = Transformer(tiny(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_init_does_not_depend_on_other_modules():
    torch.manual_seed(5)
    a = Transformer(tiny(n_layer=2))
    torch.manual_seed(5)
    b = Transformer(tiny(n_layer=3))
    torch.testing.assert_close(a.blocks[1].attention.q_proj.weight, b.blocks[1].attention.q_proj.weight, rtol=0, atol=0)
