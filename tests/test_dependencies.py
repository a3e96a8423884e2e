"""Declared dependencies match imports: every third-party import of a module is declared by the extra that module
belongs to (core / train / eval / demo / annotate / dicom), so `pip install 'regionmed-clip[eval]'` is enough to
run the evaluation.

Imports are read from the source (AST). A module needs what it imports anywhere in its file, plus what the
package's own modules it imports at module level need at import time (transitively, parent packages included).
An import inside a `try` that handles ImportError is an optional feature: the extra its error message names
(`pip install 'regionmed-clip[dicom]'`) must declare it. Import names map to distributions through
`importlib.metadata.packages_distributions()`; a name no installed distribution provides is reported as well.
"""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

from .test_layering import PACKAGE_DIR, _files, _in, import_targets, optional_imports, write_package

ROOT = PACKAGE_DIR.parent
PACKAGE = "regionmed_clip"
# Which extras a module needs (core is part of every one); the longest matching prefix wins.
EXTRAS_OF = {
    PACKAGE: (),
    f"{PACKAGE}.annotation": ("annotate",),
    f"{PACKAGE}.training": ("train",),
    f"{PACKAGE}.data": ("train",),
    f"{PACKAGE}.evaluation": ("eval",),
    f"{PACKAGE}.experiments": ("train", "eval"),
}
# The Gradio app of the Space, outside the package: what the `demo` extra (and demo/requirements.txt) installs.
APP = ROOT / "demo" / "app.py"


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_extras(distribution: str = "regionmed-clip") -> dict[str, set[str]]:
    """Extra → the distributions it declares, with the core dependencies and the extras it names
    (`regionmed-clip[train]`) folded in; `core` is the dependencies alone. Read from the installed metadata, which
    `make install` builds from pyproject.toml."""
    own = normal(distribution)
    core, raw = set(), {}
    for requirement in importlib.metadata.requires(distribution) or []:
        match = re.match(
            r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?[^;]*(?:;\s*extra\s*==\s*\"([^\"]+)\")?", requirement
        )
        name, extras, extra = normal(match.group(1)), match.group(2), match.group(3)
        entry = (name, [e.strip() for e in (extras or "").split(",") if e.strip()])
        if extra is None:
            core.add(name)
        else:
            raw.setdefault(extra, []).append(entry)

    def closure(extra: str, seen: frozenset = frozenset()) -> set[str]:
        found = set(core)
        for name, extras in raw[extra]:
            if name != own:
                found.add(name)
            for inner in extras if name == own else ():
                if inner not in seen:
                    found |= closure(inner, seen | {extra})
        return found

    return {"core": core, **{extra: closure(extra) for extra in raw}}


def extras_of(module: str, table: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    matches = [prefix for prefix in table if _in(module, prefix)]
    return table[max(matches, key=len)] if matches else ()


def _top_level_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not inside a function body."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            todo.append(child)
    return found


def _third_party(nodes, package: str) -> set[str]:
    """The top-level names of what `nodes` import from outside the standard library and `package`."""
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name != package}


def _with_parents(modules: set[str], files: dict[str, Path]) -> set[str]:
    """Importing `a.b.c` runs `a` and `a.b` first."""
    return {
        ".".join(parts[:i])
        for parts in (module.split(".") for module in modules if module in files)
        for i in range(1, len(parts) + 1)
        if ".".join(parts[:i]) in files
    }


def _distributions() -> dict[str, set[str]]:
    return {
        name: {normal(dist) for dist in dists}
        for name, dists in importlib.metadata.packages_distributions().items()
    }


def undeclared_imports(
    root: Path,
    package: str,
    table: dict[str, tuple[str, ...]],
    declared: dict[str, set[str]],
    extra_files: dict[Path, tuple[str, ...]] | None = None,
) -> list[str]:
    """Every import of the package under `root` (and of `extra_files`, each with its extras) that the extras it
    belongs to do not declare, as readable lines; empty when all are declared."""
    files = _files(root, package)
    distributions = _distributions()
    trees = {
        name: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for name, path in files.items()
    }
    cache: dict[str, set[str]] = {}

    def run_at_import(name: str, tree: ast.AST, is_package: bool) -> tuple[set[str], set[str]]:
        """(third-party names, package modules) that importing the module runs, optional imports left out."""
        optional = optional_imports(tree)
        nodes = [node for node in _top_level_imports(tree) if node not in optional]
        targets = _with_parents(import_targets(nodes, name, is_package, set(files)), files) - {name}
        return _third_party(nodes, package), targets

    def needed_at_import(name: str, seen: frozenset = frozenset()) -> set[str]:
        if name not in cache:
            direct, targets = run_at_import(name, trees[name], files[name].name == "__init__.py")
            for target in targets - seen:
                direct |= needed_at_import(target, seen | {name})
            cache[name] = direct
        return cache[name]

    def check(where: str, tree: ast.AST, module: str, is_package: bool, extras: tuple[str, ...]) -> list[str]:
        allowed = set().union(declared["core"], *(declared[extra] for extra in extras))
        label = " + ".join(("core", *extras))
        optional = optional_imports(tree)
        required = [
            n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and n not in optional
        ]
        needed = _third_party(required, package)
        for target in run_at_import(module, tree, is_package)[1]:
            needed |= needed_at_import(target)
        problems = []
        for name in sorted(needed):
            provided = distributions.get(name)
            if not provided:
                problems.append(f"{where} imports {name}, which no installed distribution provides")
            elif not provided & allowed:
                problems.append(
                    f"{where} imports {name} ({', '.join(sorted(provided))}), not declared by {label}"
                )
        named = set(re.findall(r"regionmed-clip\[(\w+)\]", ast.unparse(tree))) if optional else set()
        for name in sorted(_third_party(optional, package)):
            if distributions.get(name, set()) & allowed:
                continue  # a fallback between releases of a declared dependency
            if not named:
                problems.append(f"{where}: the optional import of {name} names no extra to install")
            elif not any(distributions.get(name, set()) & declared.get(extra, set()) for extra in named):
                problems.append(f"{where}: optional {name} is declared by none of {sorted(named)}")
        return problems

    problems = []
    for name, path in sorted(files.items()):
        problems += check(name, trees[name], name, path.name == "__init__.py", extras_of(name, table))
    for path, extras in (extra_files or {}).items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        problems += check(path.name, tree, f"{package}.__app__", False, extras)
    return problems


DECLARED = declared_extras()


def test_every_import_of_the_package_and_the_app_is_declared_by_its_extra():
    assert undeclared_imports(PACKAGE_DIR, PACKAGE, EXTRAS_OF, DECLARED, {APP: ("demo",)}) == []


def test_an_undeclared_import_is_found_at_any_depth(tmp_path):
    package = write_package(
        tmp_path / "synthetic",
        {
            "__init__.py": "import torch\n",
            "plain.py": "import numpy\n\n\ndef late():\n    import packaging\n",
            "sub/__init__.py": "",
            "sub/trained.py": "from accelerate import Accelerator\n",
            "user.py": "from .sub import trained\n",
            "optional.py": "def read():\n    try:\n        import pydicom\n    except ImportError as error:\n"
            "        raise ImportError(\"pip install 'regionmed-clip[eval]'\") from error\n",
        },
    )
    table = {"synthetic": (), "synthetic.sub": ("train",)}
    problems = undeclared_imports(package, "synthetic", table, DECLARED)
    # packaging is installed (transformers requires it) but declared by no extra of this package.
    assert any(
        p.startswith("synthetic.plain imports packaging") and "not declared by core" in p for p in problems
    )
    # A core module importing a `train` module at import time needs accelerate; the train module itself is fine.
    assert any(p.startswith("synthetic.user imports accelerate") for p in problems)
    assert not any(p.startswith("synthetic.sub.trained") for p in problems)
    assert any("optional pydicom is declared by none of ['eval']" in p for p in problems)
    assert len(problems) == 3, problems
    (package / "plain.py").write_text("import not_a_distribution_anywhere\n")
    problems = undeclared_imports(package, "synthetic", table, DECLARED)
    assert (
        "synthetic.plain imports not_a_distribution_anywhere, which no installed distribution provides"
        in problems
    )


def test_extras_fold_in_core_and_the_extras_they_name():
    assert {"torch", "transformers", "httpx2"} <= DECLARED["core"]
    assert {"accelerate", "peft", "datasets"} <= DECLARED["train"]
    assert DECLARED["train"] <= DECLARED["annotate"]
    assert "evaluate" not in set().union(*DECLARED.values())


def test_the_lock_pins_every_declared_requirement_by_version_alone():
    """requirements/lock.txt holds `name==version` lines only (no path or URL of the machine that resolved it, so
    it installs from any checkout), and pins every distribution the `dev` extra declares, torch excepted (its
    build comes from TORCH_SPEC)."""
    lines = [
        line.split("#")[0].strip()
        for line in (ROOT / "requirements" / "lock.txt").read_text(encoding="utf-8").splitlines()
    ]
    pins = [line for line in lines if line]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", pin) for pin in pins), pins
    locked = {normal(pin.split("==")[0]) for pin in pins}
    assert DECLARED["dev"] - {"torch"} <= locked, sorted(DECLARED["dev"] - {"torch"} - locked)
    assert "torch" not in locked and normal(PACKAGE) not in locked
