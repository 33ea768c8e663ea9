"""The package's layout: imports follow the data (embed -> store -> train -> evaluate -> interpret ->
publish), with no cycle, and the trainer reaches no architecture-specific code."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "msae_ext"

#: each stage may import its own and earlier stages' modules (by the top-level name under msae_ext);
#: the first stage holds what every stage shares
STAGES = [
    {"fileio", "metrics", "plots", "distributed", "architectures", "loading"},
    {"embed"},
    {"store", "normalization"},
    {"config", "train"},
    {"evaluate", "report", "stability", "hierarchy"},
    {"recipes"},
    {"interpret"},
    {"publish", "export"},
    {"browse"},
    {"demo", "hierarchy_text"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every msae_ext module a file imports, at its top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("msae_ext")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("msae_ext"):
                found.add(target)
                # `from . import x` and `from .pkg import module` name modules too
                found |= {f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")}
    return found - {name}


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or path.is_dir()


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in modules} for m, p in modules.items()}


def _stage(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for i, stage in enumerate(STAGES):
        if top in stage:
            return i
    raise AssertionError(f"{module} belongs to no stage of tests/test_layout.py")


def test_imports_point_from_later_stages_to_earlier_ones():
    backward = []
    for module, imported in _graph().items():
        if module == "msae_ext":  # the package's lazy index of public names
            continue
        backward += [f"{module} -> {i}" for i in imported if i != "msae_ext" and _stage(i) > _stage(module)]
    assert not backward, backward


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            # a package's __init__ importing its own submodules is its index, not a cycle
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_trainer_names_no_architecture():
    """train.py builds any registered architecture from its registry entry: adding one is a file and
    an entry, with nothing to change in the trainer."""
    source = (PACKAGE / "train.py").read_text()
    for name in ("msae", "topk", "batchtopk", "relu"):
        assert f'"{name}"' not in source and f"'{name}'" not in source, name
    # the registry, not an architecture's module (nor any loss or memory code)
    assert {i for i in _graph()["msae_ext.train"] if i.startswith("msae_ext.architectures")} == {"msae_ext.architectures"}
