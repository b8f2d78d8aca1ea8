"""The layer order of DESIGN.md, checked on the source: parallel/nn <- models <- diffusion/checkpoints <- pipelines <-
train <- cli. Every import of a vldm_jax module (at module level or inside a function) must point down or sideways,
and no two modules may import each other, directly or round a longer circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vldm_jax"

# Level of each top-level part of the package: an import may go to the same level or a lower one.
LAYERS = {
    "errors": 0, "parallel": 0, "nn": 0, "io": 0,
    "models": 1,
    "diffusion": 2, "checkpoints": 2, "data": 2,
    "pipelines": 3, "eval": 3,
    "train": 4,
    "cli": 5, "cli_eval": 5, "cli_benchmark": 5, "": 5,  # "": the package's __init__ (the public surface)
}


def _module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _module_names()


def _target(name: str) -> str | None:
    """The vldm_jax module ``name`` refers to (a module, or the longest prefix that is one)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    """The vldm_jax modules ``module`` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "vldm_jax" or name.startswith("vldm_jax."):
                target = _target(name)
                if target is not None and target != module:
                    found.add(target)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    if part not in LAYERS:
        pytest.fail(f"{module}: vldm_jax/{part} has no layer; add it to LAYERS in tests/test_layering.py")
    return LAYERS[part]


def test_the_walk_sees_the_package():
    """The walk finds what it must (so that an empty graph cannot pass)."""
    assert "vldm_jax.models.config" in GRAPH["vldm_jax.checkpoints.load"]
    assert "vldm_jax.diffusion.guidance" in GRAPH["vldm_jax.pipelines.stages"]
    assert "vldm_jax.checkpoints.pipeline_folder" in GRAPH["vldm_jax.train.objectives"]  # a function-local import


def test_no_import_against_the_layer_order():
    back = sorted(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
                  for m, targets in GRAPH.items() for t in targets if _layer(t) > _layer(m))
    assert not back, "imports against the layer order:\n" + "\n".join(back)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_must():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("vldm_jax.models.unet") < _layer("vldm_jax.checkpoints.load") < _layer("vldm_jax.train.loop")
