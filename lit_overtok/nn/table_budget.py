"""Sizing fair arms of the Over-Encoding family (``docs/oe_family.md``; ``docs/method.md §3.2`` for OE-m).

Two comparisons need arms built to a parameter count rather than by hand:

- **equal table parameters**: an NE (or any OE-flavoured) arm whose tables hold as many parameters as an OE-m arm's
  (``size_tables``), with table rows kept coprime with the vocabulary (a row count sharing a factor with V makes
  n-grams collide in a structured way; LongCat: "choose table sizes away from integer multiples of V");
- **iso-sparse** (LongCat's and Engram's claim): a fixed total moved between experts and memory, so a
  "more experts" MoE arm (``size_experts_to_total``) and a "more memory" arm (``size_memory_to_total``) end with
  the same total parameters.

Memory families other than OE/NE size themselves through ``register_sizer`` (DeepSeek Engram's module registers
its own); every count comes from ``nn.counts.parameter_counts`` (a meta-device build: exact, no memory).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import parameter_counts
from lit_overtok.nn.over_encoding import OverEncodingConfig

# config field -> (its table parameters in a config, None without it; resize them to at most `budget`)
_SIZERS: dict[str, tuple[Callable[[ModelConfig], Optional[int]], Callable[[ModelConfig, int], ModelConfig]]] = {}


def register_sizer(field: str, tables: Callable[[ModelConfig], Optional[int]],
                   resize: Callable[[ModelConfig, int], ModelConfig]) -> None:
    """Let ``size_memory_to_total`` resize the memory of config field ``field`` to a table-parameter budget."""
    _SIZERS[field] = (tables, resize)


def longcat_m(vocab_ratio: float, vocab_size: int) -> int:
    """LongCat's ``oe_vocab_size_ratio`` r as our m: table i then has int(r·V + 2i + 1) = m + 2i + 1 rows."""
    return int(vocab_ratio * vocab_size)


def size_tables(oe: OverEncodingConfig, d_model: int, budget: int,
                vocab_size: Optional[int] = None) -> OverEncodingConfig:
    """``oe`` with the largest m whose tables hold at most ``budget`` parameters and, given ``vocab_size``, whose
    every table's row count is coprime with it. Only m changes (n, k, flavor and the row rule stay)."""
    width, n_tables = oe.slice_width(d_model), oe.n_tables
    base_rows = sum(dataclasses.replace(oe, m=0).row_counts())  # rows at m = 0: the 2i (+1) terms
    m = (budget // width - base_rows) // n_tables
    while m > 0 and vocab_size is not None and any(
            math.gcd(rows, vocab_size) > 1 for rows in dataclasses.replace(oe, m=m).row_counts()):
        m -= 1
    if m <= 0:
        raise ValueError(f"a table budget of {budget} parameters is too small for {n_tables} tables of width {width}")
    return dataclasses.replace(oe, m=m)


def _over_encoding_tables(config: ModelConfig) -> Optional[int]:
    oe = config.over_encoding
    return None if oe is None else sum(oe.row_counts()) * oe.slice_width(config.d_model)


def _resize_over_encoding(config: ModelConfig, budget: int) -> ModelConfig:
    return config.replace(over_encoding=size_tables(config.over_encoding, config.d_model, budget, config.vocab_size))


def _engram_tables(config: ModelConfig) -> Optional[int]:
    engram = getattr(config, "engram", None)  # ModelConfig.engram comes with nn.engram (issue 21's other half)
    return None if engram is None else engram.table_parameters()


def _resize_engram(config: ModelConfig, budget: int) -> ModelConfig:
    from lit_overtok.nn.engram import table_size_for_budget  # Engram's own sizing: its primes decide the rows

    engram = config.engram
    size = table_size_for_budget(budget, len(engram.layers), engram.max_n, engram.heads, engram.ngram_width)
    return config.replace(engram=dataclasses.replace(engram, table_size=size))


register_sizer("over_encoding", _over_encoding_tables, _resize_over_encoding)
register_sizer("engram", _engram_tables, _resize_engram)


def size_memory_to_total(config: ModelConfig, total: int) -> ModelConfig:
    """``config`` (with one memory family) with its tables resized so the model's total parameters come as close to
    ``total`` as the table shape allows, from below: everything that is not a table stays as it is."""
    present = [(tables(config), resize) for tables, resize in _SIZERS.values() if tables(config) is not None]
    if len(present) != 1:
        raise ValueError(f"size_memory_to_total needs a config with exactly one memory (model_config fields "
                         f"{sorted(_SIZERS)}), got {len(present)}")
    (tables, resize), = present
    fixed = parameter_counts(config).total - tables
    if total <= fixed:
        raise ValueError(f"a total of {total} parameters leaves no room for tables: the rest of the model has {fixed}")
    return resize(config, total - fixed)


def size_experts_to_total(config: ModelConfig, total: int) -> ModelConfig:
    """The MoE ``config`` with the number of experts whose total parameters are closest to ``total`` (at least top_k;
    every other field, top_k and the expert width included, unchanged, so active parameters stay equal)."""
    if config.moe is None:
        raise ValueError("size_experts_to_total needs an MoE config (model_config.moe)")

    def with_experts(count: int) -> ModelConfig:
        return config.replace(moe=dataclasses.replace(config.moe, num_experts=count))

    least = config.moe.top_k
    smallest = parameter_counts(with_experts(least)).total
    per_expert = parameter_counts(with_experts(least + 1)).total - smallest  # linear: experts and router rows
    return with_experts(max(least, least + round((total - smallest) / per_expert)))
