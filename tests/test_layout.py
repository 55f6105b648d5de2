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


@pytest.mark.parametrize("layer, forbidden", [
    ("lit_overtok.nn", ("lit_overtok.data", "lit_overtok.evaluation", "lit_overtok.optim", "lit_overtok.lightning_module",
                        "lit_overtok.cli", "lit_overtok.callbacks")),
    ("lit_overtok.data", ("lit_overtok.evaluation", "lit_overtok.optim", "lit_overtok.lightning_module", "lit_overtok.cli")),
    ("lit_overtok.evaluation", ("lit_overtok.lightning_module", "lit_overtok.cli", "lit_overtok.optim")),
])
def test_imports_flow_from_the_lightning_pieces_down_to_nn(layer, forbidden):
    for module, targets in package_imports().items():
        if module == layer or module.startswith(layer + "."):
            wrong = sorted(t for t in targets if t.startswith(forbidden))
            assert not wrong, f"{module} imports {wrong}"


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
