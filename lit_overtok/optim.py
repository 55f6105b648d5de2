"""AdamW with parameter groups and the warmup-then-cosine learning-rate schedule.

Groups (OLMo2 recipe, REFERENCES.md §1.4): matrices decay; lookup tables (``nn.Embedding``), norm weights and
biases do not. A module can claim its parameters for a named group by setting ``optimizer_group`` (Over-Encoding
does, so its tables get their own learning-rate multiplier and weight decay); ``OptimizerConfig.groups`` sets
each named group's ``lr_multiplier`` and ``weight_decay``. Every parameter lands in exactly one group, which is
asserted, so no parameter silently goes untrained. A model with sparse-gradient tables (Over-Encoding's sparse path)
gets ``RowSparseAdamW``, which is AdamW for everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lit_overtok.sparse_adamw import RowSparseAdamW


@dataclass
class GroupSettings:
    lr_multiplier: float = 1.0
    weight_decay: float = 0.0


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    """Peak learning rate. The default suits the CPU-sized default run; configs give the paper's values."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decay of the matrices; tables, norms and biases are exempt unless a named group says otherwise."""
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    """The cosine decays to lr·min_lr_ratio at the last step (OLMoE's alpha_f)."""
    groups: dict[str, GroupSettings] = field(default_factory=dict)
    """Settings of named groups claimed by modules via ``optimizer_group`` (e.g. 'over_encoding')."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optimizer.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        self.groups = {name: s if isinstance(s, GroupSettings) else GroupSettings(**s) for name, s in self.groups.items()}


def _group_of(module: nn.Module, name: str, param: nn.Parameter, claimed: dict[int, str]) -> str:
    if id(param) in claimed:
        return claimed[id(param)]
    if isinstance(module, nn.Embedding):
        return "no_decay"
    if param.ndim < 2 or name.endswith("bias"):
        return "no_decay"
    return "decay"


def parameter_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Torch param-group dicts with ``name``, ``params``, ``weight_decay`` and ``lr_multiplier``."""
    claimed: dict[int, str] = {}
    for module in model.modules():
        group = getattr(module, "optimizer_group", None)
        if group is not None:
            for param in module.parameters():
                claimed.setdefault(id(param), group)
    buckets: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            buckets.setdefault(_group_of(module, name, param, claimed), []).append(param)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert seen == trainable, "parameter grouping missed some trainable parameters"
    groups = []
    for name, params in buckets.items():
        if name == "decay":
            settings = GroupSettings(1.0, cfg.weight_decay)
        elif name == "no_decay":
            settings = GroupSettings(1.0, 0.0)
        else:
            settings = cfg.groups.get(name, GroupSettings(1.0, 0.0))
        groups.append({"name": name, "params": params, "weight_decay": settings.weight_decay,
                       "lr_multiplier": settings.lr_multiplier, "lr": cfg.lr * settings.lr_multiplier})
    return groups


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warmup, then cosine down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, total_steps: int):
    groups = parameter_groups(model, cfg)
    # Tables with sparse row gradients (Over-Encoding's sparse path) need the lazy row update; else plain AdamW.
    has_sparse = any(isinstance(m, nn.Embedding) and m.sparse for m in model.modules())
    optimizer_class = RowSparseAdamW if has_sparse else torch.optim.AdamW
    optimizer = optimizer_class(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )
    return optimizer, scheduler
