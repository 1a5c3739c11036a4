"""The plugin's layering: no import cycle between its packages and modules, and ``import iseg_plugin`` loads no
mmseg / mmcv (their registrations are in ``iseg_plugin.mmseg``, loaded by the configs' ``custom_imports``)."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _unit(module: str) -> str:
    """The layer a module belongs to: ``iseg_plugin.<package or module>``, or ``fx_patterns``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "iseg_plugin" else parts[0]


def _imports(path: Path, module: str) -> set[str]:
    """Every plugin module ``path`` imports, at the top or inside a function."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("iseg_plugin", "fx_patterns")}


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for top in ("iseg_plugin", "fx_patterns"):
        for path in (ROOT / top).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            unit = _unit(module)
            edges.setdefault(unit, set()).update(_unit(m) for m in _imports(path, module) if _unit(m) != unit)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node, [])
            if found:
                return found[found.index(found[-1]):]
    return None


def test_no_import_cycle_between_the_plugins_layers():
    edges = _graph()
    assert "iseg_plugin.ops" in edges and "iseg_plugin.lowering" in edges["iseg_plugin.fx"]  # the graph is read
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))
    assert edges["iseg_plugin.kernels"] <= {"iseg_plugin.intops"}, "the kernels read only the integer arithmetic"
    assert edges["iseg_plugin.intops"] == set(), "intops is a leaf"
    assert not any("fx_patterns" in targets for unit, targets in edges.items() if unit.startswith("iseg_plugin"))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_importing_the_plugin_loads_no_mmseg():
    code = "import sys, iseg_plugin, iseg_plugin.ops, iseg_plugin.nn, fx_patterns; print(sorted(m for m in ('mmseg', 'mmcv') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
