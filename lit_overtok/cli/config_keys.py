"""Checking ``train.py``'s config keys (command line and YAML) before jsonargparse: one-line errors, field help.

jsonargparse reports a misspelt key under a subclass-mode argument (``--model.init_args.model_config.d_modle``, or
the same in a ``--config`` file) inside ~20 lines of union-type errors, and cannot show help below ``--model.help``.
This module walks the same schema itself (the ``Trainer``'s, the model's and the data module's signatures, and the
config dataclasses below them) before jsonargparse parses:

* ``check_keys``: an unknown key is one ``ValueError`` naming it, the nearest valid name and where to list them;
  a top-level ``optimizer`` / ``lr_scheduler`` other than null is refused (the model's ``OptimizerConfig`` owns
  AdamW's parameter groups, the sparse Over-Encoding rows and the schedule: LightningCLI's would silently replace
  them; ``OverTokCLI`` refuses them again after parsing, whatever their source);
* ``field_help``: ``--model.init_args.model_config.help`` (any config dataclass) lists fields, types, defaults and
  their documentation (and, for ``ModelConfig``, the presets);
* ``resolve_model_config``: the parsed config with every preset field filled in, for ``--print_config`` and the
  saved ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from pathlib import Path
from typing import Any, Optional, Union

import docstring_parser
import yaml
from lightning.pytorch import Trainer

from lit_overtok.configuration import config_from
from lit_overtok.data.cfg_datamodule import CFGDataModule
from lit_overtok.data.webdataset_datamodule import WebDatasetDataModule
from lit_overtok.training.lightning_module import OverTokLM
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.presets import PRESETS

ROOTS = {"trainer": Trainer, "model": OverTokLM, "data": CFGDataModule}
KNOWN_CLASSES = {cls.__name__: cls for cls in (OverTokLM, CFGDataModule, WebDatasetDataModule)}
# LightningCLI's optimizer and scheduler arguments stay in the parser, so that configs saved by earlier versions
# (``optimizer: null``) still run, but anything other than null is refused.
REFUSED_ROOTS = ("optimizer", "lr_scheduler")
OPTIMIZER_MESSAGE = ("the optimizer belongs to the model: set model.init_args.optimizer (OptimizerConfig: AdamW, its "
                     "parameter groups, the sparse Over-Encoding rows and the warmup-cosine schedule), e.g. "
                     "--model.init_args.optimizer.lr 3e-4; list its fields with --model.init_args.optimizer.help")
RENAMED_MESSAGE = ("the model's architecture is configured under model.init_args.model_config (renamed from "
                   "model.init_args.model); e.g. --model.init_args.model_config.preset cfg-small")


def _unwrap(annotation: Any) -> Any:
    """``Optional[X]`` -> ``X``; anything else as is."""
    if typing.get_origin(annotation) is Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def fields_of(target: Any) -> Optional[dict[str, Any]]:
    """``{name: type}`` of a config dataclass's fields or a class's ``__init__`` parameters; None if not a class."""
    if not inspect.isclass(target):
        return None
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target)
        return {f.name: _unwrap(hints.get(f.name, Any)) for f in dataclasses.fields(target)}
    params = inspect.signature(target.__init__).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None  # a class taking **kwargs accepts any key
    hints = typing.get_type_hints(target.__init__)
    return {p.name: _unwrap(hints.get(p.name, Any)) for p in params if p.name != "self" and p.kind != p.VAR_POSITIONAL}


def resolve_class(name: Any, default: type) -> Optional[type]:
    """The class a ``class_path`` names (a dotted path or one of ours by name); None when it cannot be told."""
    if not isinstance(name, str):
        return default
    if name in KNOWN_CLASSES:
        return KNOWN_CLASSES[name]
    module, _, attr = name.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[attr]), attr) if module else None
    except (ImportError, AttributeError):
        return None  # jsonargparse says what is wrong with the class path itself


def _suggestion(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""


def _noun(target: type) -> str:
    return "field" if dataclasses.is_dataclass(target) else "argument"


def _help_option(root: str, path: str, target: type) -> str:
    if dataclasses.is_dataclass(target):
        return f"--{path}.help"
    return "train.py fit --help" if root == "trainer" else f"--{root}.help {target.__name__}"


def check_path(parts: list[str], root_classes: dict[str, Optional[type]], where: str) -> Optional[type]:
    """Walk ``model.init_args.model_config.d_model`` through the schema; raise on the first unknown key.

    Returns the config class the path ends in (for ``.help``), else None.
    """
    if not parts:
        return None
    head, rest = parts[0], parts[1:]
    if head not in root_classes:
        return None  # top-level options (seed_everything, ckpt_path, ...) are jsonargparse's own
    if head == "model" and (rest[:1] == ["model"] or rest[:2] == ["init_args", "model"]):
        raise ValueError(f"{where}: {RENAMED_MESSAGE}")
    target, path = root_classes[head], head
    if rest[:1] == ["init_args"]:
        rest, path = rest[1:], f"{head}.init_args"
    for i, part in enumerate(rest):
        if part in ("help", "class_path", "dict_kwargs") or target is None:
            return target if part == "help" and i == len(rest) - 1 and dataclasses.is_dataclass(target) else None
        fields = fields_of(target)
        if fields is None:
            return None  # a list, a dict or a plain value below: nothing more to check
        if part not in fields:
            raise ValueError(f"{where}: {target.__name__} has no {_noun(target)} '{part}'"
                             + ("" if where.startswith("--") else f" (at {path}.{part})")
                             + f"; {_suggestion(part, list(fields))}list them with {_help_option(head, path, target)}")
        target, path = fields[part], f"{path}.{part}"
    return None


def _walk_mapping(value: Any, parts: list[str], root_classes: dict[str, Optional[type]], where: str) -> None:
    """Check every key path of a mapping (a --config file, or a JSON/YAML value given on the command line)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not parts and key in REFUSED_ROOTS and item is not None:
                raise ValueError(f"{where}: {key}: {OPTIMIZER_MESSAGE}")
            check_path(parts + [str(key)], root_classes, where)
            _walk_mapping(item, parts + [str(key)], root_classes, where)


