"""The package's layout holds: no import circle, layers that never point upward, small modules, old paths deprecated.

The import graph is read from the source with ``ast`` (module-level and function-level imports
alike, ``importlib.import_module("...")`` with a literal too; only ``if TYPE_CHECKING:`` blocks are
left out, since they never run). Importing ``a.b.c`` also runs the packages ``a.b`` and ``a``, so an
edge goes to every package above the target that the importer is not itself inside.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fsserve._moved import MOVED

REPO = Path(__file__).resolve().parents[1]
# package name -> folder, as pyproject.toml installs them
ROOTS = {"fsserve": "fsserve", "fsserve.kernels": "kernels", "fsserve.exporters": "exporters"}
TORCH_FAMILY = {"torch", "transformers", "peft", "sentence_transformers", "triton", "accelerate"}
MAX_LINES = 400
GENERATED = ("fsserve/serving/protos/grpc_predict_v2_pb2",)  # protoc output, rebuilt by `make protos`


@dataclass
class ImportGraph:
    """fsserve's modules, the fsserve modules each one imports, and the outside packages it imports."""

    files: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)
    outside: dict[str, set[str]] = field(default_factory=dict)

    def reachable(self, start: str) -> set[str]:
        """Every module that importing ``start`` may import, itself included."""
        seen, todo = {start}, [start]
        while todo:
            for nxt in self.edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def cycles(self) -> list[list[str]]:
        """One concrete cycle (a → b → … → a) per strongly connected component of two or more modules."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        components: list[list[str]] = []

        def visit(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for nxt in sorted(self.edges[node]):
                if nxt not in index:
                    visit(nxt)
                    low[node] = min(low[node], low[nxt])
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    components.append(component)

        for node in sorted(self.edges):
            if node not in index:
                visit(node)
        return [self._cycle_in(set(c)) for c in components]

    def _cycle_in(self, component: set[str]) -> list[str]:
        """A shortest path from the component's first module back to itself, inside the component."""
        start = min(component)
        paths = {start: [start]}
        todo = [start]
        while todo:
            node = todo.pop(0)
            for nxt in sorted(self.edges[node] & component):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    todo.append(nxt)
        raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a component always has one


