"""One optimizer step's package calls on a tiny model, and the package's size, as markdown."""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import sys
import tempfile
import tokenize
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # run as a script: `benchmarks` importable, after PYTHONPATH's package trees
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

import bnll_lightning
from benchmarks import _common as C
from bnll_lightning.data import SFTDataModule
from bnll_lightning.module import SFTModule

PACKAGE = "bnll_lightning"
MODULE = f"{PACKAGE}.module"
HOW = ("The step is traced under `sys.setprofile` from the first hook of its first micro-batch to the first hook of"
       " the next step (the second of three steps, the first warms up) of an `SFTModule` at its defaults on a tiny"
       " model: every package function entered, callbacks included (comprehensions and lambdas not counted). A"
       " return to module.py is a time the running package code becomes module.py's after another package"
       " module's, by a call or a return. Lines: docstrings are every string statement, comments whole lines.")


class StepTracer:
    """Records the package functions entered, in order, and the package modules control passes through."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()  # "module.qualname" -> calls, in order of first entry
        self.modules: Counter[str] = Counter()  # package module -> calls into it
        self.switches: list[tuple[str, str]] = []  # (from, to): the running package module changed
        self._stack: list[str] = []  # package module of each package frame on the stack
        self._last: str | None = None

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        module = frame.f_globals.get("__name__", "")
        if event not in ("call", "return") or not module.startswith(PACKAGE) or frame.f_code.co_name.startswith("<"):
            return
        if event == "call":
            self.calls[f"{module.removeprefix(PACKAGE + '.')}.{frame.f_code.co_qualname}"] += 1
            self.modules[module] += 1
            self._stack.append(module)
        elif self._stack:
            self._stack.pop()
        running = self._stack[-1] if self._stack else None
        if running is not None and running != self._last:
            if self._last is not None:
                self.switches.append((self._last, running))
            self._last = running


class TraceOneStep(L.Callback):
    """A callback, first in the trainer's list: traces from the first hook of step ``step`` to the next step's."""

    def __init__(self, tracer: StepTracer, step: int, accumulate: int) -> None:
        self.tracer, self.start, self.stop = tracer, step * accumulate, (step + 1) * accumulate

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.start:
            sys.setprofile(self.tracer)
        elif batch_idx == self.stop:
            sys.setprofile(None)


def trace_step(work_dir: str, accumulate: int = 2) -> StepTracer:
    """Trace the second of three optimizer steps of ``accumulate`` micro-batches of an ``SFTModule`` at its defaults."""
    model_dir = C.make_tiny_model(f"{work_dir}/model", hidden_size=32, num_heads=2, intermediate_size=64)
    module = SFTModule(model=model_dir, export_dir=f"{work_dir}/export")
    batch = C.fixed_batch(2, 32, len(module.tokenizer))
    tracer = StepTracer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[TraceOneStep(tracer, 1, accumulate)],
                        default_root_dir=work_dir)
    try:  # the fit's own lines (the export's disk report) are not the table's
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(module, DataLoader([batch] * 3 * accumulate, batch_size=None))
    finally:
        sys.setprofile(None)
    return tracer


def line_counts(package: Path) -> dict[str, int]:
    """Lines of the package's .py files: code, docstrings (every string statement), comments and blank."""
    counts: Counter[str] = Counter()
    for path in sorted(package.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        docstrings = {n for node in ast.walk(ast.parse(source))
                      if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                      and isinstance(node.value.value, str) for n in range(node.lineno, node.end_lineno + 1)}
        comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type == tokenize.COMMENT and tok.line.lstrip().startswith("#")}
        for n, line in enumerate(lines, 1):
            kind = ("docstrings" if n in docstrings else "comments" if n in comments
                    else "blank" if not line.strip() else "code")
            counts[kind] += 1
        counts["total"] += len(lines)
    return dict(counts)


def longest_functions(package: Path, n: int = 10) -> list[tuple[str, int]]:
    """The ``n`` longest functions (``def`` line to last line, docstring included) as ("module.qualname", lines)."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((prefix + child.name, child.end_lineno - child.lineno + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    for path in sorted(package.glob("*.py")):
        visit(ast.parse(path.read_text(encoding="utf-8")), f"{path.stem}.")
    return sorted(found, key=lambda item: -item[1])[:n]


def parameters(function: Any) -> int:
    """Parameters a caller can pass (``self`` not counted)."""
    return len([p for p in inspect.signature(function).parameters if p != "self"])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, epilog="Another tree first on PYTHONPATH: its package.")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches in the traced optimizer step")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    package = Path(bnll_lightning.__file__).parent
    with C.quiet(), tempfile.TemporaryDirectory() as work_dir:
        tracer = trace_step(work_dir, args.accumulate)
    modules = ", ".join(f"{m.removeprefix(PACKAGE + '.')} {n}" for m, n in tracer.modules.items())
    back_to_module = sum(to == MODULE for _, to in tracer.switches)
    lines = line_counts(package)
    text = "\n\n".join([
        f"## One optimizer step ({args.accumulate} micro-batches), package `{package}`",
        HOW,
        C.markdown_table(["package function entered", "calls"], list(tracer.calls.items())),
        C.markdown_table(["measure", "value"], [
            ["package calls in the step", sum(tracer.calls.values())],
            ["package functions entered", len(tracer.calls)],
            ["package modules entered (calls)", f"{len(tracer.modules)}: {modules}"],
            ["changes of running package module", len(tracer.switches)],
            ["returns to module.py", back_to_module],
            ["returns to module.py per micro-batch", f"{back_to_module / args.accumulate:g}"],
            ["package lines: code / docstrings / comments / blank / total",
             " / ".join(str(lines.get(k, 0)) for k in ("code", "docstrings", "comments", "blank", "total"))],
            ["`SFTModule.__init__` parameters", parameters(SFTModule.__init__)],
            ["`SFTDataModule.__init__` parameters", parameters(SFTDataModule.__init__)],
        ]),
        C.markdown_table(["longest function", "lines"], longest_functions(package)),
    ])
    print(text)
    return text


if __name__ == "__main__":
    main()
