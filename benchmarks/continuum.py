"""The paper's evidence, small: accuracy by generation after fine-tuning with each objective, on
tasks at different points of the model-capability continuum.

For every task the base model is measured first (mean p of the training targets, accuracy by greedy
generation on held-out rows: the "base" row). Then, for every objective, the same base model is
fine-tuned with the same data, order, seed and budget (``SFTModule`` + ``SFTDataModule`` + a
Lightning ``Trainer``, in process) and the same held-out rows are answered greedily and scored by
the task's own checker. The paper's claim is an X: prior-leaning objectives (−p, α = 10,
thresholded NLL) win where the base model already answers well, NLL wins where it does not.

Outputs in ``--out``: ``continuum.csv`` (one row per task × objective, plus the base model),
``continuum.md`` (the table), ``continuum.png`` (accuracy against α per task: NLL at α = 0, −p at
1, α = 10; the adaptive controller at its mean α over training, thresholded NLL off the α axis),
``predictions/<task>/<objective>.jsonl`` and TensorBoard logs under ``runs/<task>/<objective>``.

    python benchmarks/continuum.py                      # the default size: ~40 min on 2 shared CPU cores
    python benchmarks/continuum.py --quick              # tiny random model, 2 steps: checks the harness (seconds)
    python benchmarks/continuum.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 200 --accelerator gpu \\
        --precision bf16-mixed --threads 8 --num_eval 200            # a bigger run on a GPU
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as L
import torch

from benchmarks import _common as C
from bnll_lightning.alpha import AdaptiveAlpha
from bnll_lightning.data import SFTDataModule
from bnll_lightning.evaluate import evaluate_generation, write_jsonl
from bnll_lightning.module import SFTModule
from bnll_lightning.objectives import NLL, AlphaFamily, NegProb, ThresholdedNLL
from bnll_lightning.probe import probe
from bnll_lightning.tasks import TASKS

# Tasks of the default run, one per zone of the continuum for SmolLM2-135M-Instruct, chosen from the
# measured base figures in benchmarks/continuum_tasks.md (python benchmarks/continuum_tasks.py):
# figlet is model-weak (the paper's own weak task), add intermediate, capital model-strong.
DEFAULT_TASKS = ("figlet", "add", "capital")
# The paper's noisy supervision on the model-strong side: corrupt 30 % of capital's training answers.
DEFAULT_NOISE = ("capital=0.3",)
# Zones by base accuracy (what the paper's evidence is about; mean p alone can mislead, see probe.py):
# "a fair share right before SFT" (Qwen2.5-Math: 30-40 % of Math500) is strong, almost none is weak.
STRONG_ACCURACY = 0.30
WEAK_ACCURACY = 0.05
BASE = "base"
CSV_FIELDS = (
    "task", "objective", "label", "alpha", "alpha_final", "accuracy", "correct", "n", "eval_unseen", "base_accuracy",
    "base_mean_p", "base_geometric_mean_p", "zone_accuracy", "zone_p", "train_mean_p", "noise", "steps",
    "batch_size", "lr", "num_train", "seed", "model", "train_seconds", "eval_seconds",
)  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """An objective of the benchmark: how to build it and where it sits on the α axis."""

    key: str
    label: str
    make: Callable[[], tuple[Any, Any]]  # -> (objective, alpha controller or None)
    alpha: float | None  # fixed α; None: read from the run (adaptive) or off the axis (thresholded)


ENTRIES = {
    e.key: e
    for e in (
        Entry("nll", "NLL", lambda: (NLL(), None), 0.0),
        Entry("negprob", "−p (NegProb)", lambda: (NegProb(), None), 1.0),
        Entry("alpha10", "AlphaFamily(10)", lambda: (AlphaFamily(10.0), None), 10.0),
        Entry("thresholded", "ThresholdedNLL(0.2)", lambda: (ThresholdedNLL(0.2), None), None),
        # The module's default controller (α from 0 to 1 between mean p 0.1 and 0.55), started from a
        # probe of the base model: a short run has no time to ramp up from NLL.
        Entry("adaptive", "AlphaFamily + AdaptiveAlpha", lambda: (AlphaFamily(0.0), AdaptiveAlpha()), None),
        # The same controller driven by the other statistics (not run by default): which one tracks
        # the objective that wins, when the arithmetic mean is inflated by easy format tokens?
        Entry("adaptive_geometric", "AdaptiveAlpha(statistic=geometric)",
              lambda: (AlphaFamily(0.0), AdaptiveAlpha(statistic="geometric")), None),
        Entry("adaptive_quantile", "AdaptiveAlpha(statistic=quantile, 0.1)",
              lambda: (AlphaFamily(0.0), AdaptiveAlpha(statistic="quantile", quantile=0.1)), None),
    )
}
OBJECTIVE_KEYS = ("nll", "negprob", "alpha10", "thresholded", "adaptive")  # the default set
# --quick: the harness on a toy in seconds (the numbers mean nothing).
QUICK = dict(steps=2, batch_size=2, num_eval=4, max_new_tokens=8, probe_batches=1, eval_batch_size=4)


def zone_by_accuracy(accuracy: float) -> str:
    if accuracy >= STRONG_ACCURACY:
        return "model-strong"
    if accuracy < WEAK_ACCURACY:
        return "model-weak"
    return "model-intermediate"


def parse_noise(items: Sequence[str], tasks: Sequence[str]) -> dict[str, float]:
    """``["capital=0.3"]`` -> {"capital": 0.3}; a bare number applies to every task."""
    out = {task: 0.0 for task in tasks}
    for item in items:
        name, sep, value = item.rpartition("=")
        fraction = float(value)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"--noise {item!r}: the fraction must be in [0, 1]")
        if not sep:
            out = {task: fraction for task in tasks}
        elif name not in TASKS:
            raise ValueError(f"--noise {item!r}: unknown task {name!r}")
        elif name in out:  # a task that is not run (e.g. the default capital=0.3 with --tasks add) is ignored
            out[name] = fraction
    return out


# ----------------------------------------------------------------------------- one run


class BenchModule(SFTModule):
    """``SFTModule`` without the end-of-fit export: the benchmark evaluates the weights in memory,
    and writing a full model per run costs time and disk."""

    def on_train_end(self) -> None:
        pass


class AlphaTrace(L.Callback):
    """Records the α each optimizer step trains with (the controller updates it after the step)."""

    def __init__(self) -> None:
        self.alphas: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.objective.alpha is not None:
            self.alphas.append(float(pl_module.objective.alpha))


def datamodule(task: str, args: argparse.Namespace, noise: float, tokenizer: Any) -> SFTDataModule:
    return SFTDataModule(
        train=f"builtin:{task}", num_train=args.num_train, num_val=args.num_eval, batch_size=args.batch_size,
        seed=args.seed, noise=noise, max_length=args.max_length, tokenizer=tokenizer,
    )


def eval_rows(data: SFTDataModule, task: str, n: int, seed: int) -> tuple[list[dict[str, Any]], int]:
    """``n`` rows with distinct prompts to answer, and how many of them training never showed.

    The data module's val rows come from a stream disjoint from the training prompts; a task with
    few distinct rows (capital, plural: 50) has too few disjoint ones, and the val stream then
    repeats them (measured: 128 capital training rows left 2 unseen countries, so 50 val rows asked
    2 questions). Here duplicates are dropped and the set is topped up with distinct rows of the
    task that training did see: accuracy over many questions, with the overlap reported.
    """
    rows, prompts = [], set()
    candidates = itertools.chain(data.raw_rows("val"), TASKS[task].generate(max(40 * n, 2000), seed))
    for row in candidates:
        if row["prompt"] not in prompts:
            rows.append(row)
            prompts.add(row["prompt"])
            if len(rows) == n:
                break
    seen = {row["prompt"] for row in data.raw_rows("train")}
    return rows, sum(row["prompt"] not in seen for row in rows)


def evaluate(module: Any, rows: list[dict[str, Any]], data: Any, args: argparse.Namespace, device: torch.device):
    """Greedy answers to ``rows``, scored by the task's checker."""
    module.to(device)
    start = time.perf_counter()
    result = evaluate_generation(
        module.model, module.tokenizer, rows, data, "task",
        max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
    )  # fmt: skip
    return result, time.perf_counter() - start


