"""Gradient norms for the dashboards: the global L2 norm and one per part of the network.

Parts: ``backbone`` (blocks and final norm), ``embedding`` (the 1-gram table and Over-Encoding's projection),
``heads`` (an untied output head, Over-Decoding / MTP-DS modules), and any group a module claims through
``nn.hooks.optimizer_group`` (Over-Encoding's tables: ``over_encoding``). A tied output head is the embedding table
and counts once, there. Sparse row gradients (Over-Encoding's sparse path) are coalesced first, so a row looked up
several times in a batch counts once with its summed gradient, as the optimizer sees it.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_overtok.nn import hooks

PARTS = {"embed": "embedding", "blocks": "backbone", "norm": "backbone", "lm_head": "heads", "multi_token_head": "heads"}


def parameter_parts(model: nn.Module) -> dict[int, str]:
    """``{id(parameter): part}`` for the ``Transformer``'s parameters (see the module docstring)."""
    parts = {id(param): PARTS.get(name.split(".")[0], "other") for name, param in model.named_parameters()}
    for module in model.modules():
        group = hooks.optimizer_group(module)
        if group is not None:
            parts.update({id(param): group for param in module.parameters()})
    return parts


def gradient_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"grad_norm": global, "grad_norm/<part>": ...}`` of the current gradients (parts without one are left out).

    Parts are looked up at each call: a strategy that replaces the parameter objects (FSDP) keeps them right.
    """
    parts = parameter_parts(model)
    squares: dict[str, torch.Tensor] = {}
    for param in model.parameters():
        grad = param.grad
        if grad is None:
            continue
        values = grad.coalesce().values() if grad.is_sparse else grad
        part = parts.get(id(param), "other")
        squares[part] = squares.get(part, 0.0) + values.detach().float().pow(2).sum()
    if not squares:
        return {}
    norms = {f"grad_norm/{part}": total.sqrt() for part, total in squares.items()}
    norms["grad_norm"] = torch.stack(list(squares.values())).sum().sqrt()
    return norms
