"""The feed-forward of each block: OLMo2's dense SwiGLU, or a mixture of experts (``moe``) when configured."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.moe import MoEFeedForward


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` without biases."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BTD)) * self.w3(x_BTD))


def build_feed_forward(config: ModelConfig, layer_idx: int) -> nn.Module:
    if config.moe is not None:
        return MoEFeedForward(config.d_model, config.moe, layer_idx)
    return SwiGLU(config.d_model, config.d_ff)
