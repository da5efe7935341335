"""The package's import graph (read with ast, nothing executed): layers, no cycles, no private names across modules."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bnll_lightning"

# Every module's layer: a module imports from its own layer or below, never above.
LAYERS = {
    **dict.fromkeys(["constraints", "modes", "objectives", "streaming", "alpha", "optim", "sampling", "disk", "study_args"], 0),  # pure torch (disk, study_args: plain Python)
    # models, tasks, and the data's Lightning-free parts: rows from sources, formatting, packing
    **dict.fromkeys(["models", "tasks", "reference", "lora", "logp_head", "sources", "formatting", "packing"], 1),
    **dict.fromkeys(["evaluate", "probe", "compare", "self_targets"], 2),  # generation, answer checking, diagnosis, comparison
    # Lightning: the module, callbacks, the data module, the study loop
    **dict.fromkeys(["module", "callbacks", "console", "signals", "strategies", "export", "data", "study", "plateau",
                      "checkpoint_io"], 3),
    **dict.fromkeys(["cli", "__main__", "__init__"], 4),  # command line, package entry points
}
# (module, imported module, name) -> why it may import upwards (function-local: nothing runs at import time).
UPWARD: dict[tuple[str, str, str], str] = {}


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


def test_modules_import_only_downwards():
    graph = imports()
    assert set(graph) == set(LAYERS), f"give each module a layer in LAYERS: {sorted(set(graph) ^ set(LAYERS))}"
    edges = {(m, t, n) for m, targets in graph.items() for t, n in targets}
    upward = sorted(e for e in edges - set(UPWARD) if LAYERS[e[1]] > LAYERS[e[0]])
    assert not upward, f"(module, imported module, name) importing from a higher layer: {upward}"
    assert set(UPWARD) <= edges, "an allowed upward import is gone: remove it from UPWARD"


def test_no_import_cycles():
    graph = {m: {t for t, n in edges if t and t != m and (m, t, n) not in UPWARD} for m, edges in imports().items()}
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


def test_readme_layout_lists_every_module():
    """The README's layout section names each module of the package once, and no module that is gone."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    listed = re.findall(r"^  (\w+)\.py\s", layout, flags=re.M)
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__"))
    assert sorted(listed) == modules, f"README layout {sorted(listed)} != package {modules}"


def test_every_module_opens_with_a_one_line_docstring_of_its_job():
    for path in sorted(PACKAGE.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{path.name}: no opening docstring"
        first = doc.splitlines()[0]
        assert first.endswith(".") and len(first) <= 120, f"{path.name}: the first line is one sentence: {first!r}"
