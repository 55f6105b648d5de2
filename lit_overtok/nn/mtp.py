"""MTP-DS: DeepSeek-V3's sequential multi-token prediction, and with Over-Encoding the paper's OT (§3.2, §4.3;
docs/method.md §2.3).

Depth k = 1..n-1 predicts the token k+1 steps ahead of position t from the previous depth's state and the
*input embedding* of the token k ahead:

    h'_t = W_k [RMSNorm(h^(k-1)_t); RMSNorm(Emb(x_(t+k)))]       W_k: 2D -> D
    h^k  = Block_k(h'),   logits = lm_head(RMSNorm(h^k_t))        predicts x_(t+k+1)

with h^0 the main model's final hidden state (after its final norm; the module's RMSNorm renormalizes it anyway),
``Emb`` the model's own input embedding and ``lm_head`` its shared output head. When the input embedding is
Over-Encoding, ``Emb(x_(t+k))`` is the OE vector at position t+k, built from the n-gram ending there (the embedding pass
of the main forward, shifted, not a lookup of a lone token): so "over-encoding directly participates in future-token
prediction" and the OE tables receive gradient from it.
Loss: ``sum_k lambda_(k+1) CE_(k+1)`` with lambda = 0.1 by default (the paper's OT uses one depth, weight 0.1).

Each depth has its own norms, projection and one transformer block built like the model's blocks and numbered after
them (so an MoE model gets an MoE block, as in DeepSeek-V3, with its own metrics), and its own final RMSNorm before
the shared head. These modules are
training-only: generation and evaluation never call them.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_overtok.nn.block import Block
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.heads import MultiTokenConfig, NextTokenHead
from lit_overtok.nn.losses import IGNORE_INDEX, masked_mean
from lit_overtok.nn.norms import RMSNorm
from lit_overtok.nn.rotary import RotaryEmbedding


class MTPModule(nn.Module):
    """One depth: combine the state with the next token's embedding, 2D -> D, one block, then a norm."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_norm = RMSNorm(config.d_model, config.norm_eps)
        self.embed_norm = RMSNorm(config.d_model, config.norm_eps)
        self.proj = nn.Linear(2 * config.d_model, config.d_model, bias=False)
        self.block = Block(config, layer_idx)
        self.norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, state_BLD: torch.Tensor, embedded_BLD: torch.Tensor, cos_LC: torch.Tensor,
                sin_LC: torch.Tensor) -> torch.Tensor:
        """The block's output h^k (un-normed; the next depth and ``self.norm`` both read it)."""
        x_BLD = self.proj(torch.cat([self.hidden_norm(state_BLD), self.embed_norm(embedded_BLD)], dim=-1))
        return self.block(x_BLD, cos_LC, sin_LC)


class MultiTokenPredictionDS(nn.Module):
    """n-1 chained MTP depths sharing the model's input embedding output and its output head."""

    def __init__(self, config: ModelConfig, multi_token: MultiTokenConfig, shared_head: NextTokenHead,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.weights = multi_token.head_weights
        self.depths = nn.ModuleList(MTPModule(config, config.n_layer + k) for k in range(multi_token.n - 1))
        # The output head and RoPE tables belong to the model: plain attributes, so they are not registered twice
        # (checkpoints would hold them twice).
        object.__setattr__(self, "shared_head", shared_head)
        object.__setattr__(self, "rotary", rotary)

    def loss(self, hidden_BTD: torch.Tensor, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor,
             embedded_BTD: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``embedded_BTD`` is the model's input embedding of ``input_ids_BT`` from the same forward pass."""
        T = hidden_BTD.shape[1]
        if T <= len(self.depths):
            raise ValueError(f"MTP-DS with n={len(self.depths) + 1} needs sequences longer than {len(self.depths)} "
                             f"tokens, got {T}")
        total = hidden_BTD.new_zeros((), dtype=torch.float32)
        parts = {}
        state_BLD = hidden_BTD
        for k, (depth, weight) in enumerate(zip(self.depths, self.weights), start=1):
            # Position t < T-k pairs state t with the embedding of x_(t+k) and predicts x_(t+k+1) = labels[t+k].
            L = T - k
            cos_LC, sin_LC = self.rotary(0, L)
            state_BLD = depth(state_BLD[:, :L], embedded_BTD[:, k:], cos_LC, sin_LC)
            target_BL = labels_BT[:, k:]
            ce = masked_mean(self.shared_head.token_nll(depth.norm(state_BLD), target_BL), target_BL != IGNORE_INDEX)
            total = total + weight * ce
            parts[f"loss_next{k + 1}"] = ce.detach()
        return total, parts
