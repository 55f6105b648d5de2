"""``OptimizerConfig``: AdamW's settings, which parameters weight decay reaches, the schedule's settings, and the
settings of named parameter groups.

The defaults suit the CPU-sized default run. The paper-scale configs give their recipes' values: OLMo2 decays norms
(and biases, of which its backbone has none) but not the embedding; OLMoE decays everything (``decay_norm_and_bias``
and ``decay_embeddings`` in OLMo's trainer; docs/training.md, "Optimizer recipes").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lit_overtok.configuration import config_from
from lit_overtok.optim.sparse_adamw import ROW_SEMANTICS


@dataclass
class GroupSettings:
    lr_multiplier: float = 1.0
    weight_decay: Optional[float] = None
    """None: the decay its parameters get outside the group (Over-Encoding's tables are lookup tables, so
    ``decay_embeddings`` decides: ``weight_decay`` or 0)."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    """Peak learning rate. The default suits the CPU-sized default run; configs give the paper's values."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay of the matrices (linear layers, experts, output tables); of the lookup tables, norms and
    biases only as the two switches below say."""
    decay_embeddings: bool = False
    """Decay the input lookup tables too (the 1-gram table; Over-Encoding's unless its group says otherwise).
    OLMo2: false; OLMoE: true."""
    decay_norms_and_biases: bool = False
    """Decay norm weights and biases too. OLMo2 and OLMoE: true; false (the usual exemption) by default."""
    warmup_steps: int = 30
    warmup_start_ratio: float = 0.0
    """Linear warmup from lr·warmup_start_ratio (OLMo's ``warmup_min_lr`` / lr: 0 in OLMo2, unset = 0.1 in OLMoE)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr·min_lr_ratio at the last step (OLMo's alpha_f)."""
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
        for name in ("min_lr_ratio", "warmup_start_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"optimizer.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.sparse_row_semantics not in ROW_SEMANTICS:
            raise ValueError(f"optimizer.sparse_row_semantics must be one of {list(ROW_SEMANTICS)}, "
                             f"got {self.sparse_row_semantics!r}")
        self.groups = {name: config_from(GroupSettings, s, f"optimizer.groups.{name}") for name, s in self.groups.items()}
        for name, settings in self.groups.items():
            if settings.weight_decay is not None and settings.weight_decay < 0:
                raise ValueError(f"optimizer.groups.{name}.weight_decay must be >= 0 or null, got {settings.weight_decay}")
