"""Over-Decoding: supervising the joint distribution of the next n tokens (paper §3.2 and App. C, docs/method.md §2.1-2.2).

Two published forms:

- ``OverDecodingHeads``, the product decomposition of App. C. A V^n-way output table reparameterized as
  ``E~(z_1..z_n) = sum_j E_j(z_j)`` makes the n-gram softmax factorize exactly into per-token softmaxes, so the
  loss is ``sum_j lambda_j CE(h W_j E_j^T, z_j)`` with lambda_1 = 1 (Algorithm 2: every head reads the *last*
  hidden state; W_j is an optional low-rank projection). Head 1 is the model's own next-token head
  (``Transformer.lm_head``), whose loss ``loss_next1`` the model already computes, so this module holds heads
  j = 2..n only; they are never used at inference.
- ``JointNGramHead`` + ``JointDecodingLoss``, the CFG study's exact n-gram decoding (§3.1, docs/method.md §5): one
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
from torch import nn

from lit_overtok.nn.chunked_loss import head_mean_loss, over_position_chunks, positions_per_chunk
from lit_overtok.nn.heads import MultiTokenConfig, NextTokenHead
from lit_overtok.nn.losses import future_labels, IGNORE_INDEX, masked_mean, token_nll


class FutureTokenHead(nn.Module):
    """One Over-Decoding head: ``E_j(W_j h)``, its own output table E_j behind an optional low-rank W_j."""

    def __init__(self, d_model: int, vocab_size: int, padded_vocab_size: int, low_rank: Optional[int],
                 loss_chunk_logits: Optional[int] = None) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, low_rank, bias=False) if low_rank is not None else None
        self.table = NextTokenHead(low_rank or d_model, vocab_size, padded_vocab_size,
                                   loss_chunk_logits=loss_chunk_logits)

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        return self.table(self.table_input(hidden_BTD))

    def table_input(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        return hidden_BTD if self.down is None else self.down(hidden_BTD)

    def token_nll(self, hidden_BTD: torch.Tensor, target_BT: torch.Tensor) -> torch.Tensor:
        """CE_j at every position (B, T); the low-rank projection runs on all positions, the table by chunks."""
        return self.table.token_nll(self.table_input(hidden_BTD), target_BT)


class OverDecodingHeads(nn.Module):
    """Heads j = 2..n of App. C, each predicting the token j steps ahead from the last hidden state."""

    def __init__(self, multi_token: MultiTokenConfig, d_model: int, vocab_size: int, padded_vocab_size: int,
                 loss_chunk_logits: Optional[int] = None) -> None:
        super().__init__()
        self.weights = multi_token.head_weights
        self.heads = nn.ModuleList(FutureTokenHead(d_model, vocab_size, padded_vocab_size, multi_token.low_rank,
                                                   loss_chunk_logits) for _ in range(multi_token.n - 1))

    def per_position_nll(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> list[torch.Tensor]:
        """CE_j at every position, (B, T) each for j = 2..n, zero where head j has no target."""
        return [head.token_nll(hidden_BTD, future_labels(labels_BT, j)) for j, head in enumerate(self.heads, start=2)]

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

    counts_as_embedding = True  # an unembedding, like NextTokenHead (``hooks.is_vocabulary_sized``)

    def __init__(self, d_model: int, vocab_size: int, n: int, loss_chunk_logits: Optional[int] = None) -> None:
        super().__init__()
        self.vocab_size, self.n = vocab_size, n
        self.loss_chunk = None if loss_chunk_logits is None else positions_per_chunk(loss_chunk_logits, vocab_size ** n)
        self.proj = nn.Linear(d_model, vocab_size ** n, bias=False)

    def joint_log_probs(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """log p(z_1..z_n | h), (B, T, J = V^n) in fp32."""
        return self.proj(hidden_BTD).float().log_softmax(-1)

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        logp_BTJ = self.joint_log_probs(hidden_BTD)
        return logp_BTJ.unflatten(-1, (self.vocab_size, -1)).logsumexp(-1)

    def loss(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the first-token marginal: the model's ``loss_next1``."""
        return head_mean_loss(self, self.loss_chunk, hidden_BTD, labels_BT)

    def per_position_nll(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``-log p(known prefix of z_1..z_n)`` per position (zero where z_1 is unknown), and each token's
        marginal NLL ``-log p(z_j)`` (zero where z_j is unknown), j = 1..n."""
        targets = [future_labels(labels_BT, j) for j in range(1, self.n + 1)]
        if self.loss_chunk is None:
            joint_nll_BT, *marginal_nlls = self.nll_given_targets(hidden_BTD, *targets)
        else:
            joint_nll_BT, *marginal_nlls = over_position_chunks(self.nll_given_targets, self.loss_chunk, hidden_BTD, *targets)
        return joint_nll_BT, marginal_nlls

    def nll_given_targets(self, hidden_BTD: torch.Tensor, *targets_BT: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``per_position_nll`` from the targets 1..n steps ahead, as one tuple (joint NLL first)."""
        V, n = self.vocab_size, self.n
        logp_BTJ = self.joint_log_probs(hidden_BTD)
        logp_grid = logp_BTJ.unflatten(-1, (V,) * n)
        joint_nll_BT = torch.zeros_like(logp_BTJ[..., 0])
        prefix_known_BT = torch.ones_like(targets_BT[0], dtype=torch.bool)
        prefix_BT = torch.zeros_like(targets_BT[0])
        marginal_nlls = []
        for k, target_BT in enumerate(targets_BT, start=1):
            known_BT = target_BT != IGNORE_INDEX
            # log p(z_1..z_k): the remaining n-k tokens summed out.
            prefix_known_BT = prefix_known_BT & known_BT
            prefix_BT = prefix_BT * V + target_BT.clamp(min=0)
            logp_prefix_BTM = logp_BTJ.unflatten(-1, (V ** k, -1)).logsumexp(-1)
            prefix_nll_BT = -logp_prefix_BTM.gather(-1, prefix_BT[..., None]).squeeze(-1)
            joint_nll_BT = torch.where(prefix_known_BT, prefix_nll_BT, joint_nll_BT)
            # log p(z_k): every other token summed out.
            others = [2 + i for i in range(n) if i != k - 1]
            marginal_nlls.append(token_nll(logp_grid.logsumexp(others), target_BT))
        return (joint_nll_BT, *marginal_nlls)


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
