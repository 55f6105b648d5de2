"""Causal self-attention in the OLMo2 recipe: QK-norm over the whole q and k projections, RoPE, no biases, and the
per-layer KV cache used by incremental decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lit_overtok.nn.norms import RMSNorm
from lit_overtok.nn.rotary import apply_rotary


@dataclass
class KVCache:
    """Preallocated keys/values of one layer for incremental decoding."""

    k_BHTC: torch.Tensor
    v_BHTC: torch.Tensor
    length: int = 0
    memory: Optional[object] = None
    """Decoding state of a module run before this block (Engram's convolution window, ``nn.engram.EngramCache``)."""

    def append(self, k_BHTC: torch.Tensor, v_BHTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k_BHTC.shape[2]
        self.k_BHTC[:, :, self.length:end] = k_BHTC
        self.v_BHTC[:, :, self.length:end] = v_BHTC
        self.length = end
        return self.k_BHTC[:, :, :end], self.v_BHTC[:, :, :end]


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, norm_eps: float) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        # OLMo2 normalises the full q and k projections, not each head separately.
        self.q_norm = RMSNorm(d_model, norm_eps)
        self.k_norm = RMSNorm(d_model, norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_TC: torch.Tensor, sin_TC: torch.Tensor,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q_BTD = self.q_norm(self.q_proj(x_BTD))
        k_BTD = self.k_norm(self.k_proj(x_BTD))
        v_BTD = self.v_proj(x_BTD)
        q_BHTC, k_BHTC, v_BHTC = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q_BTD, k_BTD, v_BTD))
        q_BHTC = apply_rotary(q_BHTC, cos_TC, sin_TC)
        k_BHTC = apply_rotary(k_BHTC, cos_TC, sin_TC)
        # A prefill (empty cache) is plain causal attention; a decode step (one new token) sees all cached keys.
        is_causal = cache is None or cache.length == 0
        if cache is not None:
            if cache.length > 0 and T != 1:
                raise ValueError("KV-cached decoding takes one token per step after the prefill")
            k_BHTC, v_BHTC = cache.append(k_BHTC, v_BHTC)
        y_BHTC = F.scaled_dot_product_attention(q_BHTC, k_BHTC, v_BHTC, is_causal=is_causal and T > 1)
        return self.o_proj(y_BHTC.transpose(1, 2).reshape(B, T, D))
