"""The package's shape, checked: layers without upward imports or cycles, short functions and
classes, and `# fmt: skip` only on tables (docs/architecture.md, "Layers").

The import graph counts every `import` / `from ... import` of a gtpo_jax module, at module level
or inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import collections
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gtpo_jax"

# Lower layers never import higher ones. A top-level module or package of gtpo_jax -> its layer.
LAYERS = {
    "errors": 0,
    "ops": 1, "losses": 1, "rewards": 1, "models": 1,
    "config": 2, "config_sections": 2, "data": 2, "parallel": 2, "scoring": 2,
    "rollout": 3,
    "training": 4,
    "train": 5, "evaluate": 5, "compare": 5, "plot": 5,
}  # fmt: skip
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 150


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """gtpo_jax modules imported anywhere in `path` (a `from package import module` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gtpo_jax"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gtpo_jax")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules, or [] (iterative DFS, three colours)."""
    colour = collections.defaultdict(int)  # 0 new, 1 on the stack, 2 done
    for start in graph:
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return path[path.index(child) :] + [child]
            elif colour[child] == 0 and child in graph:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return []


def test_every_module_has_a_layer():
    missing = sorted({m.split(".")[1] for m in _modules() if m != "gtpo_jax" and _layer(m) is None})
    assert not missing, f"add {missing} to LAYERS"


def test_no_import_cycle():
    assert find_cycle(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, targets in import_graph().items()
        for b in targets
        if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a)
    ]
    assert upward == []


def _long_definitions() -> list[str]:
    out = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = {
                ast.FunctionDef: MAX_FUNCTION_LINES,
                ast.AsyncFunctionDef: MAX_FUNCTION_LINES,
                ast.ClassDef: MAX_CLASS_LINES,
            }.get(type(node))
            if limit and node.end_lineno - node.lineno + 1 > limit:
                out.append(
                    f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} "
                    f"({node.end_lineno - node.lineno + 1} lines > {limit})"
                )
    return out


def test_no_long_functions_or_classes():
    assert _long_definitions() == []


def _is_data(node: ast.AST) -> bool:
    """A literal: a constant (or negated constant), a container of literals, or a call whose
    arguments (at least one) are all literals (`dict(a=1, b=2)`, `_gemma3(34, 1024, vocab_size=262208)`;
    `jax.process_index()` is a computation, not a literal; `"a b c".split()` is one)."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp):
        return _is_data(node.operand)
    if isinstance(node, ast.Dict):
        return all(k is None or _is_data(k) for k in node.keys) and all(_is_data(v) for v in node.values)
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        return all(_is_data(e) for e in node.elts)
    if isinstance(node, ast.Call):
        arguments = [*node.args, *(k.value for k in node.keywords)]
        if not arguments:  # only a literal's own method: `"a b c".split()`
            return isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Constant)
        return all(_is_data(a) for a in arguments)
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return bool(re.fullmatch(r"_?[A-Z][A-Z0-9_]*", name))  # a named constant (FULL, Kind.INT) inside a table


def _is_table(node: ast.AST | None) -> bool:
    """A table: a literal container or a call holding literals only, laid out over several rows."""
    return isinstance(node, ast.Dict | ast.List | ast.Tuple | ast.Set | ast.Call) and _is_data(node)


def _fmt_skip_owners(text: str) -> list[tuple[int, ast.stmt | None]]:
    """`(line, innermost statement)` of each `# fmt: skip` marker in code (not in strings)."""
    statements = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.stmt)]
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.rstrip().endswith("# fmt: skip"):
            continue
        around = [s for s in statements if s.lineno <= number <= s.end_lineno]
        out.append((number, min(around, key=lambda s: s.end_lineno - s.lineno) if around else None))
    return out


def test_fmt_skip_only_on_tables():
    """`# fmt: skip` may only keep a table aligned: an assignment (or return) of literal data."""
    offenders = []
    for path in [*ROOT.rglob("*.py"), *ROOT.parent.glob("tests/*.py"), *ROOT.parent.glob("benchmarks/*.py")]:
        for number, owner in _fmt_skip_owners(path.read_text()):
            value = getattr(owner, "value", None)
            if not (isinstance(owner, ast.Assign | ast.AnnAssign | ast.Return | ast.Expr) and _is_table(value)):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{number}")
    assert offenders == [], f"{len(offenders)} `# fmt: skip` outside tables"


def test_a_call_with_variables_is_not_a_table():
    assert _is_table(ast.parse("dict(a=1, b=-2.0, c=(3, 'x'))").body[0].value)
    assert not _is_table(ast.parse("f(x + 1, y=g(z))").body[0].value)
    assert not _is_table(ast.parse("f(self.params, records, seed=1)").body[0].value)
    assert _is_table(ast.parse("{'a': FULL, 'b': Kind.INT, 'c': (1, 2)}").body[0].value)


@pytest.mark.parametrize("module", ["gtpo_jax.training.loop", "gtpo_jax.evaluate", "gtpo_jax.rewards.registry"])
def test_modules_named_in_the_issue_have_no_cycle_through_them(module):
    graph = import_graph()
    assert module in graph and not any(module in c for c in [find_cycle(graph)])
