"""What a module may publish to the training loop, declared in one place.

A module opts in by having the attribute or method (structural typing: nothing to inherit); the code that uses a
hook reaches it only through the functions here, so this file lists every extension point there is:

- ``training_metrics() -> {name: scalar}``: diagnostics logged as ``train/<name>`` on the steps Lightning writes
  logs (Over-Encoding table coverage, MoE expert load; a data module's counts, e.g. corrupt shards skipped, summed
  over ranks);
- ``parameter_metrics() -> {name: count}``: extra parameter counts, recorded once per fit with the run's
  hyperparameters as ``params/<name>`` (HPARAMS tab, ``hparams.yaml``);
- ``inactive_parameter_count() -> int``: parameters a token does not use (MoE experts it is not routed to), so the
  *active* counts and FLOPs per token stay honest;
- ``counts_as_embedding = True``: the module's parameters are vocabulary-sized (output tables), counted with the
  embeddings rather than the backbone (``nn.Embedding`` always is);
- ``optimizer_group = "<name>"``: the module's parameters form the named optimizer group, whose settings come from
  ``OptimizerConfig.groups`` (Over-Encoding's tables);
- an optimizer's ``clip_grad_norm_(max_norm)`` / ``clip_grad_value_(value)``: it clips its own gradients (sparse
  row gradients, which torch's clipping cannot take), and the Trainer's ``gradient_clip_val`` is routed to it;
- ``init_own_parameters(std, seed) -> [parameters]``: the module initialises these parameters itself (the row-sharded
  tables of Over-Encoding and Engram, drawn chunk by chunk of rows so that a block gets the rows of the whole table),
  from a seed the model derives from its global seed and the module's name;
- ``memory_family = "<name>"``: the module's parameters are a hashed n-gram memory table of that family ("oe",
  "ne", "engram"), reported per family by ``parameter_counts`` (``memory_tables_<family>``) so arms of equal table
  parameters can be built and checked (``nn.table_budget``);
- a parameter's ``global_shape`` (a row-sharded table's block, ``nn.sharded_table``): it holds only some rows of a
  table of that shape on this rank; counts use the whole table, and data parallelism must leave it alone (its
  gradient is already reduced by the table's own collectives).
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class PublishesTrainingMetrics(Protocol):
    def training_metrics(self) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class PublishesParameterMetrics(Protocol):
    def parameter_metrics(self) -> dict[str, int]: ...


@runtime_checkable
class HasInactiveParameters(Protocol):
    def inactive_parameter_count(self) -> int: ...


@runtime_checkable
class ClipsOwnGradients(Protocol):
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor: ...

    def clip_grad_value_(self, clip_value: float) -> None: ...


def training_metrics(root: nn.Module) -> dict[str, torch.Tensor]:
    metrics: dict[str, torch.Tensor] = {}
    for module in root.modules():
        if isinstance(module, PublishesTrainingMetrics):
            metrics.update(module.training_metrics())
    return metrics


def parameter_metrics(root: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in root.modules():
        if isinstance(module, PublishesParameterMetrics):
            counts.update(module.parameter_metrics())
    return counts


def inactive_parameter_count(root: nn.Module) -> int:
    return sum(module.inactive_parameter_count() for module in root.modules() if isinstance(module, HasInactiveParameters))


@runtime_checkable
class InitialisesOwnParameters(Protocol):
    def init_own_parameters(self, std: float, seed: int) -> list[nn.Parameter]: ...


def global_shape(param: torch.Tensor) -> Optional[tuple[int, ...]]:
    """The whole table's shape for a row-sharded block, None for any other parameter."""
    return getattr(param, "global_shape", None)


def global_numel(param: torch.Tensor) -> int:
    shape = global_shape(param)
    return param.numel() if shape is None else math.prod(shape)


def memory_table_parameters(root: nn.Module) -> dict[str, int]:
    """Parameters of the modules marked with a ``memory_family``, summed per family (whole tables, also sharded)."""
    counts: dict[str, int] = {}
    for module in root.modules():
        family = getattr(module, "memory_family", None)
        if family is not None:
            counts[family] = counts.get(family, 0) + sum(global_numel(p) for p in module.parameters())
    return counts


def is_vocabulary_sized(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or getattr(module, "counts_as_embedding", False)


def optimizer_group(module: nn.Module) -> Optional[str]:
    return getattr(module, "optimizer_group", None)
