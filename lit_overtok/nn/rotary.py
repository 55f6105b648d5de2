"""Rotary position embedding (RoPE), rotate-half convention as in OLMo2 / Hugging Face, tables in fp32."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE, built in fp32 and kept out of checkpoints."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos_TC, sin_TC = self._tables(torch.device("cpu"))
        self.register_buffer("cos_TC", cos_TC, persistent=False)
        self.register_buffer("sin_TC", sin_TC, persistent=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim))
        angles_Tc = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device=device), inv_freq)
        angles_TC = torch.cat([angles_Tc, angles_Tc], dim=-1)
        return angles_TC.cos(), angles_TC.sin()

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.max_seq_len:
            raise ValueError(
                f"sequence of {start + length} positions exceeds model_config.max_seq_len={self.max_seq_len}; "
                "raise model_config.max_seq_len or shorten the data's seq_len"
            )
        return self.cos_TC[start:start + length], self.sin_TC[start:start + length]


def apply_rotary(x_BHTC: torch.Tensor, cos_TC: torch.Tensor, sin_TC: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF/OLMo convention), on half-width tables to save elementwise work."""
    half = x_BHTC.shape[-1] // 2
    x1, x2 = x_BHTC.float().split(half, dim=-1)
    cos_Tc, sin_Tc = cos_TC[:, :half], sin_TC[:, :half]
    return torch.cat([x1 * cos_Tc - x2 * sin_Tc, x2 * cos_Tc + x1 * sin_Tc], dim=-1).to(x_BHTC.dtype)
