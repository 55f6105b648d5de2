"""AdamW parameter groups (OLMo2 recipe, REFERENCES.md §1.4): matrices decay; lookup tables (``nn.Embedding``), norm
weights and biases do not. A module can claim its parameters for a named group (``nn.hooks.optimizer_group``;
Over-Encoding's tables do), whose ``lr_multiplier`` and ``weight_decay`` come from ``OptimizerConfig.groups``.
Every trainable parameter lands in exactly one group, which is asserted, so none silently goes untrained.
"""

from __future__ import annotations

from torch import nn

from lit_overtok.nn import hooks
from lit_overtok.optim.config import GroupSettings, OptimizerConfig


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
        group = hooks.optimizer_group(module)
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
