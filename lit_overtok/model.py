"""The decoder-only transformer backbone in the OLMo2 recipe (PAPER.md §3.2, REFERENCES.md §1.4).

Features:
- reordered norm: ``h = x + norm(attn(x))``, ``out = h + norm(ffn(h))`` (OLMo2's block, not pre-norm);
- QK-norm over the whole q and k projections (before splitting into heads);
- RMSNorm, eps 1e-6, computed in fp32;
- RoPE with theta 500000, angles in fp32;
- causal ``scaled_dot_product_attention``, no biases anywhere in the backbone;
- init: truncated normal, std 0.02 (cut at 3 std), every parameter from its own generator seeded by its name,
  so adding a module (an Over-Encoding table, an extra head) never changes the initial values of the others.

Three seams are chosen by config: the input embedding (``lit_overtok.embedding``), the feed-forward of each
block (``lit_overtok.feed_forward``) and the output heads (``lit_overtok.heads``). Tensor names carry their
shape: B batch, T time, D model width, H heads, K head width, V vocabulary.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lit_overtok.config import ModelConfig, ParameterCounts
from lit_overtok.embedding import build_input_embedding
from lit_overtok.feed_forward import build_feed_forward
from lit_overtok.heads import build_multi_token_head, build_next_token_head
from lit_overtok.moe import pop_auxiliary_losses


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the autocast dtype, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE (rotate-half convention), built in fp32 and kept out of checkpoints."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos_TK, sin_TK = self._tables(torch.device("cpu"))
        self.register_buffer("cos_TK", cos_TK, persistent=False)
        self.register_buffer("sin_TK", sin_TK, persistent=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim))
        angles_TK2 = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device=device), inv_freq)
        angles_TK = torch.cat([angles_TK2, angles_TK2], dim=-1)
        return angles_TK.cos(), angles_TK.sin()

    def rebuild(self) -> None:
        """Recompute the tables (after a meta-device construction has been materialised)."""
        self.cos_TK, self.sin_TK = self._tables(self.cos_TK.device)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.max_seq_len:
            raise ValueError(
                f"sequence of {start + length} positions exceeds model.max_seq_len={self.max_seq_len}; "
                "raise model.max_seq_len or shorten the data's seq_len"
            )
        return self.cos_TK[start:start + length], self.sin_TK[start:start + length]


def apply_rotary(x_BHTK: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF/OLMo convention), on half-width tables to save elementwise work."""
    half = x_BHTK.shape[-1] // 2
    x1, x2 = x_BHTK.float().split(half, dim=-1)
    cos_Tk, sin_Tk = cos_TK[:, :half], sin_TK[:, :half]
    return torch.cat([x1 * cos_Tk - x2 * sin_Tk, x2 * cos_Tk + x1 * sin_Tk], dim=-1).to(x_BHTK.dtype)


