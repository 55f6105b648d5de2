"""Output heads: the next-token head every model has, and the seam for training-only multi-token heads.

Generation and evaluation call only the next-token head (``Transformer.lm_head``); a multi-token head
(Over-Decoding, MTP-DS) adds loss terms during training and is never used to produce tokens.
``MultiTokenConfig`` (``model_config.multi_token``) selects which one: none, the Over-Decoding product heads of the
paper's App. C (``over_decoding``), the exact joint n-gram decoding of its CFG study (same module), or
DeepSeek-V3-style sequential MTP (``mtp``), which with Over-Encoding makes OT. ``transformer`` builds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from lit_overtok.nn.chunked_loss import head_mean_loss, head_token_nll, positions_per_chunk

MULTI_TOKEN_MODES = ("none", "od", "joint", "mtp_ds")
# A joint head holds V^n rows; beyond this the product decomposition ("od") is the way (docs/method.md §2.2).
MAX_JOINT_LABELS = 1 << 20


@dataclass
class MultiTokenConfig:
    """Which tokens beyond the next one the model is trained to predict (docs/method.md §2, §5).

    The next-token loss (``loss_next1``, weight 1) is always there; the modes add:

    - ``od``: Over-Decoding by product decomposition (App. C): heads j = 2..n, each its own output table over
      the last hidden state (optionally through a low-rank projection), loss ``sum_j lambda_j CE_j``;
    - ``joint``: the CFG study's exact n-gram decoding, one V^n-way softmax over the joint next-n label; the
      next-token head is its first-token marginal (the paper keeps only the first token at inference);
    - ``mtp_ds``: DeepSeek-V3's sequential MTP, n-1 chained modules through the shared output head; with
      Over-Encoding on, this is the paper's OT.
    """

    mode: Literal["none", "od", "joint", "mtp_ds"] = "none"
    n: int = 2
    """Tokens predicted per position: the next one and n-1 further ones."""
    loss_weights: Optional[list[float]] = None
    """lambda_2..lambda_n, one per extra head (od, mtp_ds). Default 0.1 each (the paper's OT weight and its
    recommended small OD weight). The joint mode has no weights: its loss is one cross-entropy."""
    low_rank: Optional[int] = None
    """od only: width d of the projection W_j (D -> d) in front of each extra output table; None = no projection."""

    def __post_init__(self) -> None:
        if self.mode not in MULTI_TOKEN_MODES:
            raise ValueError(f"model_config.multi_token.mode: unknown mode {self.mode!r}; valid modes are {list(MULTI_TOKEN_MODES)}")
        if self.n < 2:
            raise ValueError(f"model_config.multi_token.n must be >= 2 (the next token plus at least one more), got {self.n}")
        if self.loss_weights is not None:
            if self.mode == "joint":
                raise ValueError("model_config.multi_token.loss_weights: the joint mode's loss is a single cross-entropy over "
                                 "the joint label and takes no weights; remove loss_weights or use mode 'od'")
            if len(self.loss_weights) != self.n - 1:
                raise ValueError(f"model_config.multi_token.loss_weights needs n-1={self.n - 1} weights (lambda_2..lambda_n), "
                                 f"got {len(self.loss_weights)}")
            if not all(math.isfinite(w) and w > 0 for w in self.loss_weights):
                raise ValueError(f"model_config.multi_token.loss_weights must be positive and finite, got {self.loss_weights}")
        if self.low_rank is not None and (self.mode != "od" or self.low_rank <= 0):
            raise ValueError(f"model_config.multi_token.low_rank must be a positive width and applies to mode 'od' only, "
                             f"got {self.low_rank} with mode {self.mode!r}")

    @property
    def head_weights(self) -> list[float]:
        """lambda_2..lambda_n."""
        return list(self.loss_weights) if self.loss_weights is not None else [0.1] * (self.n - 1)

    def check_model(self, d_model: int, vocab_size: Optional[int], tie_embeddings: bool) -> None:
        """Checks that need the model's shape (called from ``ModelConfig.__post_init__``)."""
        if self.low_rank is not None and self.low_rank > d_model:
            raise ValueError(f"model_config.multi_token.low_rank={self.low_rank} exceeds model_config.d_model={d_model}; "
                             "a low-rank projection must be narrower than the model")
        if self.mode != "joint":
            return
        if tie_embeddings:
            raise ValueError("model_config.multi_token.mode='joint' predicts V^n joint labels, so its output table cannot be "
                             "tied to the V-row input table; set model_config.tie_embeddings: false")
        if vocab_size is not None and vocab_size ** self.n > MAX_JOINT_LABELS:
            raise ValueError(f"model_config.multi_token.mode='joint' needs vocab_size**n <= {MAX_JOINT_LABELS} output rows, got "
                             f"{vocab_size}**{self.n}; use mode 'od' (the product decomposition) for this vocabulary")

    def extra_flops_per_token(self, vocab_size: int, padded_vocab_size: int, d_model: int, seq_len: int) -> float:
        """Training FLOPs per token the heads add beyond what ``counts.flops_per_token`` already counts.

        That count covers every non-embedding matrix (MTP blocks and projections, OD low-rank W_j) and one V×D
        unembedding; left are the extra unembeddings and the attention of the MTP blocks.
        """
        if self.mode == "od":
            return 6.0 * (self.n - 1) * padded_vocab_size * (self.low_rank or d_model)
        if self.mode == "joint":
            return 6.0 * (vocab_size ** self.n - padded_vocab_size) * d_model
        if self.mode == "mtp_ds":
            return (self.n - 1) * (6.0 * padded_vocab_size * d_model + 6.0 * d_model * seq_len)
        return 0.0


class NextTokenHead(nn.Module):
    """Unembedding to the vocabulary; optionally tied to the 1-gram input table.

    ``in_features`` is d_model, or narrower behind an Over-Decoding low-rank projection. With ``loss_chunk_logits``
    set, the loss never holds more than that many logits at once (``chunked_loss``); None: the plain path.
    """

    counts_as_embedding = True  # vocabulary-sized (``hooks.is_vocabulary_sized``): counted apart from the backbone

    def __init__(self, in_features: int, vocab_size: int, padded_vocab_size: int,
                 tied_table: Optional[nn.Embedding] = None, loss_chunk_logits: Optional[int] = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.loss_chunk = None if loss_chunk_logits is None else positions_per_chunk(loss_chunk_logits, padded_vocab_size)
        self.is_padded = padded_vocab_size != vocab_size
        self.proj = nn.Linear(in_features, padded_vocab_size, bias=False)
        if tied_table is not None:
            self.proj.weight = tied_table.weight

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        # Padding rows exist only for matmul efficiency; they are never valid predictions.
        logits_BTV = self.proj(hidden_BTD)
        return logits_BTV[..., : self.vocab_size] if self.is_padded else logits_BTV

    def token_nll(self, hidden_BTD: torch.Tensor, target_BT: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (B, T) in fp32 at every position, zero where the target is IGNORE_INDEX."""
        return head_token_nll(self, self.loss_chunk, hidden_BTD, target_BT)

    def loss(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        return head_mean_loss(self, self.loss_chunk, hidden_BTD, labels_BT)
