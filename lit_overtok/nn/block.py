"""The transformer block of OLMo2 (PAPER.md §3.2): reordered norm, the norm applied to each sublayer's output
before the residual add, ``h = x + norm(attn(x))``, ``out = h + norm(ffn(h))``. Its feed-forward is the dense SwiGLU
or a mixture of experts (``feed_forward``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lit_overtok.nn.attention import Attention, KVCache
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.feed_forward import build_feed_forward
from lit_overtok.nn.norms import RMSNorm


class Block(nn.Module):
    """OLMo2 reordered-norm block."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = Attention(cfg.d_model, cfg.n_head, cfg.norm_eps)
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = build_feed_forward(cfg, layer_idx)
        self.feed_forward_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_TC: torch.Tensor, sin_TC: torch.Tensor,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        h_BTD = x_BTD + self.attention_norm(self.attention(x_BTD, cos_TC, sin_TC, cache))
        return h_BTD + self.feed_forward_norm(self.feed_forward(h_BTD))
