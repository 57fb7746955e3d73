"""Package structure: no import cycle, decoding does not import the training stack, explicit backend dispatch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it is installed as (setup.py's package_dir).
PACKAGES = {ROOT / "pmlm_engine": "pmlm_engine", ROOT / "kernels": "pmlm_engine.kernels"}


def _module_name(path: Path, package: str) -> str:
    return package if path.name == "__init__.py" else f"{package}.{path.stem}"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, from the AST: every ``import`` statement counts,
    at module level or inside a function, under ``TYPE_CHECKING`` or not."""
    modules = {_module_name(p, pkg): (p, pkg) for folder, pkg in PACKAGES.items() for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                # `from pkg import sub` imports the submodule pkg.sub when there is one.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `a.b.c` where only `a.b` is ours
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"pmlm_engine.attention", "pmlm_engine.layout", "pmlm_engine.kernels.tile_stats"} <= graph.keys()
    assert "pmlm_engine.structured_attention" in graph["pmlm_engine.attention"]  # the walk sees edges
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_decoding_does_not_import_the_training_stack():
    proc = _run("import sys, pmlm_engine.decode, pmlm_engine.checkpoint, pmlm_engine.tokenizer\n"
                "print(sorted(m for m in sys.modules if m in ('pmlm_engine.finetune', 'pmlm_engine.train', "
                "'pmlm_engine.engine', 'pmlm_engine.optim', 'deepspeed')))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {name!r} or name.startswith({name!r} + "."):
            raise {error}
sys.meta_path.insert(0, Block())
from pmlm_engine import attention
"""


def test_a_missing_optional_package_makes_its_backend_unavailable_with_the_reason():
    proc = _run(_BLOCK.format(name="triton", error="ModuleNotFoundError('No module named triton', name='triton')")
                + "status = attention.available_backends(reasons=True)\n"
                  "print(status['triton']); print(sorted(attention.available_backends()))\n"
                  "try:\n    attention.resolve_backend('triton', __import__('torch').device('cpu'))\n"
                  "except RuntimeError as e:\n    print('refused:', e)\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "'triton' package is not installed" in lines[0] and "pip install triton" in lines[0]
    # cuda needs no triton; it is available here when its kernels are emulated (tests/conftest.py)
    emulated = ["cuda"] if os.environ.get("PMLM_CUDA_EMULATE") == "1" else []
    assert lines[1] == str(sorted(["reference", "sdpa", "torch", *emulated]))
    assert lines[2].startswith("refused: attention backend 'triton' is unavailable: the 'triton' package")


@pytest.mark.parametrize("error", ["ImportError('cannot import name X from triton.language')",
                                   "ModuleNotFoundError('No module named numpy.foo', name='numpy.foo')"])
def test_a_broken_backend_import_is_raised_not_skipped(error):
    """The kernel module failing to import for any reason but a missing ``triton`` is an error."""
    proc = _run(_BLOCK.format(name="pmlm_engine.kernels.pseudo_mask_attention", error=error)
                + "attention.available_backends()\n")
    assert proc.returncode != 0
    assert error.split("(")[0] in proc.stderr


def test_registered_backends_are_checked_and_removable():
    from pmlm_engine.attention import available_backends, register_backend, unregister_backend
    from pmlm_engine.dense_attention import DenseBackend, reference_attention

    with pytest.raises(TypeError, match="does not implement AttentionBackend"):
        register_backend(lambda q, k, v: q)  # type: ignore[arg-type]
    register_backend(DenseBackend("scratch-test", reference_attention, supports_dropout=False))
    assert "scratch-test" in available_backends()
    unregister_backend("scratch-test")
    assert "scratch-test" not in available_backends()
