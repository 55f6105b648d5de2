"""Dict -> config dataclass conversion (``config_from``), the one for YAML sections, CLI values and checkpoints.

Every config dataclass (``ModelConfig``, ``OverEncodingConfig``, ``MoEConfig``, ``MultiTokenConfig``,
``OptimizerConfig``...) reaches us either as an instance or as a dict: jsonargparse hands nested sections over as
dicts where a field is typed loosely, and checkpoints store hyperparameters as plain dicts so that loading them
unpickles none of our classes. ``config_from`` is the one place that converts, and an unknown key is an error that
names its config path and the valid fields (a misspelt ``d_modle`` must not be silently dropped).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def config_from(cls: type[ConfigT], value: Any, path: str) -> ConfigT:
    """``value`` as a ``cls`` instance: returned as is when it is one, built from its fields when it is a mapping.

    ``path`` is where the value sits in the user's config (``model_config.over_encoding``), for error messages.
    """
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{path} must be a mapping of {cls.__name__} fields, got {type(value).__name__}")
    valid = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(valid))
    if unknown:
        raise ValueError(f"{path}: unknown field{'s' if len(unknown) > 1 else ''} {unknown}; valid fields are {valid}")
    try:
        return cls(**value)
    except TypeError as error:  # a required field is missing
        raise ValueError(f"{path}: {error}; valid fields are {valid}") from None
