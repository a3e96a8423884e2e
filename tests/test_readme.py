"""The README's layout section names what the tree holds: every path it names exists, and every module at the top of
the package and every sub-package is named."""

from .test_layering import PACKAGE_DIR

ROOT = PACKAGE_DIR.parent


def layout_paths() -> list[str]:
    """The paths of the first column of the README's layout block (`a, b` names two)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout\n", 1)[1].split("```\n", 2)[1]
    paths = []
    for line in block.splitlines():
        if not line.strip() or line.startswith(" "):
            continue
        words = line.split()
        names = [words.pop(0)]
        while names[-1].endswith(","):
            names.append(words.pop(0))
        names = [name.rstrip(",") for name in names]
        directory = names[0].rpartition("/")[0]
        paths += [name if "/" in name or not directory else f"{directory}/{name}" for name in names]
    return paths


def test_every_path_the_layout_names_exists():
    paths = layout_paths()
    assert "regionmed_clip/experiments/" in paths and "lock.in" not in paths
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert missing == []


def test_the_layout_names_every_sub_package_and_top_level_module():
    paths = set(layout_paths())
    packages = {f"regionmed_clip/{init.parent.name}/" for init in PACKAGE_DIR.glob("*/__init__.py")}
    modules = {f"regionmed_clip/{module.name}" for module in PACKAGE_DIR.glob("*.py")}
    assert sorted((packages | modules) - paths) == []
