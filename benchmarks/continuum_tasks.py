"""Where each built-in task sits on the model-capability continuum for a model: measured, not assumed.

Per task: the base model's mean p of the (clean) training targets, from ``probe`` (the paper's
diagnostic: strong >= 0.5, weak < 0.1), its geometric mean p, and its accuracy by greedy generation
on held-out rows scored by the task's own checker (what the paper's evidence is about: "strong" is a
model that already answers a fair share right). The table is written to ``--table`` (default
``benchmarks/continuum_tasks.md``, overwritten) and, with ``--append``, to docs/benchmarks.md.
``benchmarks/continuum.py`` takes its default tasks from this table.

    python benchmarks/continuum_tasks.py                 # embedded SmolLM2-135M-Instruct, ~5 min on 2 CPU cores
    python benchmarks/continuum_tasks.py --quick         # tiny random model: checks the harness
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C
from benchmarks import continuum
from bnll_lightning.models import load_model, load_tokenizer
from bnll_lightning.probe import probe

TABLE = Path(__file__).resolve().parent / "continuum_tasks.md"


def main(argv: list[str] | None = None) -> str:
    from bnll_lightning.tasks import TASKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    parser.set_defaults(threads=1)  # see continuum.py: 1 thread is faster on the shared 2 cores
    parser.add_argument("--model", default=None, help="default: embedded; --quick: a tiny random model")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--num_eval", type=int, default=50, help="held-out rows answered by generation")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="generation budget per answer")
    parser.add_argument("--table", default=str(TABLE), help="markdown file the table is written to (overwritten)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_eval, args.max_new_tokens = 4, 8
    args.batch_size, args.max_length, args.eval_batch_size, args.probe_batches = 8, 256, 25, None
    threads = C.set_threads(args.threads)

    load0, start = C.load_average(), time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bnll_tasks_") as work, C.quiet():
        model = args.model or ("embedded" if not args.quick else continuum._tiny(work))
        continuum.StudyModule.base[model] = (load_tokenizer(model), load_model(model).eval())
        for task in args.tasks:
            row = measure(model, task, args, work)
            rows.append(row)
            print(f"[tasks {time.perf_counter() - start:5.0f} s] {task}: mean p {row['base_mean_p']:.3f}, accuracy "
                  f"{row['accuracy']:.2f}", file=sys.stderr, flush=True)  # fmt: skip
    load1 = C.load_average()

    table = C.markdown_table(
        ["task", "base mean p", "zone by mean p", "geometric mean p", "base accuracy", "correct",
         "distinct items", "zone by accuracy", "tokens per row"],
        [[r["task"], f"{r['base_mean_p']:.3f}", r["zone_p"], f"{r['base_geometric_mean_p']:.3f}",
          f"{r['accuracy']:.2f}", f"{r['correct']}/{r['n']}", f"{r['distinct']}", r["zone_accuracy"],
          f"{r['tokens_per_row']:.0f}"]
         for r in rows],
    )  # fmt: skip
    name = args.model or ("tiny random Llama (--quick)" if args.quick else "embedded SmolLM2-135M-Instruct")
    conditions = [
        f"model: {name}, float32, no training",
        "mean p: probe of the answered items' targets (clean: the answer and the end-of-turn token, chat template)",
        f"accuracy: the first {args.num_eval} distinct items of each task's evaluation stream (fewer where the task"
        " has fewer: 'distinct items'), greedy, max_new_tokens"
        f" {args.max_new_tokens}, the task's own checker (accepts the model's natural phrasing, e.g. 'The capital of"
        " Norway is Oslo.')",
        f"zones by accuracy: strong >= {continuum.STRONG_ACCURACY:g}, weak < {continuum.WEAK_ACCURACY:g};"
        " by mean p (the paper's rule): strong >= 0.5, weak < 0.1",
    ]
    title = "Built-in tasks on the continuum: base mean p and base accuracy" + (" (--quick)" if args.quick else "")
    text = C.section(title, "continuum_tasks.py", argv, threads, table, conditions, load=(load0, load1))
    print(text)
    if args.table:
        Path(args.table).write_text("<!-- written by benchmarks/continuum_tasks.py; rerun it, do not edit -->\n" + text)
    if args.append:
        C.append(text, args.docs)
    return text


def measure(model: str, task: str, args: argparse.Namespace, work: str) -> dict:
    """Base mean p (probe) and accuracy by greedy generation of ``model`` on ``task``'s held-out items."""
    study_task = continuum.StudyTask(task, task, 0.0, "-", "")
    rows = continuum.eval_rows(study_task, args.num_eval, allow_fewer=True)
    path = os.path.join(work, f"{task}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    module = continuum.StudyModule(model=model, histogram_every_n_steps=0)
    data = continuum.datamodule(path, 0, 0.0, module.tokenizer, args)
    data.setup("fit")
    figures = probe(module, data, max_batches=None, split="train", progress=False)
    result, _ = continuum.answer(module, module.tokenizer, rows, data, args)
    return {
        "task": task, "accuracy": result.accuracy, "correct": result.correct, "n": result.n, "distinct": len(rows),
        "base_mean_p": figures["mean_p"], "base_geometric_mean_p": figures["geometric_mean_p"],
        "zone_p": figures["zone"], "zone_accuracy": continuum.zone_by_accuracy(result.accuracy),
        "tokens_per_row": data.stats["train"]["tokens"] / max(data.stats["train"]["rows"], 1),
    }  # fmt: skip


if __name__ == "__main__":
    main()