def _module_files(repo: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the installed folders."""
    files = {}
    for package, folder in ROOTS.items():
        for path in sorted((repo / folder).rglob("*.py")):
            parts = list(path.relative_to(repo / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names the module imports anywhere (``from a import b`` gives ``a`` and ``a.b``)."""
    names: list[str] = []

    def walk(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                walk(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)
        for child in ast.iter_child_nodes(node):
            walk(child)

    walk(tree)
    return names


def build_graph(repo: Path = REPO) -> ImportGraph:
    """Parse every module of the checkout at ``repo`` into its import graph."""
    graph = ImportGraph(_module_files(repo))
    for module, path in graph.files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        outside: set[str] = set()
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            if name != "fsserve" and not name.startswith("fsserve."):
                outside.add(name.split(".")[0])
                continue
            while name and name not in graph.files:
                name = name.rpartition(".")[0]
            # the target and every package above it that ``module`` is not inside (those already ran)
            while name and not (module == name or module.startswith(name + ".")):
                targets.add(name)
                name = name.rpartition(".")[0]
        graph.edges[module] = targets
        graph.outside[module] = outside
    return graph


def layer_violations(graph: ImportGraph) -> list[str]:
    """Every broken layer rule, each naming the modules involved (empty when the layers hold)."""
    problems = []
    for start in ("fsserve.bundle", "fsserve.runtime.onnx"):
        for module in sorted(graph.reachable(start)):
            heavy = graph.outside[module] & TORCH_FAMILY
            if heavy:
                problems.append(f"{start} must not import torch, but reaches {module}, which imports {sorted(heavy)}")
    rules = [("fsserve.kernels", "fsserve.serving", "kernels never import serving"),
             ("fsserve.serving", "fsserve.training", "serving never imports training"),
             ("fsserve.exporters", "fsserve.modeling", "exporters take the model as an argument, never import modeling")]
    for lower, upper, rule in rules:
        for module in sorted(m for m in graph.files if m == lower or m.startswith(lower + ".")):
            bad = sorted(m for m in graph.reachable(module) if m == upper or m.startswith(upper + "."))
            if bad:
                problems.append(f"{rule}: {module} reaches {bad[0]}")
    for module in sorted(graph.files):
        if module.startswith(("fsserve.cli", "fsserve.__main__")):
            continue
        bad = sorted(m for m in graph.edges[module] if m == "fsserve.cli" or m.startswith("fsserve.cli."))
        if bad:
            problems.append(f"the library never imports the CLI: {module} imports {bad[0]}")
    return problems


def _copy_tree(tmp_path: Path) -> Path:
    """A scratch copy of the installed folders, to plant bugs in."""
    for folder in ROOTS.values():
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _plant(copy: Path, relative: str, line: str) -> None:
    """Add a function whose body is ``line`` to one module of the copy."""
    path = copy / relative
    path.write_text(path.read_text(encoding="utf-8") + f"\n\ndef _planted() -> None:\n    {line}\n", encoding="utf-8")


# -- the rules on this checkout ---------------------------------------------------------------
def test_no_import_cycle_among_fsserve_modules() -> None:
    graph = build_graph()
    assert len(graph.files) > 60, "the walk found too few modules: is the layout where ROOTS says?"
    assert graph.cycles() == [], "import cycles: " + "; ".join(" → ".join(c) for c in graph.cycles())


def test_layers_never_point_upward() -> None:
    assert layer_violations(build_graph()) == []


def test_no_module_is_over_400_lines() -> None:
    long = {m: n for m, p in build_graph().files.items()
            if not p.relative_to(REPO).as_posix().startswith(GENERATED) and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines hold two ideas: split them"


def test_the_graph_sees_function_level_imports_and_packages_above_the_target() -> None:
    graph = build_graph()
    # predictor imports the model only inside a function, for the torch backend
    assert "fsserve.modeling" in graph.edges["fsserve.predictor"]
    # importing fsserve.demos.index runs fsserve/demos/__init__.py first
    assert {"fsserve.demos.index", "fsserve.demos"} <= graph.edges["fsserve.predictor"]
    assert "torch" in graph.outside["fsserve.modeling"] and "torch" not in graph.outside["fsserve.bundle"]


# -- the checker fails on planted bugs -------------------------------------------------------
def test_a_planted_cycle_is_found_and_named(tmp_path: Path) -> None:
    copy = _copy_tree(tmp_path)
    _plant(copy, "fsserve/bundle.py", "from fsserve.predictor import Predictor  # noqa: F401")
    cycles = build_graph(copy).cycles()
    assert len(cycles) == 1
    cycle = cycles[0]
    assert cycle[0] == cycle[-1] and {"fsserve.bundle", "fsserve.predictor"} <= set(cycle)


@pytest.mark.parametrize(("relative", "line", "expected"), [
    ("fsserve/runtime/onnx.py", "import torch  # noqa: F401", "fsserve.runtime.onnx must not import torch"),
    ("fsserve/bundle.py", "from fsserve.demos.encoder import load_encoder  # noqa: F401", "fsserve.bundle must not import torch"),
    ("kernels/label_logits.py", "from fsserve.serving import DynamicBatcher  # noqa: F401", "kernels never import serving"),
    ("fsserve/serving/batcher.py", "import fsserve.training  # noqa: F401", "serving never imports training"),
    ("exporters/onnx.py", "from fsserve.modeling import PromptModel  # noqa: F401", "never import modeling"),
    ("fsserve/data.py", "from fsserve.cli.args import task_and_data  # noqa: F401", "the library never imports the CLI"),
])
def test_a_planted_layer_violation_is_named(tmp_path: Path, relative: str, line: str, expected: str) -> None:
    copy = _copy_tree(tmp_path)
    _plant(copy, relative, line)
    problems = layer_violations(build_graph(copy))
    assert any(expected in p for p in problems), problems


def test_type_checking_imports_are_not_edges(tmp_path: Path) -> None:
    copy = _copy_tree(tmp_path)
    path = copy / "fsserve/bundle.py"
    path.write_text(path.read_text(encoding="utf-8") + "\nif TYPE_CHECKING:\n    import torch\n", encoding="utf-8")
    assert layer_violations(build_graph(copy)) == []


# -- the public face is unchanged ------------------------------------------------------------
def test_public_names_resolve() -> None:
    import fsserve
    import fsserve.prompts

    for name in fsserve.__all__:
        assert getattr(fsserve, name) is not None
    for name in ("Encoded", "Part", "Prompt", "Template", "decoder_template", "example_texts", "parse_label_words"):
        assert hasattr(fsserve.prompts, name)
    import fsserve.bench
    import fsserve.demos
    import fsserve.experiment
    import fsserve.search

    for package in (fsserve.search, fsserve.experiment, fsserve.bench, fsserve.demos):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_warn_and_give_the_same_objects(old: str) -> None:
    import importlib

    new = MOVED[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    target = importlib.import_module(new)
    public = [name for name in vars(target) if not name.startswith("_")]
    assert public and all(getattr(module, name) is getattr(target, name) for name in public)
    sys.modules.pop(old, None)


def test_unknown_modules_are_still_unknown() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ModuleNotFoundError):
            __import__("fsserve.no_such_module")


def test_python_dash_m_fsserve_is_the_command() -> None:
    result = subprocess.run([sys.executable, "-m", "fsserve", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("train", "eval", "predict", "export", "serve", "client", "search", "experiment", "bench", "compare"):
        assert command in result.stdout
