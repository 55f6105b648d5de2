"""Output heads: the next-token head every model has, and the seam for training-only multi-token heads.

Generation and evaluation call only ``NextTokenHead``; a multi-token head (Over-Decoding, MTP-DS) adds loss terms
during training and is never used to produce tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lit_overtok.config import ModelConfig

IGNORE_INDEX = -100


class NextTokenHead(nn.Module):
    """Unembedding to the vocabulary; optionally tied to the 1-gram input table."""

    counts_as_embedding = True  # vocabulary-sized, so parameter counts keep it out of the backbone

    def __init__(self, cfg: ModelConfig, tied_table: Optional[nn.Embedding] = None) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.is_padded = cfg.padded_vocab_size != cfg.vocab_size
        self.proj = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if tied_table is not None:
            self.proj.weight = tied_table.weight

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        # Padding rows exist only for matmul efficiency; they are never valid predictions.
        logits_BTV = self.proj(hidden_BTD)
        return logits_BTV[..., : self.vocab_size] if self.is_padded else logits_BTV

    def loss(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        logits_BTV = self(hidden_BTD)
        return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX)


def build_multi_token_head(cfg: ModelConfig, model: nn.Module) -> Optional[nn.Module]:
    """Training-only heads that predict tokens further ahead; None for the plain next-token objective."""
    return None
