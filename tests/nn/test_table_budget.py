"""Accounting for fair arms of the Over-Encoding family: memory tables per family, equal-table and iso-sparse sizing."""

import dataclasses
import math

import pytest

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import flops_per_token, parameter_counts
from lit_overtok.nn.over_encoding import OverEncodingConfig
from lit_overtok.nn.table_budget import size_experts_to_total, size_memory_to_total, size_tables

V = 64


def test_parameter_counts_report_memory_tables_per_family():
    dense = ModelConfig(preset="tiny", vocab_size=V)
    oe = dense.replace(over_encoding=OverEncodingConfig(m=1001, n=3, k=2))
    ne = dense.replace(over_encoding=OverEncodingConfig(m=1000, n=3, k=2, flavor="longcat"))
    width = dense.d_model // 4
    assert parameter_counts(dense).memory_tables == {}
    assert parameter_counts(oe).memory_tables == {"oe": (1001 + 1003 + 1005 + 1007) * width}
    # NE-1000 by LongCat's rule has rows 1001..1007: the same tables as OE-1001, counted under its own family.
    assert parameter_counts(ne).memory_tables == {"ne": (1001 + 1003 + 1005 + 1007) * width}
    flat = parameter_counts(ne).as_dict()
    assert flat["memory_tables"] == flat["memory_tables_ne"] == (1001 + 1003 + 1005 + 1007) * width
    assert parameter_counts(dense).as_dict()["memory_tables"] == 0
    # Bias-free projections: NE's FLOPs and parameters are the OE arm's less the D bias terms.
    d = dense.d_model
    assert parameter_counts(oe).total - parameter_counts(ne).total == d
    assert flops_per_token(oe, 16) - flops_per_token(ne, 16) == 6 * d


@pytest.mark.parametrize("k,flavor", [(1, "longcat"), (2, "longcat"), (1, "paper"), (3, "paper")])
def test_size_tables_meets_an_oe_arms_budget_with_rows_coprime_with_v(k, flavor):
    d_model = 48
    budget = sum(OverEncodingConfig(m=5001, n=3, k=1).row_counts()) * d_model // 2  # an OE-5001 arm, n = 3, k = 1
    sized = size_tables(OverEncodingConfig(m=1, n=3, k=k, flavor=flavor), d_model, budget, vocab_size=V)
    tables = sum(sized.row_counts()) * sized.slice_width(d_model)
    assert tables <= budget and budget - tables < 2 * sized.n_tables * sized.slice_width(d_model) * 2
    assert all(math.gcd(rows, V) == 1 for rows in sized.row_counts())  # V = 64: every row count odd
    bigger = dataclasses.replace(sized, m=sized.m + 1)
    assert sum(bigger.row_counts()) * sized.slice_width(d_model) > budget or any(
        math.gcd(rows, V) > 1 for rows in bigger.row_counts())  # the largest such m
    if flavor == "longcat" and k == 1:
        assert sized.m == 5000 and sized.row_counts() == [5001, 5003]  # exactly OE-5001's tables


def test_iso_sparse_arms_have_equal_totals_and_equal_active_backbones():
    moe = ModelConfig(preset="moe-tiny", vocab_size=V)
    more_experts = moe.replace(moe=dataclasses.replace(moe.moe, num_experts=12))
    total = parameter_counts(more_experts).total
    assert size_experts_to_total(moe, total).moe.num_experts == 12  # recovers the expert count from the total
    assert size_experts_to_total(moe, total + 5).moe.num_experts == 12  # the closest count
    memory = size_memory_to_total(moe.replace(over_encoding=OverEncodingConfig(m=101, n=3, k=1, flavor="longcat")), total)
    counts = parameter_counts(memory)
    width = memory.d_model // 2
    assert total - 2 * width * 2 < counts.total <= total  # as close as two tables of this width allow
    assert counts.memory_tables["ne"] == sum(memory.over_encoding.row_counts()) * width
    # Active backbones differ only by the router rows of the extra experts and NE's projection.
    d = moe.d_model
    assert parameter_counts(more_experts).active_non_embedding - parameter_counts(moe).active_non_embedding == 8 * d * moe.n_layer
    assert counts.active_non_embedding - parameter_counts(moe).active_non_embedding == d * d


def test_sizing_errors_name_the_problem():
    moe = ModelConfig(preset="moe-tiny", vocab_size=V)
    with pytest.raises(ValueError, match="exactly one memory"):
        size_memory_to_total(moe, 10**6)
    with pytest.raises(ValueError, match="leaves no room"):
        size_memory_to_total(moe.replace(over_encoding=OverEncodingConfig(m=101)), 1000)
    with pytest.raises(ValueError, match="needs an MoE"):
        size_experts_to_total(ModelConfig(preset="tiny", vocab_size=V), 10**6)
    with pytest.raises(ValueError, match="too small"):
        size_tables(OverEncodingConfig(m=1), 32, 10)


def test_engram_arms_size_through_engrams_own_rule():
    pytest.importorskip("lit_overtok.nn.engram")  # DeepSeek's Engram, issue 21's other half
    from lit_overtok.nn.engram import EngramConfig

    moe = ModelConfig(preset="moe-tiny", vocab_size=V)
    total = parameter_counts(moe.replace(moe=dataclasses.replace(moe.moe, num_experts=12))).total
    engram = moe.replace(engram=EngramConfig(layers=[1], table_size=31, heads=2, ngram_width=8))
    sized = size_memory_to_total(engram, total)
    counts = parameter_counts(sized)
    assert counts.memory_tables == {"engram": sized.engram.table_parameters()}
    assert counts.total <= total < parameter_counts(sized.replace(engram=dataclasses.replace(
        sized.engram, table_size=sized.engram.table_size + 1))).total  # the largest table size that fits
