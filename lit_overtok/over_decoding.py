"""Over-Decoding: supervising the joint distribution of the next n tokens (paper §3.2 and App. C, PAPER.md §2.1-2.2).

Two published forms:

- ``OverDecodingHeads``, the product decomposition of App. C. A V^n-way output table reparameterized as
  ``E~(z_1..z_n) = sum_j E_j(z_j)`` makes the n-gram softmax factorize exactly into per-token softmaxes, so the
  loss is ``sum_j lambda_j CE(h W_j E_j^T, z_j)`` with lambda_1 = 1 (Algorithm 2: every head reads the *last*
  hidden state; W_j is an optional low-rank projection). Head 1 is the model's own next-token head
  (``Transformer.lm_head``), whose loss ``loss_next1`` the model already computes, so this module holds heads
  j = 2..n only; they are never used at inference.
- ``JointNGramHead`` + ``JointDecodingLoss``, the CFG study's exact n-gram decoding (§3.1, PAPER.md §5): one
  V^n-way softmax over the joint next-n label, for tiny vocabularies. The paper keeps only the first token at
  inference, i.e. samples from the first-token marginal, so the joint head *is* the model's next-token head and
  its forward returns those marginal log-probabilities. By the chain rule the joint cross-entropy is
  ``CE(z_1) + CE(z_2..z_n | z_1)``: the model's ``loss_next1`` is the first term and ``JointDecodingLoss`` adds the
  second, so the training objective is exactly the joint cross-entropy.

Targets: the batch's ``labels[t]`` is token t+1, so the token j steps ahead of position t is ``labels[t+j-1]``.
Positions whose target lies past the window, or is IGNORE_INDEX in the labels, are left out of that head's
mean. The joint label there is scored on its known prefix (the other tokens marginalized), which is exactly what
masking each factor does in the product form. Like the next-token head, the future heads predict across the
EOS/BOS boundaries of packed documents; attention crosses them too. [our choice: the paper does not say]
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lit_overtok.config import ModelConfig
from lit_overtok.heads import IGNORE_INDEX, MultiTokenConfig, NextTokenHead


def future_labels(labels_BT: torch.Tensor, ahead: int) -> torch.Tensor:
    """Target of each position ``ahead`` tokens on (``ahead=1`` is the labels themselves); IGNORE_INDEX past the window."""
    shifted_BT = labels_BT.new_full(labels_BT.shape, IGNORE_INDEX)
    T = labels_BT.shape[1]
    if ahead <= T:
        shifted_BT[:, : T - ahead + 1] = labels_BT[:, ahead - 1:]
    return shifted_BT


def token_nll(logits_BTV: torch.Tensor, target_BT: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (B, T) in fp32, zero where the target is IGNORE_INDEX."""
    nll_N = F.cross_entropy(logits_BTV.flatten(0, 1).float(), target_BT.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="none")
    return nll_N.view(target_BT.shape)


