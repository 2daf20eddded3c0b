"""The shape the user's design card asks for."""

from __future__ import annotations

import ast
import tomllib

from conftest import REPO


def test_top_level_has_the_design_cards_layout():
    for name in ("pyproject.toml", "README.md", "loop", "server", "tests", "models", "Makefile", ".ci/run"):
        assert (REPO / name).exists(), name


def test_pyproject_declares_the_distribution_packages_and_console_script():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "isara"
    assert meta["project"]["scripts"]["isara"] == "loop.cli:main"
    assert set(meta["tool"]["setuptools"]["packages"]) == {"loop", "server"}
    assert "llama-cpp-python[server]==0.3.36" in meta["project"]["dependencies"]


def test_server_never_imports_loop():
    for path in (REPO / "server").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name != "loop" and not name.startswith("loop."), f"{path.name} imports {name}"


def test_toolchain_module_needs_only_the_standard_library():
    # `make setup` runs it on a bare Python before any dependency is installed.
    tree = ast.parse((REPO / "server" / "toolchain.py").read_text())
    third_party = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            third_party |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            third_party.add(node.module.split(".")[0])
    import sys
    assert third_party - set(sys.stdlib_module_names) - {"server", "__future__"} == set()


def test_readme_configuration_table_matches_the_schema():
    from loop.config import reference_markdown

    assert reference_markdown() in (REPO / "README.md").read_text()
