"""Output heads: the next-token head every model has, and the seam for training-only multi-token heads.

Generation and evaluation call only the next-token head (``Transformer.lm_head``); a multi-token head
(Over-Decoding, MTP-DS) adds loss terms during training and is never used to produce tokens.
``MultiTokenConfig`` (``model.multi_token``) selects which one: none, the Over-Decoding product heads of the
paper's App. C (``lit_overtok.over_decoding``), the exact joint n-gram decoding of its CFG study (same module),
or DeepSeek-V3-style sequential MTP (``lit_overtok.mtp``), which with Over-Encoding makes OT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # config.py imports this module for MultiTokenConfig
    from lit_overtok.config import ModelConfig

IGNORE_INDEX = -100

MULTI_TOKEN_MODES = ("none", "od", "joint", "mtp_ds")
# A joint head holds V^n rows; beyond this the product decomposition ("od") is the way (PAPER.md §2.2).
MAX_JOINT_LABELS = 1 << 20


@dataclass
class MultiTokenConfig:
    """Which tokens beyond the next one the model is trained to predict (PAPER.md §2, §5).

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
            raise ValueError(f"model.multi_token.mode: unknown mode {self.mode!r}; valid modes are {list(MULTI_TOKEN_MODES)}")
        if self.n < 2:
            raise ValueError(f"model.multi_token.n must be >= 2 (the next token plus at least one more), got {self.n}")
        if self.loss_weights is not None:
            if self.mode == "joint":
                raise ValueError("model.multi_token.loss_weights: the joint mode's loss is a single cross-entropy over "
                                 "the joint label and takes no weights; remove loss_weights or use mode 'od'")
            if len(self.loss_weights) != self.n - 1:
                raise ValueError(f"model.multi_token.loss_weights needs n-1={self.n - 1} weights (lambda_2..lambda_n), "
                                 f"got {len(self.loss_weights)}")
            if not all(math.isfinite(w) and w > 0 for w in self.loss_weights):
                raise ValueError(f"model.multi_token.loss_weights must be positive and finite, got {self.loss_weights}")
        if self.low_rank is not None and (self.mode != "od" or self.low_rank <= 0):
            raise ValueError(f"model.multi_token.low_rank must be a positive width and applies to mode 'od' only, "
                             f"got {self.low_rank} with mode {self.mode!r}")

    @property
    def head_weights(self) -> list[float]:
        """lambda_2..lambda_n."""
        return list(self.loss_weights) if self.loss_weights is not None else [0.1] * (self.n - 1)

    def check_model(self, cfg: "ModelConfig") -> None:
        """Checks that need the model's shape (called from ``ModelConfig.__post_init__``)."""
        if self.low_rank is not None and self.low_rank > cfg.d_model:
            raise ValueError(f"model.multi_token.low_rank={self.low_rank} exceeds model.d_model={cfg.d_model}; "
                             "a low-rank projection must be narrower than the model")
        if self.mode != "joint":
            return
        if cfg.tie_embeddings:
            raise ValueError("model.multi_token.mode='joint' predicts V^n joint labels, so its output table cannot be "
                             "tied to the V-row input table; set model.tie_embeddings: false")
        if cfg.vocab_size is not None and cfg.vocab_size ** self.n > MAX_JOINT_LABELS:
            raise ValueError(f"model.multi_token.mode='joint' needs vocab_size**n <= {MAX_JOINT_LABELS} output rows, got "
                             f"{cfg.vocab_size}**{self.n}; use mode 'od' (the product decomposition) for this vocabulary")

    def extra_flops_per_token(self, cfg: "ModelConfig", seq_len: int) -> float:
        """Training FLOPs per token the heads add beyond what ``ModelConfig.flops_per_token`` already counts.

        That count covers every non-embedding matrix (MTP blocks and projections, OD low-rank W_j) and one V×D
        unembedding; left are the extra unembeddings and the attention of the MTP blocks.
        """
        vocab_rows = cfg.padded_vocab_size
        if self.mode == "od":
            return 6.0 * (self.n - 1) * vocab_rows * (self.low_rank or cfg.d_model)
        if self.mode == "joint":
            return 6.0 * (cfg.vocab_size ** self.n - vocab_rows) * cfg.d_model
        if self.mode == "mtp_ds":
            return (self.n - 1) * (6.0 * vocab_rows * cfg.d_model + 6.0 * cfg.d_model * seq_len)
        return 0.0


class NextTokenHead(nn.Module):
    """Unembedding to the vocabulary; optionally tied to the 1-gram input table.

    ``in_features`` defaults to d_model; Over-Decoding's low-rank heads feed it a narrower vector.
    """

    counts_as_embedding = True  # vocabulary-sized, so parameter counts keep it out of the backbone

    def __init__(self, cfg: "ModelConfig", tied_table: Optional[nn.Embedding] = None,
                 in_features: Optional[int] = None) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.is_padded = cfg.padded_vocab_size != cfg.vocab_size
        self.proj = nn.Linear(in_features or cfg.d_model, cfg.padded_vocab_size, bias=False)
        if tied_table is not None:
            self.proj.weight = tied_table.weight

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        # Padding rows exist only for matmul efficiency; they are never valid predictions.
        logits_BTV = self.proj(hidden_BTD)
        return logits_BTV[..., : self.vocab_size] if self.is_padded else logits_BTV

    def loss(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        logits_BTV = self(hidden_BTD)
        return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX)


def build_next_token_head(cfg: "ModelConfig", tied_table: Optional[nn.Embedding]) -> nn.Module:
    """The head generation and evaluation use: a V-way unembedding, or for joint n-gram decoding the first-token
    marginal of the V^n-way joint softmax."""
    if cfg.multi_token is not None and cfg.multi_token.mode == "joint":
        from lit_overtok.over_decoding import JointNGramHead  # imported here: it builds on this module

        return JointNGramHead(cfg, cfg.multi_token.n)
    return NextTokenHead(cfg, tied_table)


def build_multi_token_head(cfg: "ModelConfig", model: nn.Module) -> Optional[nn.Module]:
    """Training-only heads that predict tokens further ahead; None for the plain next-token objective.

    The returned module's ``loss(hidden_BTD, input_ids_BT, labels_BT, embedded_BTD=...)`` gives the weighted extra
    loss and named, detached parts (``loss_next2``, ...). ``model`` is the half-built Transformer (its embedding,
    blocks, norm and lm_head exist); heads keep plain references to what they share and never register it.
    """
    if cfg.multi_token is None or cfg.multi_token.mode == "none":
        return None
    # Imported here: these modules build on model.py, which imports this one.
    if cfg.multi_token.mode == "mtp_ds":
        from lit_overtok.mtp import MultiTokenPredictionDS

        return MultiTokenPredictionDS(cfg, cfg.multi_token, model)
    from lit_overtok.over_decoding import JointDecodingLoss, OverDecodingHeads

    if cfg.multi_token.mode == "joint":
        return JointDecodingLoss(model.lm_head)
    return OverDecodingHeads(cfg, cfg.multi_token)
