"""The house plan, checked: every import of the package (module-level and function-local) points to the same or
an earlier layer of the pipeline, no module imports one of a later layer, the import graph has no cycle, and model
code imports no data code."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "miadpo"
# Layers in pipeline order: a module may import its own layer and the ones above it, never one below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("miadpo", "miadpo.config", "miadpo.text", "miadpo.jsonl", "miadpo.locks", "miadpo.fingerprint",
                     "miadpo.templates", "miadpo.lightning_setup")),
    ("pair record and images", ("miadpo.images", "miadpo.pairs")),
    ("models", ("miadpo.models",)),
    ("export", ("miadpo.export",)),
    ("data sources", ("miadpo.toyworld.scenes",)),
    ("augment", ("miadpo.augment",)),
    ("synthetic pairs", ("miadpo.synthetic",)),
    ("select", ("miadpo.select",)),
    ("DPO batch", ("miadpo.batch",)),
    ("training data", ("miadpo.datamodule", "miadpo.data_report")),
    ("pair forward", ("miadpo.pair_forward",)),
    ("losses", ("miadpo.losses",)),
    ("reference cache", ("miadpo.reference_cache",)),
    ("DPO module", ("miadpo.module", "miadpo.callbacks")),
    ("entry points and recipes", ("miadpo.evaluate", "miadpo.sft", "miadpo.merge", "miadpo.rounds", "miadpo.sweep",
                                  "miadpo.generate", "miadpo.toyworld", "miadpo.train", "miadpo.models.verify",
                                  "miadpo.augment.__main__", "miadpo.select.__main__")),
]
# Model code may use only these (no pair records, images, datasets or stages).
MODEL_MAY_IMPORT = ("miadpo.config", "miadpo.text", "miadpo.templates", "miadpo.fingerprint", "miadpo.models")


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


def imports_of(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its file (functions included)."""
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("miadpo")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.startswith("miadpo"):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return found - {module}


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
    assert "miadpo.evaluate" in GRAPH["miadpo.train"]  # module level
    assert "miadpo.models.internlm_xc25.checkpoint" in GRAPH["miadpo.merge"]  # inside a function
    assert "miadpo.augment.runner" in GRAPH["miadpo.augment"]  # a package __init__
    assert layer_of("miadpo.select.stage") > layer_of("miadpo.augment.runner")
