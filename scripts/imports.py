"""The package's import graph, checked: imports that point up and import cycles.

Layers, top down: orchestration and what the user sees of it (``cli``, ``pipeline``, ``distill_stage``,
``refresh``, ``report``); the stages (``reflect``, ``rank``, ``teacher_signal``, ``evaluate``, the
``distill`` training package), each of which may import only generic modules and itself; the generic
modules (data, models, engines, storage, spec, ...), which import neither stages nor orchestration.
Imports inside functions count too (they are still dependencies); ``TYPE_CHECKING`` blocks do not. Exit
status 1 if there is either.

    python scripts/imports.py            # the findings, one per line
    python scripts/imports.py --summary  # also lines per module and the largest classes
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "srd_ray"
TOP = (
    "srd_ray.cli",
    "srd_ray.pipeline",
    "srd_ray.distill_stage",
    "srd_ray.refresh",
    "srd_ray.report",
    "srd_ray.__main__",
)
STAGES = ("srd_ray.reflect", "srd_ray.rank", "srd_ray.teacher_signal", "srd_ray.evaluate", "srd_ray.distill")


def layer(module: str) -> tuple[int, str]:
    """(0 top, 1 stage, 2 generic) and, for a stage, which one (a package counts as one stage)."""
    if module in TOP:
        return 0, module
    stage = next((s for s in STAGES if module == s or module.startswith(s + ".")), None)
    return (1, stage) if stage else (2, module)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (a ``from package import module`` names the module)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and _type_checking(block)
               for node in ast.walk(block)}  # fmt: skip
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith(PACKAGE)}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}  # fmt: skip
    return {target for target in found if target in modules and target != name}


def _type_checking(block: ast.If) -> bool:
    test = block.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}
    return {name: imports_of(path, name, set(paths)) for name, path in paths.items()}


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports of a higher layer, or of another stage."""
    found = []
    for source, targets in edges.items():
        (source_layer, source_stage) = layer(source)
        for target in targets:
            target_layer, target_stage = layer(target)
            if target_layer < source_layer or (target_layer == source_layer == 1 and target_stage != source_stage):
                found.append((source, target))
    return sorted(found)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(groups)


def summary() -> list[str]:
    lines = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        tree = ast.parse(path.read_text())
        classes = [(n.end_lineno - n.lineno + 1, n.name) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        largest = max(classes, default=(0, "-"))
        lines.append(f"{module_name(path)}: {len(path.read_text().splitlines())} lines; largest class "
                     f"{largest[1]} ({largest[0]} lines)")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    edges = graph()
    ups, loops = upward(edges), cycles(edges)
    for source, target in ups:
        print(f"upward: {source} imports {target}")
    for group in loops:
        print(f"cycle: {' <-> '.join(group)}")
    if args.summary:
        print("\n".join(summary()))
    print(f"{len(ups)} upward imports, {len(loops)} cycles")
    return 1 if ups or loops else 0


if __name__ == "__main__":
    sys.exit(main())