def _class_choices(args: list[str], files: list[dict]) -> dict[str, Optional[type]]:
    """The class of each root group, as the config files and the command line choose it."""
    chosen: dict[str, Optional[type]] = dict(ROOTS)
    for config in files:
        for root in ("model", "data"):
            section = config.get(root) if isinstance(config, dict) else None
            if isinstance(section, dict) and "class_path" in section:
                chosen[root] = resolve_class(section["class_path"], ROOTS[root])
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if key in ("--model", "--data", "--model.class_path", "--data.class_path"):
            value = value or (args[i + 1] if i + 1 < len(args) else None)
            if value is not None and not value.endswith((".yaml", ".yml", ".json")):
                chosen[key[2:].split(".")[0]] = resolve_class(value, ROOTS[key[2:].split(".")[0]])
    return chosen


def check_keys(args: list[str]) -> Optional[tuple[type, str]]:
    """Raise a one-line ValueError for an unknown or refused key in ``args`` or the ``--config`` files they name.

    Returns ``(config class, option)`` when the arguments ask for a config dataclass's ``.help``, else None.
    """
    files: list[tuple[str, dict]] = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args) or arg.startswith("--config="):
            given = arg.split("=", 1)[1] if "=" in arg else args[i + 1]
            path = Path(given)
            if not path.is_file() and not any(mark in given for mark in ":{\n"):  # else inline YAML, jsonargparse's
                raise FileNotFoundError(f"--config {given}: no such file (a YAML config, e.g. a run's config.yaml)")
            loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
            if path.is_file() and not isinstance(loaded, dict):
                what = "empty" if loaded is None else f"a YAML {type(loaded).__name__}"
                raise ValueError(f"--config {given} is {what}, not a mapping of trainer / model / data settings "
                                 "(a run's config.yaml is one)")
            files.append((str(path), loaded if isinstance(loaded, dict) else {}))
    roots = _class_choices(args, [config for _, config in files])
    for where, config in files:
        _walk_mapping(config, [], roots, where)
    for i, arg in enumerate(args):
        if not arg.startswith("--") or arg.startswith("--config"):
            continue
        key, has_value, value = arg.partition("=")
        parts = [part.rstrip("+") for part in key[2:].split(".")]  # `--trainer.callbacks+=` appends
        if not has_value and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
        if parts[0] in REFUSED_ROOTS and (len(parts) > 1 or value.strip().lower() not in ("null", "none", "")):
            raise ValueError(f"{key}: {OPTIMIZER_MESSAGE}")
        help_target = check_path(parts, roots, key)
        if help_target is not None:
            return help_target, key
        if value.lstrip().startswith("{"):  # a JSON/YAML mapping for a config field
            try:
                mapping = yaml.safe_load(value)
            except yaml.YAMLError:
                continue  # jsonargparse reports malformed values
            _walk_mapping(mapping, parts, roots, key)
    return None


