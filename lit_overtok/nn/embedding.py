"""The input-embedding seam: the plain 1-gram table, or Over-Encoding (paper §3.2) when configured.

Every input embedding maps ids (B, T) to vectors (B, T, D) and exposes its 1-gram table as ``wte`` so the output
head can tie to it (the paper keeps the 1-gram table "consistent with the original Transformer to align with the
tied weight design"). Over-Encoding's ``single`` form, the CFG study's one table over n-gram ids, has none
(``wte`` is None) and its configs untie the head.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.over_encoding import OverEncoding


class TokenEmbedding(nn.Module):
    """The ordinary embedding: one row per (padded) vocabulary id."""

    def __init__(self, padded_vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(padded_vocab_size, d_model)

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids_BT)


def build_input_embedding(config: ModelConfig) -> nn.Module:
    if config.over_encoding is not None:
        return OverEncoding(config.over_encoding, config.vocab_size, config.padded_vocab_size, config.d_model)
    return TokenEmbedding(config.padded_vocab_size, config.d_model)
