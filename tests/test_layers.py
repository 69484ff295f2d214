"""The layer rule: a module imports only from its own layer or the ones below it.

classes, files, paths, crop, images, errors (leaf) -> config -> data -> engine -> stages -> predictors -> CLI (and the package's API). Every import counts,
the ones inside functions too: a lazy import upwards is still a dependency upwards.
"""

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: layer of every module of ours; a new module must be placed here (the test says so)
LAYERS = {
    "leaf": [
        "ensemble.errors",
        "ensemble.classes",
        "ensemble.files",
        "ensemble.paths",
        "ensemble.crop",
        "ensemble.images",
    ],
    "config": ["ensemble.config", "ensemble.metrics", "ensemble.combine"],
    "data": [
        "ensemble.data",
        "ensemble.synthetic",
        "ensemble.prepare",
        "ensemble.detect",
        "ensemble.mtcnn",
        "ensemble.blazeface",
        "ensemble.artifacts",
        "ensemble.statefile",
        "ensemble.meta_schema",
    ],
    "engine": [
        "ensemble.engine",
        "ensemble.runtime",
        "ensemble.batches",
        "ensemble.feature_cache",
        "ensemble.checkpoints",
        "ensemble.tasks",
        "ensemble.locks",
        "ensemble.experiment",
    ],
    "stages": [
        "stages",
        "stages.backbones",
        "stages.neural",
        "stages.stage1",
        "stages.flat",
        "stages.neighborhoods",
        "stages.experts",
    ],
    "predictors": [
        "ensemble.router",
        "ensemble.predictors",
        "ensemble.onnx_runtime",
        "ensemble.quantize",
        "ensemble.calibration",
        "ensemble.routing",
        "ensemble.reports",
        "ensemble.export",
        "ensemble.bundle",
        "ensemble.api",
        "ensemble.tracking",
        "ensemble.video",
        "ensemble.video_report",
    ],
    "cli": [
        "ensemble",
        "ensemble.cli",
        "ensemble.__main__",
        "ensemble.commands",
        "ensemble.demo",
        "ensemble.summary",
        "ensemble.tune",
        "ensemble.video_cli",
    ],
}
ORDER = list(LAYERS)
LAYER_OF = {m: ORDER.index(layer) for layer, mods in LAYERS.items() for m in mods}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _our_modules() -> list[str]:
    files = sorted((REPO / "ensemble").glob("*.py")) + sorted((REPO / "stages").glob("*.py"))
    return [_module_name(p) for p in files]


def _imports(module: str) -> set[str]:
    """Our modules that ``module`` imports anywhere in its body (relative imports resolved)."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = REPO / module.replace(".", "/") / "__init__.py"
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            # ``from . import detect`` imports the module ensemble.detect, not the package's own code
            names = [f"{base}.{a.name}" for a in node.names] + ([base] if node.module else [])
        else:
            continue
        for name in names:
            while name and name not in LAYER_OF:
                name = name.rpartition(".")[0]
            if name and name != module and name.split(".")[0] in ("ensemble", "stages"):
                found.add(name)
    return found


def test_every_module_has_a_layer():
    missing = [m for m in _our_modules() if m not in LAYER_OF]
    assert not missing, f"place these modules in a layer in tests/test_layers.py: {missing}"


@pytest.mark.parametrize("module", _our_modules())
def test_no_module_imports_a_layer_above_its_own(module):
    if module != "ensemble.__main__":  # (importing that one runs the CLI)
        importlib.import_module(module)  # it imports on its own
    above = sorted(m for m in _imports(module) if LAYER_OF[m] > LAYER_OF[module])
    assert not above, f"{module} (layer {ORDER[LAYER_OF[module]]}) imports " + ", ".join(
        f"{m} (layer {ORDER[LAYER_OF[m]]})" for m in above
    )


def test_no_import_cycle():
    graph = {m: _imports(m) for m in _our_modules()}
    for m in graph:  # a package's __init__ importing its own modules is not a cycle
        graph[m] = {d for d in graph[m] if not (d.startswith(m + ".") or m.startswith(d + "."))}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m) :] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_leaf_and_config_load_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, ensemble.config; print(sorted(m for m in ('pandas', 'PIL', 'torch', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    # the engine importing a stage is exactly what the rule forbids; the parser must see it
    fake = REPO / "ensemble" / "engine.py"
    text = fake.read_text()
    assert "stages" not in {m.split(".")[0] for m in _imports("ensemble.engine")}
    monkeypatch.setattr(Path, "read_text", lambda self: text + "\ndef f():\n    from stages.backbones import x\n")
    assert "stages.backbones" in _imports("ensemble.engine")