def _type_name(annotation: Any) -> str:
    if inspect.isclass(annotation) and typing.get_origin(annotation) is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("lit_overtok.", "")


def field_help(cls: type, option: str) -> str:
    """The fields of a config dataclass: name, type, default and documentation (and ModelConfig's presets)."""
    doc = docstring_parser.parse_from_object(cls)
    described = {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}
    hints = typing.get_type_hints(cls)
    prefix = option[2:].rsplit(".", 1)[0]
    summary = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())  # the first paragraph, on one line
    lines = [f"{cls.__name__} ({prefix}): {summary}".rstrip(), ""]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        kind = _type_name(hints.get(f.name))
        lines.append(f"  --{prefix}.{f.name}  ({kind}, default: {default})")
        nested = _unwrap(hints.get(f.name))
        more = f" Its fields: --{prefix}.{f.name}.help" if dataclasses.is_dataclass(nested) else ""
        if described.get(f.name) or more:
            lines.append(f"      {described.get(f.name, '')}{more}".rstrip())
    if cls is ModelConfig:
        lines += ["", "Presets (fields left null take the preset's value; a field given explicitly wins):"]
        lines += [f"  {name}: " + ", ".join(f"{k}={v}" for k, v in shape.items()) for name, shape in PRESETS.items()]
    return "\n".join(lines) + "\n"


def resolve_model_config(config: Any) -> Any:
    """A copy of a parsed config (jsonargparse Namespace) whose ``model.init_args.model_config`` has every preset
    field filled in; unchanged when it has none. The resolved config builds the same model as the one given."""
    key = "model.init_args.model_config"
    targets = [key] + ([f"{config.subcommand}.{key}"] if config.get("subcommand") else [])
    config = config.clone()
    for target in targets:
        if target not in config:
            continue
        node = config[target]
        given = {} if node is None else _plain(node)
        resolved = dataclasses.asdict(config_from(ModelConfig, given, "model_config"))
        config[target] = _fill(node, ModelConfig, resolved)
    return config


def _plain(node: Any) -> Any:
    """jsonargparse's ``Namespace(class_path=..., init_args=...)`` of a config dataclass as a plain dict of fields."""
    if hasattr(node, "as_dict"):
        node = node.as_dict()
    if isinstance(node, dict):
        node = node.get("init_args", node) if "class_path" in node else node
        return {k: _plain(v) for k, v in node.items() if not k.startswith("__")}
    return node


def _fill(node: Any, cls: type, values: dict[str, Any], wrapped: bool = True) -> Any:
    """``node`` (jsonargparse's namespace for a ``cls`` value, or None) holding ``values``, nested configs alike.

    jsonargparse keeps a config dataclass either as ``Namespace(class_path=..., init_args=fields)`` (as parsed) or
    as the fields themselves (while instantiating); a node made here takes its parent's form.
    """
    from jsonargparse import Namespace

    if node is None:
        node = Namespace(class_path=f"{cls.__module__}.{cls.__qualname__}", init_args=Namespace()) if wrapped else (
            Namespace())
    wrapped = "class_path" in node
    fields = node.init_args if wrapped else node
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        kind = _unwrap(hints.get(name))
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = _fill(fields.get(name), kind, value, wrapped)
        fields[name] = value
    return node