@dataclass
class KVCache:
    """Preallocated keys/values of one layer for incremental decoding."""

    k_BHTK: torch.Tensor
    v_BHTK: torch.Tensor
    length: int = 0

    def append(self, k_BHTK: torch.Tensor, v_BHTK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k_BHTK.shape[2]
        self.k_BHTK[:, :, self.length:end] = k_BHTK
        self.v_BHTK[:, :, self.length:end] = v_BHTK
        self.length = end
        return self.k_BHTK[:, :, :end], self.v_BHTK[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # OLMo2 normalises the full q and k projections, not each head separately.
        self.q_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q_BTD = self.q_norm(self.q_proj(x_BTD))
        k_BTD = self.k_norm(self.k_proj(x_BTD))
        v_BTD = self.v_proj(x_BTD)
        q_BHTK, k_BHTK, v_BHTK = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q_BTD, k_BTD, v_BTD))
        q_BHTK = apply_rotary(q_BHTK, cos_TK, sin_TK)
        k_BHTK = apply_rotary(k_BHTK, cos_TK, sin_TK)
        # A prefill (empty cache) is plain causal attention; a decode step (one new token) sees all cached keys.
        is_causal = cache is None or cache.length == 0
        if cache is not None:
            if cache.length > 0 and T != 1:
                raise ValueError("KV-cached decoding takes one token per step after the prefill")
            k_BHTK, v_BHTK = cache.append(k_BHTK, v_BHTK)
        y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=is_causal and T > 1)
        return self.o_proj(y_BHTK.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """OLMo2 reordered-norm block: the norm is applied to each sublayer's output before the residual add."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = build_feed_forward(cfg, layer_idx)
        self.feed_forward_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        h_BTD = x_BTD + self.attention_norm(self.attention(x_BTD, cos_TK, sin_TK, cache))
        return h_BTD + self.feed_forward_norm(self.feed_forward(h_BTD))


class Transformer(nn.Module):
    """Input embedding -> blocks -> final norm -> next-token head (+ optional multi-token heads for training)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unset: link it from the data module or give it in the config")
        self.cfg = cfg
        self.embed = build_input_embedding(cfg)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = build_next_token_head(cfg, tied_table=self.embed.wte if cfg.tie_embeddings else None)
        self.multi_token_head = build_multi_token_head(cfg, self)
        self.init_weights()

    def hidden_states(self, input_ids_BT: torch.Tensor, caches: Optional[list[KVCache]] = None,
                      start: int = 0) -> torch.Tensor:
        """Final-normed hidden states for ``input_ids_BT[:, start:]``.

        The embedding always sees the whole id sequence, because an Over-Encoding lookup at position t needs the
        ids before t; with a KV cache only the new positions go through the blocks.
        """
        return self.backbone(self.embed(input_ids_BT)[:, start:], caches, start)

    def backbone(self, x_BTD: torch.Tensor, caches: Optional[list[KVCache]] = None, start: int = 0) -> torch.Tensor:
        """Blocks and final norm over embedded positions ``start .. start + T``."""
        cos_TK, sin_TK = self.rotary(start, x_BTD.shape[1])
        for i, block in enumerate(self.blocks):
            x_BTD = block(x_BTD, cos_TK, sin_TK, None if caches is None else caches[i])
        return self.norm(x_BTD)

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V): the only output generation and evaluation use."""
        return self.lm_head(self.hidden_states(input_ids_BT))

    def loss(self, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training objective: next-token cross-entropy plus whatever the multi-token head and MoE layers add.

        Returns the total loss and named parts for logging; ``loss_next1`` is always the plain next-token loss.
        """
        # Embedded once: MTP-DS feeds the next token's input embedding (Over-Encoding's, in OT) to its modules.
        embedded_BTD = self.embed(input_ids_BT)
        hidden_BTD = self.backbone(embedded_BTD)
        loss_next1 = self.lm_head.loss(hidden_BTD, labels_BT)
        parts = {"loss_next1": loss_next1.detach()}
        total = loss_next1
        if self.multi_token_head is not None:
            extra, extra_parts = self.multi_token_head.loss(hidden_BTD, input_ids_BT, labels_BT, embedded_BTD=embedded_BTD)
            total = total + extra
            parts.update(extra_parts)
        aux, aux_parts = pop_auxiliary_losses(self)  # MoE load balancing and router z-loss (training only)
        if aux is not None:
            total = total + aux
            parts.update(aux_parts)
        return total, parts

    def new_kv_caches(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        shape = (batch_size, self.cfg.n_head, max_len, self.cfg.head_dim)
        return [KVCache(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                for _ in self.blocks]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated-normal(0, init_std) for matrices and tables, ones for norms, zeros for biases.

        Each parameter draws from a generator seeded by (global seed, parameter name), so the draw does not depend
        on which other modules exist or in which order they were built.
        """
        base_seed = torch.initial_seed() % (2**31)
        norm_weights = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        for name, param in self.named_parameters():
            if param.is_meta:
                continue
            if id(param) in norm_weights:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                generator = torch.Generator(device=param.device).manual_seed(base_seed + zlib.crc32(name.encode()))
                std = self.cfg.init_std
                nn.init.trunc_normal_(param, 0.0, std, -3 * std, 3 * std, generator=generator)

    def parameter_counts(self) -> ParameterCounts:
        """Total, vocabulary-sized (lookup tables and the unembedding), the rest, and what a token uses.

        ``embedding`` holds every lookup table (the 1-gram table, Over-Encoding tables) and the output unembedding, so
        ``non_embedding`` is the backbone the preset names refer to. Active counts route MoE experts at k/E.
        """
        vocab_sized = {id(p) for m in self.modules() if isinstance(m, nn.Embedding) or getattr(m, "counts_as_embedding", False)
                       for p in m.parameters()}
        unique = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in unique.values())
        embedding = sum(p.numel() for i, p in unique.items() if i in vocab_sized)
        inactive = sum(m.inactive_parameter_count() for m in self.modules() if hasattr(m, "inactive_parameter_count"))
        return ParameterCounts(
            total=total, embedding=embedding, non_embedding=total - embedding,
            active=total - inactive, active_non_embedding=total - embedding - inactive,
        )
