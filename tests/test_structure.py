"""The package's structure: no import cycles, arrows pointing down the layers, one definition of
each contract name, no branching on a stage's name outside the registry.

Imports are read from the source (ast), module-level and function-level alike: an import inside a
function is still an arrow, it only hides a cycle until that function runs.
"""

import ast
import re
from pathlib import Path

import setok

ROOT = Path(setok.__file__).parent
# cli -> (train, export, calibration, eval, serve) -> data, model -> runtime -> backends -> plugins;
# the contract modules at the root (errors, config, io, optional, manifest) sit below them all.
LAYERS = {"plugins": 1, "backends": 2, "runtime": 3, "data": 4, "model": 4, "train": 5, "export": 5,
          "calibration": 5, "eval": 5, "serve": 5, "cli": 6}
TORCH_FREE = ("runtime", "backends", "serve")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """setok modules `path` imports (a `from pkg import name` of a submodule counts as that submodule)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != me}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    g = graph()
    assert "setok.runtime.pipeline" in g and "setok.backends.trt.runner" in g["setok.runtime.pipeline"] | set().union(
        *(g[m] for m in g["setok.runtime.pipeline"])), "the walk sees function-level imports"
    assert find_cycle(g) is None, f"import cycle: {' -> '.join(find_cycle(g))}"


def test_arrows_point_down():
    wrong = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, bs in graph().items() for b in bs if layer(b) > layer(a)]
    assert not wrong, "\n".join(wrong)


def test_torch_free_layers_never_import_torch():
    for name, path in modules().items():
        if name.split(".")[1:2] and name.split(".")[1] in TORCH_FREE:
            tree = ast.parse(path.read_text())
            used = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            used |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert not used & {"torch", "transformers", "optimum"}, name


def _string_literals(path: Path) -> list[str]:
    return [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_contract_names_are_defined_once():
    """The KV-cache names and the plugin op are string literals only in setok/manifest.py (model_py,
    which Triton runs without setok, receives them through its settings file)."""
    pattern = re.compile(r"past_key_values\.|(?<![\w.])present\.|::DensityPeakCluster|^DensityPeakCluster$")
    where = {name for name, path in modules().items() if any(pattern.search(s) for s in _string_literals(path))}
    assert where == {"setok.manifest"}, sorted(where)


def name_comparisons(source: str, names: set[str]) -> list[tuple[int, list[str]]]:
    """(line, names) of every comparison with one of `names` as a literal (alone or in a tuple/set/list)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = [side] if isinstance(side, ast.Constant) else list(getattr(side, "elts", []))
                hits = [v.value for v in values if isinstance(v, ast.Constant) and v.value in names]
                if hits:
                    found.append((node.lineno, hits))
    return found


def test_name_comparisons_are_found():
    src = 'if s.name == "llm": pass\nok = x in ("encoder", "a")\nfine = stage("merger")\n'
    assert name_comparisons(src, {"llm", "encoder", "merger"}) == [(1, ["llm"]), (2, ["encoder"])]


def test_no_stage_name_comparisons_outside_the_registry():
    """`name == "llm"`, `x.name in ("encoder", ...)`: what a stage does is data on the stage."""
    from setok.export.stages import STAGES

    bad = [f"{name}:{line} compares with {hits}" for name, path in modules().items() if name != "setok.export.stages"
           for line, hits in name_comparisons(path.read_text(), set(STAGES))]
    assert not bad, "\n".join(bad)