def measure_base(model: str, task: str, args: argparse.Namespace) -> dict[str, Any]:
    """The base model on ``task``: mean p of the clean training targets (probe, no noise: the
    zone is a property of model and task) and accuracy on the held-out rows."""
    module = BenchModule(model=model, histogram_every_n_steps=0)
    data = datamodule(task, args, 0.0, module.tokenizer)
    data.setup("fit")
    device = torch.device(args.device)
    module.to(device)
    figures = probe(module, data, max_batches=args.probe_batches, split="train", device=device, progress=False)
    rows, unseen = eval_rows(data, task, args.num_eval, args.seed)
    result, seconds = evaluate(module, rows, data, args, device)
    if args.out:
        write_jsonl(os.path.join(args.out, "predictions", task, f"{BASE}.jsonl"), result.predictions)
    return {
        "task": task, "objective": BASE, "label": "base model (no training)", "alpha": None, "alpha_final": None,
        "accuracy": result.accuracy, "correct": result.correct, "n": result.n,
        "base_mean_p": figures["mean_p"], "base_geometric_mean_p": figures["geometric_mean_p"],
        "zone_p": figures["zone"], "zone_accuracy": zone_by_accuracy(result.accuracy),
        "train_mean_p": figures["mean_p"], "noise": None, "steps": 0, "train_seconds": 0.0, "eval_seconds": seconds,
        "eval_unseen": unseen, "tokens_per_row": data.stats["train"]["tokens"] / max(data.stats["train"]["rows"], 1),
    }  # fmt: skip


