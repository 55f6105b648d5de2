"""The transformer block, in the two norm placements of the paper's backbones (docs/method.md §3.2, §3.3), chosen by
``ModelConfig.block`` (presets fill it):

- ``reordered_norm`` (OLMo2, the dense presets): the norm is applied to each sublayer's *output* before the residual
  add, ``h = x + norm(attn(x))``, ``out = h + norm(ffn(h))`` (Hugging Face ``Olmo2DecoderLayer``; with experts this
  is ``FlexOlmoDecoderLayer``);
- ``pre_norm`` (OLMoE-1B-7B, the MoE presets): the norm is applied to each sublayer's *input*,
  ``h = x + attn(norm(x))``, ``out = h + ffn(norm(h))`` (``OlmoeDecoderLayer``; the published OLMoE config sets no
  ``norm_after``).

Both keep the parameter names ``attention_norm`` and ``feed_forward_norm`` (the norm beside attention and beside the
feed-forward), so checkpoints and export mappings name the same tensors whichever placement a model uses. The
feed-forward is the dense SwiGLU or a mixture of experts (``feed_forward``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lit_overtok.nn.attention import Attention, KVCache
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.feed_forward import build_feed_forward
from lit_overtok.nn.norms import RMSNorm


class Block(nn.Module):
    """Attention and feed-forward sublayers with residual adds, normed as ``config.block`` says."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.pre_norm = config.block == "pre_norm"
        self.attention = Attention(config.d_model, config.n_head, config.norm_eps)
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.feed_forward = build_feed_forward(config, layer_idx)
        self.feed_forward_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_TC: torch.Tensor, sin_TC: torch.Tensor,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        if self.pre_norm:
            h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), cos_TC, sin_TC, cache)
            return h_BTD + self.feed_forward(self.feed_forward_norm(h_BTD))
        h_BTD = x_BTD + self.attention_norm(self.attention(x_BTD, cos_TC, sin_TC, cache))
        return h_BTD + self.feed_forward_norm(self.feed_forward(h_BTD))
