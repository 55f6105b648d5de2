"""Cross-entropy pieces shared by every head: the ignored label, per-position NLL, masked means, future targets.

``IGNORE_INDEX`` is defined here once; the data modules write it into labels at padding positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


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


def mean_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over the positions whose label is not IGNORE_INDEX."""
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX)
