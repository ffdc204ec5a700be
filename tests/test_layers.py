"""The layers of ARCHITECTURE.md, checked: every module imports only from its own layer or
the layers below (lazy imports inside functions included), so the import graph has one
direction."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> installed package (pyproject's package-dir)
SOURCES = {"tide_local": "tide_local", "converters": "tide_local.converters", "tui": "tide_local.tui"}

# bottom to top; a unit is tide_local.<first name> (converters and tui as installed)
LAYERS = [
    ("foundations", {"errors", "units", "progress", "paths"}),
    ("formats and compute", {"ggml", "gguf", "architecture"}),
    ("files, tokens, decoding", {"modelfile", "tokenizer", "chat_template", "diffusion", "results", "converters", "demo", "demo_tasks"}),
    ("the forward", {"model"}),
    ("where experts run", {"experts"}),
    ("the planner (pure)", {"planner"}),
    ("the engine", {"engine", "batching"}),
    ("tools on the engine", {"calibration", "bench", "generate_cli", "info", "tui", "devices_cli", "pull_cli", "serve"}),
    ("the command", {"cli", "__main__"}),
]
LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts == ["tide_local"]:
        return "engine"  # `import tide_local` is for tide_local.load: the facade of the engine
    return parts[1] if len(parts) > 1 and parts[0] == "tide_local" else None


def _module_of(path: Path) -> str:
    for folder, package in SOURCES.items():
        base = ROOT / folder
        if base in path.parents:
            rel = path.relative_to(base).with_suffix("").parts
            rel = rel[:-1] if rel[-1] == "__init__" else rel
            return ".".join((package, *rel))
    raise AssertionError(path)


def _imports(path: Path, module: str):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "tide_local":  # `from tide_local import ggml` imports the submodule
                yield from (f"tide_local.{a.name}" for a in node.names if a.name in LAYER_OF)
            else:
                yield name


def test_every_unit_has_a_layer():
    units = {_unit(_module_of(p)) for folder in SOURCES for p in (ROOT / folder).rglob("*.py")}
    assert units - {None} <= set(LAYER_OF), sorted(units - {None} - set(LAYER_OF))


def test_imports_go_down_the_layers_only():
    upward = []
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            module = _module_of(path)
            mine = _unit(module)
            if mine is None:
                continue  # the package facade re-exports lazily from the layers
            for name in _imports(path, module):
                theirs = _unit(name)
                if theirs is not None and LAYER_OF[theirs] > LAYER_OF[mine]:
                    upward.append(f"{path.relative_to(ROOT)} ({LAYERS[LAYER_OF[mine]][0]}) imports {name} "
                                  f"({LAYERS[LAYER_OF[theirs]][0]})")
    assert not upward, "\n".join(upward)


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    """The check itself: a model module importing the engine is reported."""
    bad = ROOT / "tide_local" / "model" / "_layer_probe.py"
    bad.write_text("def f():\n    from tide_local.engine import load\n")
    try:
        try:
            test_imports_go_down_the_layers_only()
        except AssertionError as err:
            assert "_layer_probe.py (the forward) imports tide_local.engine" in str(err)
        else:
            raise AssertionError("the upward import was not reported")
    finally:
        bad.unlink()
