"""The package's import graph (read with ast, nothing executed): no cycles, no private names across modules."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bnll_lightning"


def imports() -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported bnll_lightning module, name or "")] for every import, function-local ones too."""
    graph: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        edges = graph.setdefault(path.stem, [])
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: not an import at run time
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnll_lightning"):
                target = node.module.partition(".")[2]
                for alias in node.names:
                    if target:
                        edges.append((target, alias.name))
                    else:  # from bnll_lightning import tasks
                        edges.append((alias.name, ""))
            elif isinstance(node, ast.Import):
                edges += [(a.name.partition(".")[2], "") for a in node.names if a.name.startswith("bnll_lightning.")]
    return graph


def test_no_import_cycles():
    graph = {m: {t for t, _ in edges if t and t != m} for m, edges in imports().items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            assert state.get(t) != 1, "import cycle: " + " -> ".join([*path, m, t])
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_private_names_are_imported_across_modules():
    private = [(m, t, n) for m, edges in imports().items() for t, n in edges if n.startswith("_") and t != m]
    assert not private, private
