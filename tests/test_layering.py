"""The package's import graph holds its intended layers.

Imports are read from the source (AST), at module level and inside functions alike, so an import hidden in a
function body counts as much as one at the top of a file. The rules:

- no import cycles between modules;
- the remote-code unit (the files `save_pretrained` copies next to the weights) imports only its own files, the
  standard library, torch, transformers, numpy, PIL and their hard dependencies (an optional import guarded by
  `except ImportError`, such as pydicom for DICOM files, is allowed);
- the layers of `LAYERS`, lowest first: a module imports from its own sub-package and from lower layers only, never
  from a higher layer, and sub-packages of one layer (`training`, `evaluation`, `annotation`) do not import each
  other. So `data` imports nothing of `training`, `evaluation`, `hub`, the experiments or the CLI; `hub` may import
  `data`, `training` and `evaluation`;
- only `cli` registers commands: nothing outside it imports argparse.
"""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

import regionmed_clip

PACKAGE_DIR = Path(regionmed_clip.__file__).parent
REMOTE_CODE_ROOTS = ("torch", "transformers", "numpy", "pillow")


def module_name(path: Path, root: Path, package: str) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def imports_of(path: Path, name: str, is_package: bool, modules: set[str] = frozenset()) -> set[str]:
    """Every module `path` imports, anywhere in the file, as absolute names (see `import_targets`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return import_targets(ast.walk(tree), name, is_package, modules)


def import_targets(nodes, name: str, is_package: bool, modules: set[str] = frozenset()) -> set[str]:
    """The modules the import statements among `nodes` of module `name` import, as absolute names. `from p import
    x` is the submodule `p.x` where `modules` has one (as when `x` is a file of the package), else the module
    `p`."""
    base = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.add(submodule if submodule in modules else module)
    return found


def _files(root: Path, package: str) -> dict[str, Path]:
    return {module_name(path, root, package): path for path in sorted(root.rglob("*.py"))}


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module → the package's own modules it imports."""
    files = _files(root, package)
    return {
        name: {
            target
            for target in imports_of(path, name, path.name == "__init__.py", set(files))
            if target in files and target != name
        }
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (`[a, b, ..., a]`), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


#: The package's layers, lowest first. Layer 0 is the package's own top-level modules: the remote-code unit, the
#: package `__init__` that registers it with the Auto classes, and `convert` (checkpoints → a model folder).
LAYERS = (
    ("",),
    ("data",),
    ("training", "evaluation", "annotation"),
    ("hub",),
    ("experiments",),
    ("cli",),
)


def layer_violations(root: Path, package: str, layers=LAYERS) -> list[str]:
    """What breaks the layer rules: an import from a higher layer, an import between two sub-packages of one
    layer, a sub-package `layers` does not place, and argparse imported outside `cli`."""
    rank = {name: index for index, layer in enumerate(layers) for name in layer}
    problems = []
    files = _files(root, package)
    subpackages = {
        path.relative_to(root).parts[0] for path in files.values() if len(path.relative_to(root).parts) > 1
    }
    for module, path in files.items():
        source = _sub_package(module, subpackages)
        if source not in rank:
            problems.append(f"{module} is in no layer: add {package}.{source} to LAYERS")
            continue
        targets = imports_of(path, module, path.name == "__init__.py", set(files))
        if source != "cli" and "argparse" in targets:
            problems.append(f"{module} imports argparse: commands belong in {package}.cli")
        for target in sorted(t for t in targets if _in(t, package)):
            other = _sub_package(target, subpackages)
            if other == source or other not in rank:
                continue
            if rank[other] > rank[source]:
                problems.append(f"{module} imports {target}, a higher layer")
            elif rank[other] == rank[source]:
                problems.append(f"{module} imports {target}, a sub-package of its own layer")
    return problems


def _sub_package(module: str, subpackages: set[str]) -> str:
    """The sub-package `module` belongs to ("" for the package's top-level modules)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in subpackages else ""


def remote_code_files() -> set[Path]:
    """The files `save_pretrained` copies: the modules of the classes registered for an auto class, with their
    relative imports (transformers' own rule), and any flat `*_regionmed_clip.py` file, the unit's naming rule."""
    exported = (getattr(regionmed_clip, name) for name in regionmed_clip.__all__)
    modules = {
        Path(sys.modules[obj.__module__].__file__)
        for obj in exported
        if isinstance(obj, type) and getattr(obj, "_auto_class", None)
    }
    modules |= set(PACKAGE_DIR.glob("*_regionmed_clip.py"))
    files = set(modules)
    for module in modules:
        files.update(Path(path) for path in get_relative_import_files(str(module)))
    return files


def hard_dependencies(distributions: tuple[str, ...]) -> set[str]:
    """The distributions named and everything they require without an extra, transitively (normalised names)."""

    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    seen, todo = set(), [normal(name) for name in distributions]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in requirements:
            if "extra ==" not in requirement:
                todo.append(normal(re.match(r"[A-Za-z0-9_.-]+", requirement).group()))
    return seen


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_package_has_no_import_cycles():
    assert find_cycle(import_graph(PACKAGE_DIR, "regionmed_clip")) is None


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A synthetic package under `root`: relative file path → source."""
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source)
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    package = write_package(
        tmp_path / "synthetic",
        {
            "__init__.py": "",
            "a.py": "from .sub import b\n",
            "sub/__init__.py": "",
            "sub/b.py": "def helper():\n    from ..a import value\n    return value\n",
            "c.py": "from . import a\n",
        },
    )
    graph = import_graph(package, "synthetic")
    assert graph["synthetic.c"] == {"synthetic.a"}
    assert find_cycle(graph) == ["synthetic.a", "synthetic.sub.b", "synthetic.a"]
    (package / "sub" / "b.py").write_text("def helper():\n    return 1\n")
    assert find_cycle(import_graph(package, "synthetic")) is None


def optional_imports(tree: ast.AST) -> set[ast.AST]:
    """Imports inside a `try` that handles ImportError: optional features (pydicom for DICOM files) that fail with
    a message naming the extra to install, never at import time."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(handler.type, ast.Name) and handler.type.id in ("ImportError", "ModuleNotFoundError")
            for handler in node.handlers
        ):
            found.update(
                inner
                for statement in node.body
                for inner in ast.walk(statement)
                if isinstance(inner, ast.Import | ast.ImportFrom)
            )
    return found


def test_the_remote_code_unit_imports_only_torch_transformers_numpy_pil_and_itself():
    files = remote_code_files()
    names = {path.name for path in files}
    assert {
        "configuration_regionmed_clip.py",
        "modeling_regionmed_clip.py",
        "image_processing_regionmed_clip.py",
        "processing_regionmed_clip.py",
    } <= names
    allowed = hard_dependencies(REMOTE_CODE_ROOTS)
    distributions = importlib.metadata.packages_distributions()
    for path in files:
        assert path.parent == PACKAGE_DIR, f"{path} is not flat: remote code is copied by file name"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        optional = optional_imports(tree)
        for node in ast.walk(tree):
            if node in optional:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in names, (
                    f"{path.name} imports .{node.module}, which is not a flat file of the remote-code unit"
                )
                continue
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names:
                    continue
                owners = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(top, [top])}
                assert owners & allowed, (
                    f"{path.name} imports {module}, outside torch / transformers / numpy / PIL"
                )


def test_no_module_imports_a_higher_layer_or_a_peer_and_only_cli_registers_commands():
    assert layer_violations(PACKAGE_DIR, "regionmed_clip") == []


def test_the_layer_rules_catch_each_violation(tmp_path):
    package = write_package(
        tmp_path / "synthetic",
        {
            "__init__.py": "",
            "convert.py": "",
            "data/__init__.py": "",
            "data/folder.py": "def front_matter():\n    from ..hub import card\n",
            "training/__init__.py": "",
            "training/run.py": "from ..data import folder\n",
            "evaluation/__init__.py": "",
            "evaluation/ablation.py": "def run():\n    from ..training import run\n",
            "annotation/__init__.py": "from .. import convert\n",
            "hub/__init__.py": "",
            "hub/card.py": "from ..training import run\nfrom ..data import folder\n",
            "hub/publish.py": "def add_command(subparsers):\n    import argparse\n",
            "experiments/__init__.py": "from ..hub import card\n",
            "cli/__init__.py": "import argparse\nfrom ..experiments import demo\n",
            "scripts/__init__.py": "",
        },
    )
    assert layer_violations(package, "synthetic") == [
        "synthetic.data.folder imports synthetic.hub.card, a higher layer",
        "synthetic.evaluation.ablation imports synthetic.training.run, a sub-package of its own layer",
        "synthetic.hub.publish imports argparse: commands belong in synthetic.cli",
        "synthetic.scripts is in no layer: add synthetic.scripts to LAYERS",
    ]
