"""The house plan, checked: every import of the package (module-level and function-local) points to the same or
an earlier layer of the pipeline, no module imports one of a later layer, the import graph has no cycle, and model
code imports no data code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "miadpo"
# Layers in pipeline order: a module may import its own layer and the ones above it, never one below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("miadpo", "miadpo.config", "miadpo.text", "miadpo.fingerprint", "miadpo.locks",
                     "miadpo.lightning_setup")),
    ("models", ("miadpo.models",)),
    ("data", ("miadpo.data",)),
    ("toy scenes", ("miadpo.toyworld.scenes",)),
    ("augment", ("miadpo.augment",)),
    ("synthetic pairs", ("miadpo.toyworld.synthetic",)),
    ("select", ("miadpo.select",)),
    ("export", ("miadpo.export",)),
    ("dpo", ("miadpo.dpo",)),
    ("eval", ("miadpo.eval",)),
    ("toy error classes", ("miadpo.toyworld.errors",)),
    ("pipeline and entry points", ("miadpo.resume", "miadpo.pipeline", "miadpo.train", "miadpo.evaluate", "miadpo.sft",
                                   "miadpo.merge",
                                   "miadpo.rounds", "miadpo.sweep", "miadpo.generate", "miadpo.toyworld",
                                   "miadpo.models.verify", "miadpo.augment.__main__", "miadpo.select.__main__")),
]
# Model code may use only these (no pair records, images, datasets or stages).
MODEL_MAY_IMPORT = ("miadpo.config", "miadpo.text", "miadpo.models.templates", "miadpo.fingerprint", "miadpo.models")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The index of the most specific layer prefix matching ``module``."""
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of tests/test_imports.py: place it"
    return max(matches)[1]


def package_imports(source: str, module: str, is_package: bool = False, local_only: bool = False) -> set[str]:
    """The package modules imported anywhere in ``source`` (the text of ``module``), functions included;
    ``local_only``: only the imports inside a function."""
    tree = ast.parse(source)
    nodes = ast.walk(tree)
    if local_only:
        functions = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nodes = (n for f in functions for n in ast.walk(f))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("miadpo")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.startswith("miadpo"):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return found - {module}


def imports_of(module: str, local_only: bool = False) -> set[str]:
    path = MODULES[module]
    return package_imports(path.read_text(), module, path.name == "__init__.py", local_only)


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_import_points_to_a_later_pipeline_layer() -> None:
    backward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
                for m, targets in GRAPH.items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not backward, "\n".join(backward)


def test_the_import_graph_has_no_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            assert state.get(target) != 1, "import cycle: " + " → ".join([*path, module, target])
            if target in GRAPH and state.get(target) != 2:
                visit(target, [*path, module])
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [])


def test_model_code_imports_no_data_code() -> None:
    models = [m for m in MODULES if layer_of(m) == layer_of("miadpo.models")]
    bad = [f"{m} imports {t}" for m in models for t in sorted(GRAPH[m])
           if not any(t == p or t.startswith(p + ".") for p in MODEL_MAY_IMPORT)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_backward_and_local_imports(tmp_path: Path) -> None:
    """The walk finds imports inside functions and in package __init__ files (the rules cannot pass vacuously)."""
    assert "miadpo.pipeline" in GRAPH["miadpo.train"]  # module level
    local = "def load():\n    from miadpo.models.internlm_xc25.checkpoint import load_model\n"
    assert package_imports(local, "miadpo.merge", local_only=True) == {"miadpo.models.internlm_xc25.checkpoint"}
    assert "miadpo.augment.runner" in GRAPH["miadpo.augment"]  # a package __init__
    assert layer_of("miadpo.select.stage") > layer_of("miadpo.augment.runner")


def test_no_function_local_import_of_package_code() -> None:
    """Every package import is at module level, where the layer and cycle checks above see the real graph: no
    import is hidden in a function to break a cycle (heavy optional dependencies are third-party, not ours)."""
    local = {m: sorted(imports_of(m, local_only=True)) for m in MODULES}
    assert not {m: t for m, t in local.items() if t}


def modules_in(text: str) -> set[str]:
    """``"base (the interface), tiny"`` → {"base", "tiny"}: the first word of each comma-separated item."""
    return {item.split()[0] for item in text.split(",") if item.strip()}


def readme_layout() -> dict[str, set[str]]:
    """The README's Layout block: each entry under ``miadpo/`` → the names listed for it (a package's modules).

    An entry line is indented two spaces: its names (``x.py``, ``pkg/``; several entry points share a line), then
    two or more spaces and the description — for a package, its modules, continued on deeper-indented lines."""
    block = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    listed: dict[str, set[str]] = {}
    package = None
    for line in block.splitlines():
        if line.startswith("    "):  # a package's description, continued
            if package:
                listed[package] |= modules_in(line)
        elif line.startswith("  "):
            names, description = (re.split(r"\s{2,}", line.strip(), maxsplit=1) + [""])[:2]
            package = None
            for name in names.split():
                listed[name] = set()
                if name.endswith("/"):
                    package = name
                    listed[name] = modules_in(description)
        else:
            package = None
    return listed


def test_the_readme_layout_matches_the_tree() -> None:
    """Every module and package of miadpo/ is in the README's Layout, every listed one exists, and a package's
    listed modules are exactly its files."""
    listed = readme_layout()
    top = {p.name + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()
           if p.name != "__pycache__" and (p.is_dir() or p.suffix == ".py")}
    assert set(listed) == top
    for entry, names in listed.items():
        if entry.endswith("/"):
            directory = PACKAGE / entry
            actual = {p.stem for p in directory.glob("*.py") if p.stem != "__init__"}
            actual |= {p.name + "/" for p in directory.iterdir() if p.is_dir() and p.name != "__pycache__"}
            assert names == actual, f"README Layout, {entry}: lists {sorted(names)}, the tree has {sorted(actual)}"


FORMAT_NAMES = {"sequence", "grid", "pip", "single", "refusal"}
FORMAT_MODULES = {"miadpo.augment.registry", "miadpo.augment.formats"}


def format_name_comparisons(source: str) -> list[int]:
    """Lines comparing a value with a format name (``fmt == "grid"``, ``fmt in ("sequence", "single")``)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = [c for o in operands for c in ([o] if isinstance(o, ast.Constant) else getattr(o, "elts", []))]
            if any(isinstance(c, ast.Constant) and c.value in FORMAT_NAMES for c in names):
                lines.append(node.lineno)
    return lines


def test_no_code_compares_format_names_outside_the_format_modules() -> None:
    """A stage asks the format registry (``miadpo.augment.registry``) what a format does; it never branches on a
    format's name."""
    found = {name: lines for name, path in MODULES.items() if name not in FORMAT_MODULES
             and (lines := format_name_comparisons(path.read_text()))}
    assert found == {}
    assert format_name_comparisons('if job.format in ("sequence", "single"):\n    pass') == [1]


def test_every_entry_runs_on_a_read_only_config() -> None:
    """Each Hydra entry goes on with ``read_only(cfg)`` once the config is composed: no stage writes into it (each
    returns what it makes; ``tests/test_train.py`` shows a write stopping)."""
    entries = [path for path in PACKAGE.rglob("*.py") if "@hydra.main" in path.read_text()]
    assert len(entries) >= 7
    without = [str(p.relative_to(REPO)) for p in entries if "cfg = read_only(" not in p.read_text()]
    assert without == []