def finetune(model: str, task: str, entry: Entry, args: argparse.Namespace, noise: float) -> dict[str, Any]:
    """Fine-tune a fresh copy of ``model`` on ``task`` with ``entry``'s objective, then evaluate."""
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(args.seed, verbose=False)
    objective, controller = entry.make()
    module = BenchModule(
        model=model, objective=objective, alpha_controller=controller, histogram_every_n_steps=0,
        optimizer=partial(torch.optim.AdamW, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01),
        warmup=args.warmup, probe_batches=args.probe_batches if controller is not None else 0,
    )  # fmt: skip
    data = datamodule(task, args, noise, module.tokenizer)
    trace = AlphaTrace()
    logger = TensorBoardLogger(os.path.join(args.out, "runs"), name=task, version=entry.key) if args.out else False
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=args.steps,
        gradient_clip_val=1.0, logger=logger, log_every_n_steps=1, callbacks=[trace],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=args.out or None,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, data)
    train_seconds = time.perf_counter() - start
    stats = module.last_step_stats
    with trainer.precision_plugin.forward_context():
        rows, unseen = eval_rows(data, task, args.num_eval, args.seed)
        result, eval_seconds = evaluate(module, rows, data, args, trainer.strategy.root_device)
    if args.out:
        write_jsonl(os.path.join(args.out, "predictions", task, f"{entry.key}.jsonl"), result.predictions)
    alphas = trace.alphas
    return {
        "task": task, "objective": entry.key, "label": entry.label,
        "alpha": entry.alpha if entry.alpha is not None else (sum(alphas) / len(alphas) if alphas else None),
        "alpha_final": module.objective.alpha, "accuracy": result.accuracy, "correct": result.correct, "n": result.n,
        "train_mean_p": stats["p_sum"] / max(stats["tokens"], 1.0) if stats else math.nan, "noise": noise,
        "eval_unseen": unseen, "steps": trainer.global_step, "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
    }  # fmt: skip


# ----------------------------------------------------------------------------- outputs


