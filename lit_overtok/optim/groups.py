"""AdamW parameter groups: which parameters weight decay reaches, and named groups with their own settings.

Matrices (linear layers, experts, output tables) always decay. Input lookup tables (``nn.Embedding``, and
Over-Encoding's row-sharded ``RowShardedEmbedding``, so sharding the tables does not change their decay) decay when
``OptimizerConfig.decay_embeddings`` is set, norm weights and biases when ``decay_norms_and_biases`` is: OLMo's trainer
has the same two switches (``decay_embeddings``, ``decay_norm_and_bias``; OLMo2 sets false / true, OLMoE true / true). A module can claim its parameters for a named group (``nn.hooks.optimizer_group``; Over-Encoding's
tables do), whose ``lr_multiplier`` and ``weight_decay`` come from ``OptimizerConfig.groups``; a group without its own
``weight_decay`` decays as its parameters would outside it. Every trainable parameter lands in exactly one group,
which is asserted, so none silently goes untrained.
"""

from __future__ import annotations

from torch import nn

from lit_overtok.nn import hooks
from lit_overtok.nn.sharded_table import RowShardedEmbedding
from lit_overtok.optim.config import GroupSettings, OptimizerConfig


def _decays(module: nn.Module, name: str, param: nn.Parameter, config: OptimizerConfig) -> bool:
    """Whether weight decay reaches ``param`` by the general rules (a named group may say otherwise)."""
    if isinstance(module, (nn.Embedding, RowShardedEmbedding)):  # input lookup tables, whole or row-sharded
        return config.decay_embeddings
    if param.ndim < 2 or name.endswith("bias"):
        return config.decay_norms_and_biases
    return True


def parameter_groups(model: nn.Module, config: OptimizerConfig) -> list[dict]:
    """Torch param-group dicts with ``name``, ``params``, ``weight_decay`` and ``lr_multiplier``."""
    claimed: dict[int, str] = {}
    for module in model.modules():
        group = hooks.optimizer_group(module)
        if group is not None:
            for param in module.parameters():
                claimed.setdefault(id(param), group)
    buckets: dict[str, list[nn.Parameter]] = {}
    rules: dict[str, set[bool]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            decays = _decays(module, name, param, config)
            group = claimed.get(id(param), "decay" if decays else "no_decay")
            buckets.setdefault(group, []).append(param)
            rules.setdefault(group, set()).add(decays)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert seen == trainable, "parameter grouping missed some trainable parameters"
    groups = []
    for name, params in buckets.items():
        settings = config.groups.get(name, GroupSettings())
        weight_decay = settings.weight_decay
        if weight_decay is None:
            if len(rules[name]) > 1:
                raise ValueError(f"optimizer.groups.{name}.weight_decay: the group holds parameters the general rules "
                                 "decay and parameters they do not; give the group's weight_decay")
            weight_decay = config.weight_decay if rules[name] == {True} else 0.0
        groups.append({"name": name, "params": params, "weight_decay": weight_decay,
                       "lr_multiplier": settings.lr_multiplier, "lr": config.lr * settings.lr_multiplier})
    return groups
