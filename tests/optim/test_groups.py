"""Which parameters weight decay reaches: the default exemptions, OLMo2's rules (norms decay, the embedding does not),
OLMoE's (everything decays), Over-Encoding's group following the embedding rule (row-sharded tables too), and the
warmup's starting point."""

import pytest
import torch
from torch import nn

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.transformer import Transformer
from lit_overtok.optim.build import build_optimizer
from lit_overtok.optim.config import OptimizerConfig
from lit_overtok.optim.groups import parameter_groups
from lit_overtok.optim.schedule import warmup_cosine

OLMO2_RULES = dict(weight_decay=0.1, decay_embeddings=False, decay_norms_and_biases=True)
OLMOE_RULES = dict(weight_decay=0.1, decay_embeddings=True, decay_norms_and_biases=True)
OE = {"m": 101, "n": 3, "k": 1}


def decay_of(model: nn.Module, config: OptimizerConfig) -> dict[str, float]:
    """Each parameter's weight decay, by name."""
    group_of = {id(p): g for g in parameter_groups(model, config) for p in g["params"]}
    return {name: group_of[id(p)]["weight_decay"] for name, p in model.named_parameters()}


def test_olmoe_rules_decay_every_parameter():
    model = Transformer(ModelConfig(preset="moe-tiny", vocab_size=13, over_encoding=OE))
    decays = decay_of(model, OptimizerConfig(**OLMOE_RULES))
    assert {"embed.wte.weight", "embed.tables.weight", "embed.proj.bias", "norm.weight",
            "blocks.0.attention_norm.weight", "blocks.0.feed_forward.router.weight"} <= set(decays)
    assert set(decays.values()) == {0.1}, {n: d for n, d in decays.items() if d != 0.1}


def test_olmo2_rules_decay_norms_and_matrices_but_not_the_embedding():
    decays = decay_of(Transformer(ModelConfig(preset="tiny", vocab_size=13)), OptimizerConfig(**OLMO2_RULES))
    assert decays.pop("embed.wte.weight") == 0.0
    assert decays["norm.weight"] == decays["blocks.0.attention.q_norm.weight"] == 0.1
    assert set(decays.values()) == {0.1}  # the untied output head is a matrix: decayed, as OLMo2's ff_out


def test_default_rules_exempt_tables_norms_and_biases():
    model = Transformer(ModelConfig(preset="tiny", vocab_size=13, over_encoding=OE))
    exempt = {name for name, d in decay_of(model, OptimizerConfig()).items() if d == 0.0}
    tables_norms_biases = {name for name, p in model.named_parameters() if p.ndim == 1 or "wte" in name or "tables" in name}
    assert "embed.proj.bias" in tables_norms_biases and exempt == tables_norms_biases


@pytest.mark.parametrize("sharded", [False, True])  # whole nn.Embedding tables, or row-sharded ones (same rule)
def test_over_encoding_group_follows_the_embedding_rule_unless_it_says_otherwise(sharded):
    model = Transformer(ModelConfig(preset="tiny", vocab_size=13, over_encoding={**OE, "sharded": sharded}))
    tables = "embed.tables.weight"
    assert decay_of(model, OptimizerConfig(**OLMOE_RULES))[tables] == 0.1
    assert decay_of(model, OptimizerConfig(**OLMO2_RULES))[tables] == 0.0
    own = OptimizerConfig(**OLMOE_RULES, groups={"over_encoding": {"weight_decay": 0.0, "lr_multiplier": 0.5}})
    assert decay_of(model, own)[tables] == 0.0
    assert decay_of(model, OptimizerConfig(groups={"over_encoding": {"weight_decay": 0.05}}))[tables] == 0.05


def test_decay_shrinks_tables_and_norms_in_a_real_adamw_step():
    """With zero gradients AdamW's only change is the decoupled decay, p <- p·(1 - lr·wd), exactly where it applies."""
    model = Transformer(ModelConfig(preset="tiny", vocab_size=13))
    with torch.no_grad():
        model.norm.weight.fill_(2.0)
    for rules, table_kept in ((OLMOE_RULES, False), (OLMO2_RULES, True)):
        config = OptimizerConfig(lr=0.5, warmup_steps=0, **rules)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer, _ = build_optimizer(model, config, total_steps=10)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        shrink = 1 - 0.5 * 0.1
        torch.testing.assert_close(model.norm.weight, before["norm.weight"] * shrink, rtol=0, atol=1e-7)
        expected_table = before["embed.wte.weight"] * (1.0 if table_kept else shrink)
        torch.testing.assert_close(model.embed.wte.weight, expected_table, rtol=0, atol=1e-7)


def test_a_named_group_mixing_decay_rules_needs_its_own_weight_decay():
    model = nn.Sequential(nn.Linear(4, 4, bias=True))
    model[0].optimizer_group = "custom"
    with pytest.raises(ValueError, match=r"optimizer\.groups\.custom\.weight_decay"):
        parameter_groups(model, OptimizerConfig())
    assert {g["weight_decay"] for g in parameter_groups(model, OptimizerConfig(groups={"custom": {"weight_decay": 0.2}}))} == {0.2}


def test_warmup_starts_at_warmup_start_ratio():
    # OLMoE's warmup starts at 10% of the peak (OLMo's warmup_min_lr unset), OLMo2's at 0.
    assert warmup_cosine(0, 10, 110, 0.1, warmup_start_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.1)
    assert warmup_cosine(9, 10, 110, 0.1, warmup_start_ratio=0.1) == pytest.approx(1.0)
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optimizer.warmup_start_ratio"):
        OptimizerConfig(warmup_start_ratio=1.5)