def masked_mean(values_BT: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """Mean over the valid positions (0 when there are none, rather than NaN)."""
    return values_BT.sum() / valid_BT.sum().clamp(min=1)


class FutureTokenHead(nn.Module):
    """One Over-Decoding head: ``E_j(W_j h)``, its own output table E_j behind an optional low-rank W_j."""

    def __init__(self, cfg: ModelConfig, low_rank: Optional[int]) -> None:
        super().__init__()
        self.down = nn.Linear(cfg.d_model, low_rank, bias=False) if low_rank is not None else None
        self.table = NextTokenHead(cfg, in_features=low_rank)

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        return self.table(hidden_BTD if self.down is None else self.down(hidden_BTD))


class OverDecodingHeads(nn.Module):
    """Heads j = 2..n of App. C, each predicting the token j steps ahead from the last hidden state."""

    def __init__(self, cfg: ModelConfig, multi_token: MultiTokenConfig) -> None:
        super().__init__()
        self.weights = multi_token.head_weights
        self.heads = nn.ModuleList(FutureTokenHead(cfg, multi_token.low_rank) for _ in range(multi_token.n - 1))

    def per_position_nll(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> list[torch.Tensor]:
        """CE_j at every position, (B, T) each for j = 2..n, zero where head j has no target."""
        return [token_nll(head(hidden_BTD), future_labels(labels_BT, j)) for j, head in enumerate(self.heads, start=2)]

    def loss(self, hidden_BTD: torch.Tensor, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor,
             embedded_BTD: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = hidden_BTD.new_zeros((), dtype=torch.float32)
        parts = {}
        for j, (nll_BT, weight) in enumerate(zip(self.per_position_nll(hidden_BTD, labels_BT), self.weights), start=2):
            ce_j = masked_mean(nll_BT, future_labels(labels_BT, j) != IGNORE_INDEX)
            total = total + weight * ce_j
            parts[f"loss_next{j}"] = ce_j.detach()
        return total, parts


class JointNGramHead(nn.Module):
    """The V^n-way joint softmax over the next n tokens, used as the model's next-token head.

    Row ``z_1·V^(n-1) + ... + z_n`` of the table scores the joint label (z_1..z_n): the next token is the most
    significant digit, so the logits view as (V, ..., V) in time order. ``forward`` returns the first-token
    marginal log-probabilities, which is what generation and evaluation sample from.
    """

    counts_as_embedding = True  # an unembedding, like NextTokenHead

    def __init__(self, cfg: ModelConfig, n: int) -> None:
        super().__init__()
        self.vocab_size, self.n = cfg.vocab_size, n
        self.proj = nn.Linear(cfg.d_model, cfg.vocab_size ** n, bias=False)

    def joint_log_probs(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """log p(z_1..z_n | h), (B, T, V^n) in fp32."""
        return self.proj(hidden_BTD).float().log_softmax(-1)

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        logp_BTN = self.joint_log_probs(hidden_BTD)
        return logp_BTN.unflatten(-1, (self.vocab_size, -1)).logsumexp(-1)

    def loss(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the first-token marginal: the model's ``loss_next1``."""
        return F.cross_entropy(self(hidden_BTD).flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX)

    def per_position_nll(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``-log p(known prefix of z_1..z_n)`` per position (zero where z_1 is unknown), and each token's
        marginal NLL ``-log p(z_j)`` (zero where z_j is unknown), j = 1..n."""
        V, n = self.vocab_size, self.n
        logp_BTN = self.joint_log_probs(hidden_BTD)
        logp_grid = logp_BTN.unflatten(-1, (V,) * n)
        targets = [future_labels(labels_BT, j) for j in range(1, n + 1)]
        joint_nll_BT = torch.zeros_like(logp_BTN[..., 0])
        prefix_known_BT = torch.ones_like(labels_BT, dtype=torch.bool)
        prefix_BT = torch.zeros_like(labels_BT)
        marginal_nlls = []
        for k, target_BT in enumerate(targets, start=1):
            known_BT = target_BT != IGNORE_INDEX
            # log p(z_1..z_k): the remaining n-k tokens summed out.
            prefix_known_BT = prefix_known_BT & known_BT
            prefix_BT = prefix_BT * V + target_BT.clamp(min=0)
            logp_prefix_BTM = logp_BTN.unflatten(-1, (V ** k, -1)).logsumexp(-1)
            prefix_nll_BT = -logp_prefix_BTM.gather(-1, prefix_BT[..., None]).squeeze(-1)
            joint_nll_BT = torch.where(prefix_known_BT, prefix_nll_BT, joint_nll_BT)
            # log p(z_k): every other token summed out.
            others = [2 + i for i in range(n) if i != k - 1]
            marginal_nlls.append(token_nll(logp_grid.logsumexp(others), target_BT))
        return joint_nll_BT, marginal_nlls


class JointDecodingLoss(nn.Module):
    """The part of the joint cross-entropy beyond ``loss_next1``: ``CE(z_2..z_n | z_1)``, averaged over the
    positions with a next token so that ``loss_next1 + this`` is the mean joint cross-entropy.

    Has no parameters: it reads the model's ``JointNGramHead``, held as a plain attribute (the head belongs to
    the model; registering it twice would duplicate it in checkpoints).
    """

    def __init__(self, joint_head: JointNGramHead) -> None:
        super().__init__()
        object.__setattr__(self, "joint_head", joint_head)

    def loss(self, hidden_BTD: torch.Tensor, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor,
             embedded_BTD: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        joint_nll_BT, marginal_nlls = self.joint_head.per_position_nll(hidden_BTD, labels_BT)
        has_next_BT = labels_BT != IGNORE_INDEX
        conditional = masked_mean(joint_nll_BT - marginal_nlls[0], has_next_BT)
        parts = {"loss_joint": masked_mean(joint_nll_BT, has_next_BT).detach()}
        for j, nll_BT in enumerate(marginal_nlls[1:], start=2):
            parts[f"loss_next{j}"] = masked_mean(nll_BT, future_labels(labels_BT, j) != IGNORE_INDEX).detach()
        return conditional, parts
