"""The package's shape: no import cycles inside ``lit_overtok`` (late imports and TYPE_CHECKING imports included),
imports flowing from the Lightning pieces down to ``nn``, and the task files shipped as package data."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_overtok"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> dict[str, set[str]]:
    """``{module: modules of lit_overtok it imports}``, from every import statement anywhere in the file.

    Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` and ``a``: those count too, unless the importer lives
    inside them (then they are already being imported, not a new edge).
    """
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
                found = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in found:
                if target in modules:
                    targets.add(target)
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        for target in list(targets):
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and parent not in own_packages:
                    targets.add(parent)
        targets.discard(name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycles():
    cycle = find_cycle(package_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_late_import_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


# The rooms of the package, lowest first: a module imports only from its own room or from lower ones, so the
# architecture reads bottom up (the shared helpers at the root, the network, then what trains, scores and studies it,
# then the command line). A new room must be placed here.
ROOM_RANKS = {
    "": 0,  # the root's shared helpers: errors, configuration
    "nn": 1,
    "data": 2, "optim": 2, "export": 2,
    "checkpointing": 3,
    "evaluation": 4, "distributed": 4,
    "training": 5,
    "studies": 6,
    "cli": 7,
    "__main__": 8,
}
ROOT_MODULES = {"lit_overtok", "lit_overtok.__main__", "lit_overtok.errors", "lit_overtok.configuration"}


def room_of(module: str) -> str:
    """The room (sub-package) a module lives in; "" for the root's helpers, "__main__" for ``python -m lit_overtok``."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        return parts[1]
    return "__main__" if parts[-1] == "__main__" else ""


def test_every_room_is_ranked_and_the_root_holds_only_shared_helpers():
    modules = package_imports()
    assert {room_of(m) for m in modules} <= set(ROOM_RANKS), "place the new room in ROOM_RANKS"
    assert {m for m in modules if room_of(m) in ("", "__main__")} <= ROOT_MODULES, (
        "the package root keeps only the shared helpers; put the module in the room that owns its concern")


def test_imports_flow_down_the_rooms():
    wrong = [f"{module} ({room_of(module) or 'root'}) imports {target} ({room_of(target) or 'root'})"
             for module, targets in package_imports().items() for target in sorted(targets)
             if room_of(target) != room_of(module) and ROOM_RANKS[room_of(target)] >= ROOM_RANKS[room_of(module)]]
    assert not wrong, wrong


def test_the_room_check_catches_an_upward_import(monkeypatch):
    graph = {"lit_overtok.nn.transformer": {"lit_overtok.training.lightning_module"},
             "lit_overtok.training.lightning_module": set()}
    monkeypatch.setattr(__import__(__name__), "package_imports", lambda: graph)
    with pytest.raises(AssertionError, match="nn.transformer"):
        test_imports_flow_down_the_rooms()


def test_modules_moved_into_rooms_keep_their_old_names():
    """Configs, checkpoints and scripts written before the rooms name classes by their old modules."""
    import importlib

    from lit_overtok import MOVED_MODULES
    for old, new in MOVED_MODULES.items():
        assert importlib.import_module(old) is importlib.import_module(new)
    from lit_overtok.lightning_module import OverTokLM
    from lit_overtok.training.lightning_module import OverTokLM as moved
    assert OverTokLM is moved


def test_lm_eval_task_files_live_in_the_package():
    tasks = PACKAGE / "evaluation" / "tasks"
    assert {p.name for p in (tasks / "local").glob("*.yaml")} >= {"cfg_generation.yaml", "mmlu_var.yaml"}
    assert (tasks / "offline" / "mmlu_continuation" / "_continuation_template_yaml").is_file()


HOOK_NAMES = ("training_metrics", "parameter_metrics", "optimizer_group", "counts_as_embedding",
              "inactive_parameter_count", "clip_grad_norm_", "clip_grad_value_", "init_own_parameters",
              "global_shape")


def test_module_hooks_are_reached_only_through_nn_hooks():
    """Nothing outside ``nn/hooks.py`` probes for a hook by name (``hasattr``/``getattr``): hooks are declared once."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "nn" / "hooks.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in HOOK_NAMES):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders
