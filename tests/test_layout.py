"""The package's imports go one way: no module imports, however indirectly, one that imports it.

Every module's imports are read from its source (inside functions too, relative imports
resolved; ``if TYPE_CHECKING:`` blocks, which never run, are left out). An import names the
module it loads (``from a.b import c`` names ``a.b.c`` where that is a module, else ``a.b``);
the packages Python initialises on the way (``a``) are not counted, since a package is always
initialised before its modules run.
"""

import ast
from pathlib import Path

import emcid

PACKAGE = Path(emcid.__file__).resolve().parent
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (each module named with its packages)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        if target in modules:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:  # from a.b import c: c may be a module
                    add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imported(p, modules) for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_walk_sees_imports_inside_functions_and_relative_ones():
    graph = _graph()
    assert "emcid.core.bundle" in graph["emcid.core.loading"]  # from .bundle import ...
    assert "emcid.tasks.debias" in graph["emcid"]  # inside edit(): from .tasks.debias import ...
    assert "emcid.editors.emcid.stage1.engine" in graph["emcid.editors.emcid.stage1.objective"]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_longer_than_400_lines():
    long = {_module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}



def test_old_import_paths_still_work():
    """Deprecated re-exports, kept for one release (README, Changelog)."""
    from emcid.debias import DebiasRequest, debias, load_debias_requests
    from emcid.editors.emcid.stage1 import ConceptTarget, Stage1Config, compute_targets, compute_z
    from emcid.editors.emcid.stage2 import Stage2Config, compute_deltas
    from emcid.lora import LoraExportError, export_lora
    from emcid.models import HISTORY_DIR, ModelBundle, detect_family, load_model
    from emcid.patch import DeltaWeight, EditPatch, base_weights, revert_last, save_pipeline
    from emcid.requests import ARTIST_PROMPTS, OBJECT_PROMPTS, EditRequest, subject_positions
    from emcid.tasks import generic_destination, resolve_erase

    assert DebiasRequest and debias and load_debias_requests and ConceptTarget and Stage1Config
    assert compute_targets and compute_z and Stage2Config and compute_deltas and export_lora
    assert HISTORY_DIR and ModelBundle and detect_family and load_model and DeltaWeight
    assert EditPatch and base_weights and revert_last and save_pipeline and ARTIST_PROMPTS
    assert OBJECT_PROMPTS and EditRequest and subject_positions and generic_destination
    assert resolve_erase and issubclass(LoraExportError, emcid.EmcidError)


def test_each_layer_imports_only_the_layers_below_it():
    """core <- requests <- editors / patch <- tasks <- cli / bench / mini: no upward import."""
    above = {"emcid.core": ("emcid.requests", "emcid.editors", "emcid.patch", "emcid.tasks"),
             "emcid.requests": ("emcid.editors", "emcid.patch", "emcid.tasks"),
             "emcid.editors": ("emcid.tasks", "emcid.cli", "emcid.bench"),
             "emcid.patch": ("emcid.tasks", "emcid.cli", "emcid.bench")}
    upward = sorted((module, imported) for module, imports in _graph().items()
                    for layer, forbidden in above.items() if module.startswith(layer + ".")
                    for imported in imports if imported.startswith(forbidden))
    assert upward == []