def _num(x: Any, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per task × objective (the base model first), the best fine-tuned accuracy in bold."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        tuned = {r["accuracy"] for r in mine if r["objective"] != BASE}
        best = max(tuned) if len(tuned) > 1 else None  # a tie of all objectives marks nothing
        for r in mine:
            acc = f"{r['accuracy']:.3f}"
            if r["objective"] != BASE and r["accuracy"] == best:
                acc = f"**{acc}**"
            alpha = _num(r["alpha"], 2)
            if r["objective"].startswith("adaptive"):
                alpha = f"{alpha} (mean), {_num(r['alpha_final'], 2)} (end)"
            lines.append([
                task, r["zone_accuracy"], f"{r['base_mean_p']:.3f} ({r['zone_p']})", r["label"], alpha, acc,
                f"{r['correct']}/{r['n']} ({r['eval_unseen']} unseen)", _num(r["train_mean_p"]),
                "–" if r["noise"] is None else f"{r['noise']:g}", f"{r['train_seconds']:.0f} + {r['eval_seconds']:.0f}",
            ])  # fmt: skip
    headers = ["task", "zone (base accuracy)", "base mean p (zone by p)", "objective", "α", "accuracy",
               "correct (eval prompts unseen in training)",
               "train mean p (last step)", "noise", "seconds (train + eval)"]  # fmt: skip
    return C.markdown_table(headers, lines)


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def read_csv(path: str) -> list[dict[str, Any]]:
    """Rows of ``continuum.csv`` with numbers parsed (empty cells -> None)."""
    numeric = {"alpha", "alpha_final", "accuracy", "base_accuracy", "base_mean_p", "base_geometric_mean_p",
               "train_mean_p", "noise", "lr", "train_seconds", "eval_seconds"}  # fmt: skip
    integer = {"correct", "n", "eval_unseen", "steps", "batch_size", "num_train", "seed"}
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = dict(raw)
            for k in numeric | integer:
                if k in row:
                    row[k] = None if row[k] in ("", None) else (int(row[k]) if k in integer else float(row[k]))
            rows.append(row)
    return rows


# Where thresholded NLL is drawn: it has no α, so it sits right of the α axis, behind a divider.
_X_THRESHOLDED = 40.0


def plot(rows: Sequence[dict[str, Any]], path: str | None = None):
    """Accuracy against α per task (the crossover plot); returns the matplotlib ``Figure``.

    Lines join NLL (α = 0), −p (α = 1) and α = 10; the base model is a dotted line; the adaptive
    run is a star at its mean α; thresholded NLL (no α) is a diamond right of the divider.
    """
    import matplotlib
    from matplotlib.figure import Figure

    # A bare Figure, not pyplot: saving needs no display backend (Agg draws the PNG) and a notebook's
    # backend and open figures are left alone.
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, task in enumerate(dict.fromkeys(r["task"] for r in rows)):
        color = colors[i % len(colors)]
        mine = {r["objective"]: r for r in rows if r["task"] == task}
        zone = next(iter(mine.values())).get("zone_accuracy", "")
        line = sorted((r["alpha"], r["accuracy"]) for k, r in mine.items() if k in ("nll", "negprob", "alpha10"))
        if line:
            ax.plot(*zip(*line), "o-", color=color, label=f"{task} ({zone})")
        if BASE in mine:
            ax.axhline(mine[BASE]["accuracy"], color=color, linestyle=":", linewidth=1)
        if "adaptive" in mine and mine["adaptive"]["alpha"] is not None:
            ax.plot(mine["adaptive"]["alpha"], mine["adaptive"]["accuracy"], "*", color=color, markersize=13,
                    markeredgecolor="black", markeredgewidth=0.5)  # fmt: skip
        if "thresholded" in mine:
            ax.plot(_X_THRESHOLDED, mine["thresholded"]["accuracy"], "D", color=color, markersize=8,
                    markeredgecolor="black", markeredgewidth=0.5)  # fmt: skip
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(-0.2, 70)
    ax.set_xticks([0, 0.5, 1, 10, _X_THRESHOLDED])
    ax.set_xticklabels(["0\nNLL", "0.5", "1\n−p", "10", "thresh.\nNLL τ=0.2"])
    ax.axvline(22, color="grey", linewidth=0.8)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("α of the objective f_α(p) = (1 − p^α)/α")
    ax.set_ylabel("accuracy by greedy generation")
    ax.set_title("After fine-tuning, per task (dotted: base model; ★ adaptive at its mean α)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_arguments(parser)
    # Measured here: with other jobs on the 2 cores, one torch thread trained and decoded ~2x faster than two.
    parser.set_defaults(threads=1)
    parser.add_argument("--model", default=None, help="model to fine-tune (default: embedded; --quick: tiny random)")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="built-in tasks")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVE_KEYS), choices=tuple(ENTRIES))
    # The default budget fits ~40 min on 2 shared CPU cores (measured: ~5 s per step of add/capital, ~12 s of
    # figlet, ~10 s per 50 answers), 3 tasks x 5 objectives. lr x steps matches the earlier 60 steps at 3e-5
    # in which NLL learnt sort's answer format.
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per fine-tune (the budget)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8, help="rows per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    parser.add_argument("--warmup", type=float, default=0.1, help="linear warm-up (fraction of steps), cosine to 0")
    parser.add_argument("--num_train", "--num-train", type=int, default=None,
                        help="training rows per task (default: steps x batch_size, one pass)")
    parser.add_argument("--num_eval", "--num-eval", type=int, default=50, help="held-out rows answered per task")
    parser.add_argument("--noise", nargs="*", default=list(DEFAULT_NOISE),
                        help="TASK=FRACTION of training responses corrupted (a bare number: every task)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="generation budget per answer")
    parser.add_argument("--eval_batch_size", type=int, default=25, help="prompts generated together")
    parser.add_argument("--max_length", type=int, default=256, help="tokens per training row")
    parser.add_argument("--probe_batches", type=int, default=4, help="batches for the base mean p / adaptive start")
    parser.add_argument("--seed", type=int, default=0, help="data, order and noise seed (same for every run)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator (cpu, gpu, auto)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision (32-true on CPU)")
    parser.add_argument("--out", default=None, help="output directory (default: runs/continuum_<time>; --quick: temp)")
    return parser


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; returns the markdown section (also written to ``--out``/continuum.md)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)  # flags given explicitly still win
    args = parser.parse_args(argv)
    args.num_train = args.num_train or args.steps * args.batch_size
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; built-in tasks: {', '.join(TASKS)}")
    if args.out is None:  # a --quick check leaves nothing in the working tree
        stamp = time.strftime("runs/continuum_%Y%m%d_%H%M%S")
        args.out = tempfile.mkdtemp(prefix="bnll_continuum_") if args.quick else stamp
    os.makedirs(args.out, exist_ok=True)
    threads = C.set_threads(args.threads)
    noise = parse_noise(args.noise, args.tasks)
    gpu = args.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    args.device = "cuda" if gpu else "cpu"  # where the base model is measured (the Trainer places the rest)

    load0, start = C.load_average(), time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bnll_continuum_") as work, C.quiet():
        model = args.model or ("embedded" if not args.quick else _tiny(work))
        for task in args.tasks:
            base = measure_base(model, task, args)
            shared = {k: base[k] for k in ("base_mean_p", "base_geometric_mean_p", "zone_p", "zone_accuracy")}
            shared.update(base_accuracy=base["accuracy"], batch_size=args.batch_size, lr=args.lr,
                          num_train=args.num_train, seed=args.seed, model=model_name(args))  # fmt: skip
            runs = (finetune(model, task, ENTRIES[key], args, noise[task]) for key in args.objectives)  # lazy
            for row in itertools.chain([base], runs):
                rows.append({**row, **shared})
                _progress(row, start)
    load1, total = C.load_average(), time.perf_counter() - start

    table = markdown(rows)
    write_csv(rows, os.path.join(args.out, "continuum.csv"))
    plot(rows, os.path.join(args.out, "continuum.png"))
    noisy = ", ".join(f"{t} {f:g}" for t, f in noise.items() if f) or "none"
    conditions = [
        f"model: {model_name(args)}, {args.precision}, {args.accelerator}; every run starts from the same weights",
        f"fine-tune: {args.steps} optimizer steps x {args.batch_size} rows ({args.num_train} training rows per task,"
        f" seed {args.seed}, same order for every objective), AdamW lr {args.lr:g} betas (0.9, 0.95) wd 0.01,"
        f" {args.warmup:g} warm-up then cosine to 0, grad clip 1.0; noise (training responses corrupted): {noisy}",
        f"evaluation: {args.num_eval} distinct prompts per task (the val stream, disjoint from training where the task"
        " has enough rows, topped up with training prompts where it has not: see 'unseen'), greedy, max_new_tokens"
        f" {args.max_new_tokens}, the task's own checker; base mean p: probe of {args.probe_batches} training batches",
        f"zones: by base accuracy (strong >= {STRONG_ACCURACY:g}, weak < {WEAK_ACCURACY:g}) and by mean p"
        " (paper: strong >= 0.5, weak < 0.1); adaptive: AdaptiveAlpha() defaults (other statistics where named)"
        " started from a probe of its statistic,"
        " its α column = mean over the steps (value at the end)",
        f"total wall time {total / 60:.1f} min; outputs in {args.out}",
    ]
    title = "Continuum: accuracy after fine-tuning per task and objective"
    if args.quick:
        title += " (--quick: harness check, not a measurement)"
    text = C.section(title, "continuum.py", argv, threads, table, conditions, load=(load0, load1))
    with open(os.path.join(args.out, "continuum.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    if args.append:
        C.append(text, args.docs)
    return text


def model_name(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    return "tiny random Llama (--quick)" if args.quick else "embedded SmolLM2-135M-Instruct"


def _tiny(work: str) -> str:
    from bnll_lightning.models import make_tiny_model

    return make_tiny_model(os.path.join(work, "tiny"), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _progress(row: dict[str, Any], start: float) -> None:
    alpha = "" if row["alpha"] is None else f" α {row['alpha']:.2f}"
    print(
        f"[continuum {time.perf_counter() - start:6.0f} s] {row['task']:<10} {row['label']:<28}{alpha}: accuracy"
        f" {row['accuracy']:.3f} ({row['correct']}/{row['n']}), train {row['train_seconds']:.0f} s,"
        f" eval {row['eval_seconds']:.0f} s",
        file=sys.stderr, flush=True,
    )


if __name__ == "__main__":
    main()
