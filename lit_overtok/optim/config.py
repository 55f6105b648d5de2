"""``OptimizerConfig``: AdamW's settings, the schedule's, and the settings of named parameter groups."""

from __future__ import annotations

from dataclasses import dataclass, field

from lit_overtok.configuration import config_from
from lit_overtok.optim.sparse_adamw import ROW_SEMANTICS


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
    """Settings of named groups claimed by modules via ``optimizer_group`` (``nn.hooks``; e.g. 'over_encoding')."""
    sparse_row_semantics: str = "adamw"
    """Tables with sparse row gradients (``over_encoding.sparse: true``): "adamw" trains every row as dense AdamW
    does, rows a step skips caught up when next read (the default; runs compare with dense-table runs); "lazy"
    freezes rows and moments a step skips (``torch.optim.SparseAdam``'s rule, cheaper, not AdamW)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optimizer.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.sparse_row_semantics not in ROW_SEMANTICS:
            raise ValueError(f"optimizer.sparse_row_semantics must be one of {list(ROW_SEMANTICS)}, "
                             f"got {self.sparse_row_semantics!r}")
        self.groups = {name: config_from(GroupSettings, s, f"optimizer.groups.{name}") for name, s in self.groups.items()}
