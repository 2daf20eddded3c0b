"""The shape the user's design card asks for."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from conftest import REPO


def test_top_level_has_the_design_cards_layout():
    for name in ("pyproject.toml", "README.md", "loop", "server", "tests", "models", "Makefile", ".ci/run"):
        assert (REPO / name).exists(), name


def test_pyproject_declares_the_distribution_packages_and_console_script():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "isara"
    assert meta["project"]["scripts"]["isara"] == "loop.cli:main"
    assert set(meta["tool"]["setuptools"]["packages"]) == {
        "loop", "loop.bench", "loop.cli", "loop.evaluation", "loop.export", "loop.generation", "loop.models",
        "loop.training", "server"}
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


def test_the_product_never_imports_the_bench_and_each_bench_module_says_what_it_measures():
    for path in (REPO / "loop").rglob("*.py"):
        if path.is_relative_to(REPO / "loop" / "bench") or path.is_relative_to(REPO / "loop" / "cli"):
            # `isara bench` is a command
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n == "loop.bench" or n.startswith("loop.bench.") for n in names), path.name
    for path in (REPO / "loop" / "bench").glob("*.py"):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no docstring"


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


def test_the_configuration_reference_page_matches_the_schema():
    from loop.config import reference_markdown

    assert reference_markdown() in (REPO / "docs" / "configuration.md").read_text()


def test_every_example_configuration_is_valid_under_the_schema():
    from loop.config import load_config

    examples = sorted((REPO / "examples").glob("*.toml"))
    assert {p.name for p in examples} >= {"quick.toml", "safety.toml", "safety-quick.toml", "safety-reference.toml",
                                          "safety-full.toml"}
    for path in examples:
        load_config(path)  # an unknown or mistyped key raises


def test_iteration_folders_past_99_parse_and_sort_by_number(tmp_path):
    from loop.layout import RunLayout, iteration_name, parse_iteration, phase_iteration

    assert iteration_name(7) == "iter-07" and iteration_name(100) == "iter-100"
    assert [parse_iteration(n) for n in ("iter-07", "iter-100", "iter-7", "iter-x", "iters-10")] == [7, 100, None,
                                                                                                    None, None]
    assert phase_iteration("iter-100/train") == (100, "train")
    assert phase_iteration("baselines/sft-seeds/train") == (None, "train")
    layout = RunLayout(tmp_path)
    for t in (100, 11, 2):
        layout.iteration(t).mkdir()
    (tmp_path / "iter-notes").mkdir()
    assert layout.iterations_on_disk() == [2, 11, 100]


def test_run_state_lists_iterations_by_number(tmp_path):
    from loop.state import RunState

    state = RunState(tmp_path)
    for phase in ("iter-100/generate", "iter-11/generate", "iter-11/export", "iter-100/export",
                  "baselines/sft-seeds/export", "seeds"):
        state.finish(phase, [])
    assert RunState(tmp_path).iterations() == [11, 100]
    assert RunState(tmp_path).exported_iterations() == [11, 100]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_module_of_loop_or_server_imports_itself_through_a_circle():
    modules = {}
    for package in ("loop", "server"):
        for path in (REPO / package).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            modules[name] = path
    graph = {m: {n for n in _imports(p) if n in modules and n != m} for m, p in modules.items()}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    circles = [m for m in graph if reaches(m, m)]
    assert circles == [], f"import circles through {circles}"


# The parts of the house, top to bottom. A module imports modules of its own part and of the parts below it, never
# of a part above: the face and the plan use the steps; the steps use the records, models/ and server/; models/
# uses no step package (and none of the records but the files), server/ nothing of loop/.
PARTS = {
    "the face": ("loop.cli", "loop.dashboard", "loop.status", "loop.doctor", "loop.fit", "loop.bench"),
    "the plan": ("loop.run", "loop.phases", "loop.prepare", "loop.serving", "loop.draws", "loop.domains",
                 "loop.targets"),
    "the steps": ("loop.generation", "loop.training", "loop.evaluation", "loop.export"),
    "the records": ("loop.config", "loop.layout", "loop.state", "loop.events", "loop.data"),
    "models": ("loop.models",),
    "files": ("loop.files", "loop"),  # `loop` itself: its version
    "server": ("server",),
}
STEPS = PARTS["the steps"]


def _modules() -> dict[str, Path]:
    modules = {}
    for package in ("loop", "server"):
        for path in (REPO / package).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return modules


def _owner(module: str, units) -> str:
    """The longest entry of `units` that is `module` or a package holding it."""
    return max((u for u in units if module == u or module.startswith(u + ".")), key=len)


def _edges() -> set[tuple[str, str]]:
    """(importer, imported) over every import of loop/ and server/, function-level ones included."""
    modules = _modules()
    edges = set()
    for m, path in modules.items():
        for name in _imports(path):
            if name in modules and name != m:
                edges.add((m, name))
    return edges


def test_every_module_of_loop_belongs_to_one_part_of_the_house():
    # `loop` holds every module: it stands for itself (its version) alone, not for a module nobody placed.
    units = [u for part in PARTS.values() for u in part if u != "loop"]
    for m in _modules():
        assert m == "loop" or any(m == u or m.startswith(u + ".") for u in units), f"{m} is in no part of PARTS: place it"


def test_each_part_imports_only_its_own_and_the_parts_below_it():
    units = {u: rank for rank, part in enumerate(PARTS.values()) for u in part}
    names = list(PARTS)
    for importer, imported in _edges():
        a, b = units[_owner(importer, units)], units[_owner(imported, units)]
        assert a <= b, f"{importer} ({names[a]}) imports {imported} ({names[b]}), a part above it"


def test_the_packages_and_top_modules_import_each_other_without_a_circle():
    """Packages taken whole (loop.generation, loop.models, ...), the spine's modules one by one."""
    top = [m for m in _modules() if m.count(".") == 1]
    units = [*(u for part in PARTS.values() for u in part if u != "loop"), *top]
    unit = lambda m: _owner(m, units) if m != "loop" else "loop"  # noqa: E731
    graph: dict[str, set[str]] = {}
    for importer, imported in _edges():
        if unit(importer) != unit(imported):
            graph.setdefault(unit(importer), set()).add(unit(imported))

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    circles = sorted(u for u in graph if reaches(u, u))
    assert circles == [], f"circles between packages through {circles}"


def test_models_uses_no_step_package():
    for importer, imported in _edges():
        if importer.startswith("loop.models"):
            assert not imported.startswith(tuple(f"{s}" for s in STEPS)), f"{importer} imports {imported}"


def test_only_the_layout_and_state_modules_know_the_run_folders_names():
    # Everyone else asks RunLayout for paths and RunState for state.json, so a name changes in one place.
    for path in (REPO / "loop").rglob("*.py"):
        if path.name in ("layout.py", "state.py"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert "state.json" not in node.value, f"{path.name} names state.json: {node.value!r}"
                assert not node.value.startswith("iter-"), f"{path.name} spells an iteration folder: {node.value!r}"
