"""prunec's imports point down the layers, form no circles, and the ONNX side needs no torch.

Layers (low to high); a module may import its own layer or a lower one, never a higher one:

0. ``prunec.errors``, ``prunec.schedules`` (compile-time method constants in plain Python)
   and ``prunec.ir`` (the graph, the torch/ONNX importers, ORT sessions): they know no
   analysis, pass or backend.
1. ``prunec.passes.analysis`` (attention sites, token axes, blocks) and ``prunec.ops`` (the
   plain-torch kernels the fx backend calls): facts and kernels, importing no pass.
2. ``prunec.passes`` (the passes and their Plan).
3. ``prunec.backends`` (lower a Plan: fx, ONNX).
4. ``prunec.model``, ``prunec.inspect``, ``prunec.generate`` and the package ``prunec`` itself (its ``__init__``
   re-exports the model API).
5. ``prunec.cli``, ``prunec.measure``, ``prunec.demo``, ``prunec.bench``, ``prunec.console``,
   ``prunec.examples``: the tools on top.

Imports are read with ``ast`` at any depth, so a function-level (lazy) import counts as
much as one at the top of the file. A new module must be given a layer here.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "prunec"

LAYERS = {
    "prunec.errors": 0, "prunec.schedules": 0, "prunec.ir": 0,
    "prunec.passes.analysis": 1, "prunec.ops": 1,
    "prunec.passes": 2,
    "prunec.backends": 3,
    "prunec": 4, "prunec.model": 4, "prunec.inspect": 4, "prunec.generate": 4,
    "prunec.cli": 5, "prunec.measure": 5, "prunec.demo": 5, "prunec.bench": 5, "prunec.console": 5,
    "prunec.examples": 5,
}
TORCH_FREE = ["prunec.backends.onnx", "prunec.backends.onnx_merge", "prunec.backends.onnx_build",
              "prunec.ir.from_onnx", "prunec.schedules"]
# ORT sessions: torch only inside providers()' guarded CUDA check (no torch: CPU), never on import
IMPORTS_WITHOUT_TORCH = TORCH_FREE + ["prunec.ir.session"]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def layer(module: str) -> int:
    """The layer of a module: its own entry or its closest enclosing package's."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS and (i == len(parts) or i > 1):
            return LAYERS[".".join(parts[:i])]
    raise AssertionError(f"module {module} has no layer: add it to LAYERS in {__file__}")


def imports(module: str) -> list[tuple[int, str]]:
    """(line, imported prunec module) for every import in ``module``, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "prunec"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "prunec":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            out += [(node.lineno, s) for s in subs] or [(node.lineno, target)]
    return out


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_imports_point_down_the_layers():
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line}: {m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m in sorted(MODULES) for line, t in imports(m) if layer(t) > layer(m)]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = {m: {t for _, t in imports(m) if t in MODULES and t != m} for m in MODULES}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_onnx_side_has_no_torch_import():
    found = []
    for module in TORCH_FREE:
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{module}:{node.lineno}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert not found, "torch imported on the ONNX side:\n" + "\n".join(found)


def test_onnx_backend_imports_with_torch_blocked():
    code = ("import sys; sys.modules['torch'] = None\n"
            + "".join(f"import {m}\n" for m in IMPORTS_WITHOUT_TORCH)
            + "assert sys.modules['torch'] is None\nprint('ok')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
