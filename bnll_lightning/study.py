"""The study's run loop: a job fine-tuned per objective and seed, every run scored on the same held-out rows.

What ``python -m bnll_lightning study`` (wired in :mod:`bnll_lightning.cli`) and ``benchmarks/continuum.py``
share, so that the loop exists once:

* :class:`StudyModule` - ``SFTModule`` on a copy of a base model loaded once per process, without the
  end-of-fit export; :func:`fine_tune` - a short ``Trainer.fit`` with no logger, checkpoint or validation;
  :func:`answer` - greedy answers scored by a checker; :class:`AlphaTrace` - α and mean p per step;
* :class:`RunsCSV` - one row per finished run, appended at once under a file lock, read back typed;
  :func:`run_missing` - the runs of a plan that the CSV does not hold yet, with the time left projected from
  the runs measured (:func:`projected_per_run`) and a progress bar across runs (an interrupted study continues
  where it stopped);
* the study itself: :func:`objective_args` (overlay names or class paths), :func:`held_out` (validation
  rows never trained on, checked), :class:`Study` (the plan, the CSV rows) run by :class:`InProcessStudy`
  (one process, copies of the base model) or :class:`SubprocessStudy` (a ``fit`` process per run, for
  jobs on several devices or under a distributed strategy; :class:`RunTrace` in it), and :func:`report`
  (table, plot, recommendation).

What a study run leaves on disk, chosen for what reads it later: its CSV row and its answers
(``out/answers/<config>/<objective>-seed<seed>.jsonl``: prompt, the model's answer, the reference, correct; a few
kB), which tell a model that answers wrong from a checker that misreads it. No checkpoint: a run is scored as
soon as it has trained and an interrupted study reruns the whole run, so neither its weights nor its optimizer
state is read again (the in-process Trainer has checkpointing and the logger off; a run's ``fit`` process gets
``--trainer.enable_checkpointing false`` and the study's callbacks instead of the job's, its ModelCheckpoint
included). No export (under FSDP a run is scored from its export, removed once scored). A plain ``fit``, by
contrast, keeps its full checkpoint (weights and optimizer state): ``--ckpt_path last`` resumes from it exactly.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fcntl
import gc
import hashlib
import importlib
import inspect
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch

from bnll_lightning import compare, disk
from bnll_lightning.study_args import DEFAULT_OBJECTIVES
from bnll_lightning.callbacks import GenerationEval
from bnll_lightning.compare import BASE, StudyError
from bnll_lightning.data import SFTDataModule
from bnll_lightning.evaluate import EvalResult, evaluate_generation, write_jsonl
from bnll_lightning.export import HFExport
from bnll_lightning.module import SFTModule
from bnll_lightning.objectives import Objective

__all__ = [
    "DEFAULT_OBJECTIVES",
    "AlphaTrace",
    "InProcessStudy",
    "RunTrace",
    "RunsCSV",
    "StudyModule",
    "SubprocessStudy",
    "answer",
    "fine_tune",
    "held_out",
    "items_string",
    "objective_args",
    "projected_per_run",
    "report",
    "Study",
    "run_missing",
]

# NLL, −p, DFT, the adaptive controller and the ramp: what the continuum study found worth telling apart
# (α = 10 and thresholded NLL collapsed at short budgets; README "Which objective when").
OVERLAYS = Path("configs") / "objectives"
# The settings of the job's trainer a study run keeps; the rest (callbacks, logger, checkpoints, validation,
# the budget) is the study's.
TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision", "accumulate_grad_batches",
                "gradient_clip_val", "gradient_clip_algorithm", "deterministic", "benchmark")  # fmt: skip
STUDY_FIELDS = (
    "config", "objective", "seed", "accuracy", "correct", "n", "items", "alpha_mean", "alpha_end",
    "train_mean_p_first", "train_mean_p_last", "steps", "train_seconds", "eval_seconds", "model", "objective_config",
    "finished",
)  # fmt: skip


# ----------------------------------------------------------------------------- one run


class StudyModule(SFTModule):
    """``SFTModule`` on a copy of an in-memory base model, without the end-of-fit export (HFExport).

    ``base`` maps a model name to ``(tokenizer, model)``: filled by the first module built for that name (or
    by the caller beforehand), copied by every later one, so a study loads the weights once and writes
    no export per run. The name is the key: ``dtype`` and the loading options of later modules are not.
    """

    base: dict[str, tuple[Any, torch.nn.Module]] = {}

    def load_pretrained(self, model: str, dtype: str | None, trust_remote_code: bool,
                        load_in_4bit: bool) -> tuple[Any, torch.nn.Module]:  # fmt: skip
        """A copy, in train mode, of the base model held for ``model`` (loaded now if none is)."""
        if model not in self.base:
            tokenizer, loaded = super().load_pretrained(model, dtype, trust_remote_code, load_in_4bit)
            self.base[model] = (tokenizer, loaded.eval())
        tokenizer, base = self.base[model]
        return tokenizer, copy.deepcopy(base).train()

    def configure_callbacks(self) -> list[L.Callback]:
        return [c for c in super().configure_callbacks() if not isinstance(c, HFExport)]  # no export per run


class AlphaTrace(L.Callback):
    """The α each optimizer step trains with, and the targets' mean and geometric-mean p per step."""

    def __init__(self) -> None:
        self.alphas: list[float] = []
        self.mean_p: list[float] = []
        self.geometric_p: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.objective.alpha is not None:
            self.alphas.append(float(pl_module.objective.alpha))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        stats = pl_module.last_step_stats
        if stats and stats.get("weight"):  # summed row weights: the token count for unweighted data
            self.mean_p.append(stats["p_sum"] / stats["weight"])
            self.geometric_p.append(math.exp(-stats["nll_sum"] / stats["weight"]))

    def summary(self, static_alpha: float | None = None) -> dict[str, Any]:
        """The CSV's trace columns: mean and last α (``static_alpha`` when given), first and last mean p."""
        alphas = self.alphas
        return {
            "alpha_mean": static_alpha if static_alpha is not None else (sum(alphas) / len(alphas) if alphas else None),
            "alpha_end": alphas[-1] if alphas else static_alpha, "alphas": ";".join(f"{a:.3f}" for a in alphas),
            "train_mean_p_first": self.mean_p[0] if self.mean_p else None,
            "train_mean_p_last": self.mean_p[-1] if self.mean_p else None,
            "trace": ";".join(f"{m:.4f},{g:.4f}" for m, g in zip(self.mean_p, self.geometric_p)),
        }  # fmt: skip


def static_alpha(module: SFTModule) -> float | None:
    """The α ``module`` trains with at every step: its objective's, unless a controller moves it (None)."""
    return None if module.alpha_controller is not None else module.objective.alpha


TRACE_FILE = "trace.json"


class RunTrace(AlphaTrace):
    """The callback of a study run in a process of its own (:class:`SubprocessStudy`): besides the
    :class:`AlphaTrace`, the run's steps and its seconds of training and of scoring (validation, where
    GenerationEval answers), written by rank zero to ``trace.json`` in the log directory when the run ends.
    It stops the fit at ``max_steps``, which makes Lightning validate there, and drops the module's export
    unless told to keep it."""

    def __init__(self, export: bool = False) -> None:
        """
        Args:
            export: Keep the module's export: a sharded run's weights are whole only there (the study
                answers with it).
        """
        super().__init__()
        self.export = export
        self.train_seconds = self.eval_seconds = 0.0
        self._started = self._scoring = 0.0
        self._path = ""

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self._path = os.path.join(trainer.log_dir or ".", TRACE_FILE)  # every rank: trainer.log_dir is a broadcast
        if not self.export:  # the study reads the run's predictions; an export would write the whole model per run
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, HFExport)]

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Also when an epoch's end stepped the optimizer on a partial accumulation (then the batch count
        # of val_check_interval comes too late): a requested stop validates at once.
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.train_seconds = time.perf_counter() - self._started - self.eval_seconds

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._scoring = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.eval_seconds += time.perf_counter() - self._scoring

    def teardown(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if trainer.is_global_zero:
            figures = {**self.summary(static_alpha(pl_module)), "steps": trainer.global_step,
                       "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds}  # fmt: skip
            with open(self._path, "w", encoding="utf-8") as f:
                json.dump(figures, f)


# What a study run does not want from a trainer: logs, checkpoints, validation, its own bar, a summary.
RUN_SETTINGS = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip


def fine_tune(module: SFTModule, data: SFTDataModule, max_steps: int, trainer_kwargs: Mapping[str, Any],
              callbacks: Sequence[L.Callback] = (), root_dir: str | None = None) -> tuple[L.Trainer, float]:  # fmt: skip
    """``max_steps`` optimizer steps of ``module`` on ``data`` with the trainer settings ``trainer_kwargs``
    (device, precision, accumulation, clipping); returns the trainer and the seconds the fit took."""
    trainer = L.Trainer(**{**trainer_kwargs, **RUN_SETTINGS}, max_steps=max_steps, callbacks=list(callbacks),
                        default_root_dir=root_dir)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return trainer, time.perf_counter() - start


def answer(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], encoder: Any, checker: Any = None, *,
           max_new_tokens: int = 64, batch_size: int = 16, trainer: L.Trainer | None = None) -> tuple[EvalResult, float]:  # fmt: skip
    """Greedy answers of ``model`` (a module's ``.model`` or the model) to ``rows`` scored by ``checker``,
    and the seconds it took. With ``trainer``: on its device, in its precision (Lightning moves a module
    back to the CPU at the end of fit)."""
    context: Any = contextlib.nullcontext
    if trainer is not None:
        model = trainer.precision_plugin.convert_module(model).to(trainer.strategy.root_device)
        context = trainer.precision_plugin.forward_context
    model = getattr(model, "model", model)
    model.eval()
    start = time.perf_counter()
    with context():
        result = evaluate_generation(model, tokenizer, rows, encoder, checker, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size)  # fmt: skip
    return result, time.perf_counter() - start


def items_string(result: EvalResult) -> str:
    """Per-item correctness, in evaluation order: '1' right, '0' wrong (greedy: one answer per item)."""
    return "".join("1" if p["correct"] else "0" for p in result.predictions)


def items_array(items: str) -> np.ndarray:
    """:func:`items_string` back to a 0/1 array."""
    return np.frombuffer(items.encode(), dtype=np.uint8) - ord("0")


@contextlib.contextmanager
def lightning_quiet() -> Any:
    """Lightning's per-fit INFO lines (devices, tips, "max_steps reached") off while runs follow each other."""
    import logging

    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _free(module: Any = None) -> None:
    """Collect finished runs (module <-> trainer cycles hold a model copy and its optimizer state; call it
    where they are unreachable); ``module``: moved off the accelerator first."""
    if module is not None:
        module.cpu()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the CSV (append, resume)


class RunsCSV:
    """One row per finished run, appended under an exclusive lock (processes may share the file), read
    back with numbers parsed. A file written before columns were added at the end gets the new header."""

    def __init__(self, path: str | Path, fields: Sequence[str], numeric: Iterable[str] = (),
                 integer: Iterable[str] = ()) -> None:  # fmt: skip
        """
        Args:
            path: The CSV file (created with its header by the first append).
            fields: Its columns, in order; a row's other keys are not written.
            numeric: Columns read back as float (empty cells as None).
            integer: Columns read back as int (empty cells as None).
        """
        self.path, self.fields = str(path), tuple(fields)
        self.numeric, self.integer = set(numeric), set(integer)

    def append(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` and sync it to disk before returning."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a+", newline="", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                f.seek(0)
                header = f.readline().rstrip("\r\n").split(",")
                if header != [""] and header != list(self.fields):
                    self._widen_header(f, header)
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    writer.writeheader()
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in self.fields})
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _widen_header(self, f: Any, header: list[str]) -> None:
        if header != list(self.fields[: len(header)]):
            raise ValueError(f"{f.name}: columns {header} are not a prefix of {list(self.fields)}; use another --out")
        f.seek(0)
        body = f.read().split("\n", 1)[1]
        f.seek(0)
        f.truncate()
        f.write(",".join(self.fields) + "\r\n" + body)

    def read(self, config: str | None = None) -> list[dict[str, Any]]:
        """The rows (of ``config`` if given: the ``config`` column), numbers parsed, empty cells None."""
        if not os.path.exists(self.path):
            return []
        rows = []
        with open(self.path, newline="", encoding="utf-8") as f:
            for raw in csv.DictReader(f):
                row: dict[str, Any] = dict(raw)
                for k in self.numeric | self.integer:
                    if k in row:
                        row[k] = None if row[k] in ("", None) else (int(row[k]) if k in self.integer else float(row[k]))
                if config is None or row.get("config") == config:
                    rows.append(row)
        return rows


def projected_per_run(seconds: Sequence[float]) -> float:
    """Seconds a run will take, from the runs of this process so far (wall time, each whole): their mean, the
    first left out once there are others, since it pays the process's warm-up (the first fit and generation).
    A study told 56 s per run (then: a 2-step pilot scaled up, plus the base model's scoring) took 26 s, then 18 s."""
    later = seconds[1:] or seconds
    return sum(later) / len(later)


def duration(seconds: float) -> str:
    """``90 s``, ``12 min``, ``3 h 05 min``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def run_missing(plan: Sequence[Hashable], done: set[Hashable], run: Callable[[Any], dict[str, Any]], csv_file: RunsCSV,
                *, name: str, per_run_seconds: float | None = None,
                describe: Callable[[Any, dict[str, Any]], str] | None = None, shard: tuple[int, int] | None = None,
                progress: bool = True, clock: Callable[[], float] = time.perf_counter) -> int:  # fmt: skip
    """Run the runs of ``plan`` not in ``done`` (of this shard: every N-th from the K-th, for shards
    started together), appending each row as it finishes; returns how many ran.

    Prints the count first, with the time projected from ``per_run_seconds`` (runs measured before, e.g. the
    CSV's) if given, and after each run the time left, projected from the runs measured by ``clock`` so far
    (:func:`projected_per_run`); a bar across runs.
    """
    from tqdm import tqdm

    left = [key for key in plan if key not in done]
    k, n = shard or (0, 1)
    todo = left[k::n]  # shards started together read the same CSV, so they split the same list
    where = f"shard {k}/{n}: " if shard is not None else ""
    projected = (f"projected {duration(len(todo) * per_run_seconds)} at ~{per_run_seconds:.0f} s per run"
                 if per_run_seconds else "the time left is projected after the first run")  # fmt: skip
    print(f"[{name}] {where}{len(todo)} of the {len(left)} runs left to do ({len(plan) - len(left)} in the CSV)"
          + (f"; {projected}" if todo else ""), file=sys.stderr, flush=True)  # fmt: skip
    bar = tqdm(todo, desc=f"{name} {k}/{n}" if shard else name, unit="run", file=sys.stderr, disable=not progress)
    seconds: list[float] = []
    for number, key in enumerate(bar, 1):
        bar.set_postfix_str(" ".join(map(str, key)) if isinstance(key, tuple) else str(key))
        start = clock()
        row = run(key)
        _free()
        csv_file.append(row)
        seconds.append(clock() - start)
        if describe is not None:
            tqdm.write(describe(key, row), file=sys.stderr)
        if number < len(todo):
            per_run = projected_per_run(seconds)
            runs = len(todo) - number
            tqdm.write(f"[{name}] {where}{runs} run{'s' if runs > 1 else ''} left: ~{duration(runs * per_run)}"
                       f" at ~{per_run:.0f} s per run (measured)", file=sys.stderr)  # fmt: skip
    return len(todo)


# ----------------------------------------------------------------------------- the study: inputs


def overlay_dirs() -> list[Path]:
    """Where overlay names are looked up: ``configs/objectives`` of the working directory, then the
    project's own (next to the package)."""
    dirs = [Path.cwd() / OVERLAYS, Path(__file__).resolve().parents[1] / OVERLAYS]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def objective_args(name: str) -> list[str]:
    """The command-line arguments that put objective ``name`` on top of a job config: an overlay of
    ``configs/objectives/`` (``nll``, ``dft``, ...), a YAML file, or the class path of an Objective
    (no controller). Each starts without a warm start (the adaptive overlay sets its own)."""
    reset = "--model.warm_start_batches=0"
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return [reset, "--config", name]
    for folder in overlay_dirs():
        if (folder / f"{name}.yaml").is_file():
            return [reset, "--config", str(folder / f"{name}.yaml")]
    if "." in name:
        module, _, cls = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), cls, None)
        except ImportError:
            found = None
        if isinstance(found, type) and issubclass(found, Objective):
            return [f"--model.objective={name}", "--model.alpha_controller=null", reset]
    names = sorted({p.stem for d in overlay_dirs() for p in d.glob("*.yaml")})
    raise StudyError(f"--objectives: unknown objective {name!r}: not an overlay of configs/objectives "
                     f"({', '.join(names) or 'none found'}) nor the class path of an Objective "
                     "(e.g. bnll_lightning.objectives.DFT)")  # fmt: skip


def objective_key(name: str) -> str:
    """The table's name for ``name``: the overlay's stem, or the class's name."""
    if name.endswith((".yaml", ".yml")):
        return Path(name).stem
    return name.rpartition(".")[2] if "." in name else name


def _prompt_key(row: Mapping[str, Any]) -> str:
    """What a row asks: its prompt, or its conversation up to the last assistant turn."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    messages = list(row.get("messages") or [])
    while messages and messages[-1].get("role") == "assistant":
        messages.pop()
    return json.dumps(messages, sort_keys=True)


def held_out(data: SFTDataModule, n: int) -> tuple[SFTDataModule, list[dict[str, Any]]]:
    """The (set up) data module and the first ``n`` rows of its validation split, none of whose prompts
    is a training row's.

    Without ``data.val`` the rows come out of the job's own data: a built-in task generates ``n`` of them
    from its validation stream, file data holds out a larger fraction when ``val_fraction`` gives too few
    (the data module is rebuilt from the job's arguments with that one changed).
    """
    if n < 1:
        raise StudyError(f"--val_rows must be >= 1, got {n}")
    data.setup("fit")
    rows = data.raw_rows("val")
    if len(rows) < n and data.val is None:
        data = _hold_out_more(data, n)
        rows = data.raw_rows("val")
    if len(rows) < n:
        where = f"data.val ({data.val})" if data.val is not None else f"the rows held out of data.train ({data.train})"
        raise StudyError(f"--val_rows {n}: {where} gives only {len(rows)} usable rows; lower --val_rows"
                         + (" or give data.val more rows" if data.val is not None else " or set data.val"))
    rows = rows[:n]
    trained = {_prompt_key(r) for r in data.raw_rows("train")}
    seen = [r for r in rows if _prompt_key(r) in trained]
    if seen:
        raise StudyError(f"{len(seen)} of the {n} held-out rows ask a prompt that a training row asks too (first: "
                         f"{_prompt_key(seen[0])[:60]!r}): accuracy there would measure memory; deduplicate "
                         "the data or set data.val to rows training never sees")  # fmt: skip
    return data, rows


def _hold_out_more(data: SFTDataModule, n: int) -> SFTDataModule:
    """``data`` rebuilt so that its validation split has about ``n`` rows (see :func:`held_out`)."""
    changes: dict[str, Any] = {}
    train = data.raw_rows("train")
    if any("source" not in r for r in train):  # generated rows (built-in tasks) carry no source
        changes["num_val"] = max(n, data.num_val)
    if any("source" in r for r in train):  # file or hub rows: a larger fraction of them
        total = data.stats["train"]["rows_in"] + data.stats["val"]["rows_in"]
        fraction = (n + len(data.val_sources) + 1) / max(total, 1)
        if fraction > 0.5:
            raise StudyError(f"--val_rows {n}: data.train ({data.train}) holds {total} rows; holding {n} out would "
                             "leave fewer than half to train on; lower --val_rows or set data.val")
        changes["val_fraction"] = max(fraction, data.val_fraction)
    accepted = inspect.signature(SFTDataModule.__init__).parameters  # hparams also hold the CLI's bookkeeping
    args = {k: v for k, v in data.hparams.items() if k in accepted}
    rebuilt = SFTDataModule(**{**args, **changes}, tokenizer=data.tokenizer)
    rebuilt.setup("fit")
    print(f"[study] held out of the job's data for scoring: {', '.join(f'data.{k} {v:g}' for k, v in changes.items())}",
          file=sys.stderr, flush=True)  # fmt: skip
    return rebuilt


def config_key(*parts: Any) -> str:
    """What makes two runs comparable (a rerun with the same key skips finished runs): a hash of ``parts``."""
    blob = json.dumps(parts, sort_keys=True, default=_stable)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _stable(value: Any) -> str:
    """A value JSON cannot write, as text that is the same in every process (a function by its name)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    return str(value)


# ----------------------------------------------------------------------------- the study: runs


class Study:
    """The runs of one study: every (objective, seed) and the base model, each appended to ``out/study.csv``
    as it finishes, its answers kept in :meth:`answers_path`; runs the CSV already holds for the same ``config``
    are skipped. How a run is made is the subclass's (:meth:`measure`): :class:`InProcessStudy`,
    :class:`SubprocessStudy`."""

    def __init__(
        self,
        objectives: Sequence[str],
        seeds: Sequence[int],
        rows: Sequence[dict[str, Any]],
        out: str | Path,
        config: str,
        *,
        max_steps: int,
        checker: Any = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        objective_configs: Mapping[str, Mapping[str, Any]] | None = None,
        model: str = "",
        progress: bool = True,
    ) -> None:
        """
        Args:
            objectives: The objectives' names, in the table's order.
            seeds: Each objective runs once per seed: the training order and the global RNGs.
            rows: The held-out rows every run answers (:func:`held_out`).
            out: Folder of ``study.csv``.
            config: What makes runs comparable (:func:`config_key`): the CSV's rows of another are not reused.
            max_steps: Optimizer steps per run.
            checker: Answer checker (a name of :data:`~bnll_lightning.evaluate.CHECKERS`; None: auto).
            max_new_tokens: Generation budget per answer (greedy).
            batch_size: Prompts generated together.
            objective_configs: objective -> its ``model:`` keys, saved with its runs (for the recommendation).
            model: The base model's name, saved with the runs.
            progress: Show the bar across runs.
        """
        self.objectives, self.seeds, self.rows, self.config = list(objectives), list(seeds), list(rows), config
        self.max_steps, self.checker = max_steps, checker
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.objective_configs, self.model, self.progress = dict(objective_configs or {}), model, progress
        self.out = Path(out)
        self.table = RunsCSV(self.out / "study.csv", STUDY_FIELDS, numeric=("accuracy", "alpha_mean", "alpha_end",
                             "train_mean_p_first", "train_mean_p_last", "train_seconds", "eval_seconds"),
                             integer=("seed", "correct", "n", "steps"))  # fmt: skip

    def plan(self) -> list[tuple[str, int]]:
        """Every fine-tuning run, seed by seed (an interrupted study holds whole seeds)."""
        return [(key, seed) for seed in self.seeds for key in self.objectives]

    def run(self) -> list[dict[str, Any]]:
        """Score the base model, run what is missing; returns the CSV's rows of this config. The time left is
        projected from the runs measured (the CSV's, then this session's): the base model's scoring is not a
        run's (it rambles to the token limit) and a short pilot paid the first fit's warm-up for nothing."""
        with lightning_quiet():
            done = {(r["objective"], r["seed"]) for r in self.table.read(self.config)}
            if (BASE, None) not in done:
                print("[study] scoring the base model", file=sys.stderr, flush=True)
                row = self.run_one((BASE, None))
                self.table.append(row)
                print(_describe((BASE, None), row), file=sys.stderr, flush=True)
                _free()
            rows = self.table.read(self.config)
            measured = [r["train_seconds"] + r["eval_seconds"] for r in rows if r["objective"] != BASE]
            run_missing(self.plan(), done, self.run_one, self.table, name="study",
                        per_run_seconds=sum(measured) / len(measured) if measured else None, describe=_describe,
                        progress=self.progress)  # fmt: skip
        return self.table.read(self.config)

    def answers_path(self, objective: str, seed: int | None) -> Path:
        """Where a run's answers are kept: ``out/answers/<config>/<objective>-seed<seed>.jsonl`` (the base model:
        ``base.jsonl``), one GenerationEval record per held-out row (prompt, prediction, answer, correct)."""
        name = BASE if objective == BASE else f"{objective}-seed{seed}"
        return self.out / "answers" / self.config / f"{name}.jsonl"

    def run_one(self, key: tuple[str, int | None]) -> dict[str, Any]:
        """One run's CSV row: fine-tune with ``key``'s objective and seed and score it (the base model:
        scored only); its answers kept. The row's ``on_disk`` (not a CSV column) says what the run left."""
        objective, seed = key
        figures, items = self.measure(objective, seed)
        if objective != BASE:
            figures["objective_config"] = json.dumps(self.objective_configs.get(objective))
        correct = items.count("1")
        return {"config": self.config, "objective": objective, "seed": seed, "model": self.model, **figures,
                "accuracy": correct / len(items), "correct": correct, "n": len(items), "items": items,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "on_disk": disk.one_line(self.left_by(objective, seed))}  # fmt: skip

    def left_by(self, objective: str, seed: int | None) -> dict[str, Path]:
        """Where a run leaves files: its answers."""
        return {"answers": self.answers_path(objective, seed)}

    def measure(self, objective: str, seed: int | None) -> tuple[dict[str, Any], str]:
        """One run's figures (``steps``, ``train_seconds``, ``eval_seconds``; a fine-tuned run also the
        :meth:`AlphaTrace.summary`) and its :func:`items_string` on the held-out rows, its answers written to
        :meth:`answers_path`; ``objective`` :data:`BASE`: the base model, scored only."""
        raise NotImplementedError


class InProcessStudy(Study):
    """A study in this process: every run trains a copy of the base model held in memory (loaded once), with
    no logs, checkpoints or exports, on one device: a run leaves its answers only."""

    def __init__(self, make_module: Callable[[str], SFTModule], data: SFTDataModule, trainer_kwargs: Mapping[str, Any],
                 *args: Any, **kwargs: Any) -> None:  # fmt: skip
        """
        Args:
            make_module: objective -> a fresh module on a copy of the in-memory base (:class:`StudyModule`).
            data: The job's data module, set up: its split and noise are fixed, every run trains on it.
            trainer_kwargs: The job's trainer settings a run keeps (:data:`TRAINER_KEYS`).
            args, kwargs: :class:`Study`'s.
        """
        super().__init__(*args, **kwargs)
        self.make_module, self.data, self.trainer_kwargs = make_module, data, dict(trainer_kwargs)
        self.root = str(self.out / "work")

    def score(self, module: SFTModule, trainer: L.Trainer) -> tuple[EvalResult, float]:
        """``module``'s greedy answers to the held-out rows, on the trainer's device and precision."""
        return answer(module, module.tokenizer, self.rows, self.data, self.checker,
                      max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, trainer=trainer)  # fmt: skip

    def measure(self, objective: str, seed: int | None) -> tuple[dict[str, Any], str]:
        if objective == BASE:
            module = self.make_module(self.objectives[0])
            trainer = L.Trainer(**{**self.trainer_kwargs, **RUN_SETTINGS}, default_root_dir=self.root)
            result, seconds = self.score(module, trainer)
            figures: dict[str, Any] = {"steps": 0, "train_seconds": 0.0, "eval_seconds": seconds}
        else:
            L.seed_everything(seed, verbose=False)
            self.data.seed = seed  # the training order (the sampler reads it when fit builds the loader); split fixed
            module, trace = self.make_module(objective), AlphaTrace()
            trainer, train_seconds = fine_tune(module, self.data, self.max_steps, self.trainer_kwargs, [trace],
                                               self.root)  # fmt: skip
            result, seconds = self.score(module, trainer)
            figures = {**trace.summary(static_alpha(module)), "steps": trainer.global_step,
                       "train_seconds": train_seconds, "eval_seconds": seconds}  # fmt: skip
        _free(module)
        write_jsonl(str(self.answers_path(objective, seed)), result.predictions)
        return figures, items_string(result)


class SubprocessStudy(Study):
    """A study whose every run is a ``python -m bnll_lightning fit`` process of its own, for jobs on several
    devices or under a distributed strategy (DDP, FSDP), which Lightning launches from that process as it
    does for ``fit``.

    Every run gets the job's config with the objective's overlay (``out/work/<objective>.yaml``, written
    once) and, on the command line (:meth:`command`), the study's settings: the seed, ``max_steps``, the
    training and held-out rows written once to ``out/work/{train,val}.jsonl`` (the split and noise of the
    job, as :class:`InProcessStudy` trains them), no logger, checkpoint or export, and one validation after
    the last step in which GenerationEval answers the held-out rows into ``predictions/step_N.jsonl`` of the
    run's folder ``out/runs/seed_<seed>/<objective>`` (the base model: ``validate``, in ``out/runs/base``).
    The row is read from there with :func:`compare.read_run` and from :class:`RunTrace`'s ``trace.json``.

    Under a sharded strategy (FSDP, FSDP2) GenerationEval cannot generate: the run exports instead and
    ``python -m bnll_lightning evaluate`` answers the rows with the export on one device
    (:meth:`evaluate_command`; the base model: with the job's model), which is removed once scored.
    """

    def __init__(self, configs: Mapping[str, str], data: SFTDataModule, accumulate_grad_batches: int, sharded: bool,
                 *args: Any, **kwargs: Any) -> None:  # fmt: skip
        """
        Args:
            configs: objective -> the job's config with its overlay, as YAML that ``fit`` reads (every
                objective of the study; the first also scores the base model).
            data: The job's data module, set up (after :func:`held_out`): its rows are written once.
            accumulate_grad_batches: The job's: batches per optimizer step, for the validation's schedule.
            sharded: Whether the job's strategy shards the weights (scoring by ``evaluate`` of an export).
            args, kwargs: :class:`Study`'s.
        """
        super().__init__(*args, **kwargs)
        self.configs, self.data, self.accumulate, self.sharded = dict(configs), data, accumulate_grad_batches, sharded
        self.work = self.out / "work"

    def run(self) -> list[dict[str, Any]]:
        self.work.mkdir(parents=True, exist_ok=True)
        for objective, text in self.configs.items():
            (self.work / f"{objective}.yaml").write_text(text, encoding="utf-8")
        for split in ("train", "val"):
            rows = self.data.raw_rows("train") if split == "train" else self.rows
            with open(self.work / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
        return super().run()

    def run_dir(self, objective: str, seed: int | None) -> Path:
        """The run's log directory: ``out/runs/seed_<seed>/<objective>`` (what ``compare`` reads) or
        ``out/runs/base``."""
        return self.out / "runs" / (BASE if objective == BASE else f"seed_{seed}/{objective}")

    def job_args(self, objective: str, seed: int) -> list[str]:
        """What every process of a run reads: the objective's config (the base model: the first's) and the
        rows as written (noise already applied, weights under ``weight``, none cut), ordered by ``seed``."""
        config = self.objectives[0] if objective == BASE else objective
        return ["--config", str(self.work / f"{config}.yaml"), "--seed_everything", str(seed),
                "--data.train", str(self.work / "train.jsonl"), "--data.val", str(self.work / "val.jsonl"),
                "--data.noise", "0", "--data.weight_column", "weight", "--data.max_rows", "null",
                "--data.seed", str(seed), "--trainer.logger", "false"]  # fmt: skip

    def command(self, objective: str, seed: int | None) -> list[str]:
        """The command of one run: ``fit`` of ``max_steps`` optimizer steps with ``objective``'s config, scored
        by GenerationEval after the last step; ``objective`` :data:`BASE`: ``validate`` of the base model.
        Sharded: the run exports instead of scoring."""
        seed = 0 if seed is None else seed
        steps = self.max_steps
        scored, run_dir = not self.sharded, self.run_dir(objective, seed)
        callbacks: list[dict[str, Any]] = [{"class_path": f"{RunTrace.__module__}.RunTrace",
                                            "init_args": {"export": self.sharded}}]  # fmt: skip
        if scored:
            generation = {"checker": self.checker, "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size}
            callbacks.append({"class_path": f"{GenerationEval.__module__}.GenerationEval", "init_args": generation})
        args = [
            *self.job_args(objective, seed), "--trainer.default_root_dir", str(run_dir),
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", json.dumps(callbacks), "--trainer.num_sanity_val_steps", "0",
            "--trainer.limit_val_batches", "1" if scored else "0",  # the val loss of one batch; GenerationEval all rows
            "--model.export_dir", str(run_dir / "hf_model"),  # a sharded run's export: its own, not the job's
        ]  # fmt: skip
        if objective == BASE:
            return [sys.executable, "-m", "bnll_lightning", "validate", *args]
        # One validation, after the last step: no periodic ones before it (RunTrace stops the fit there).
        return [sys.executable, "-m", "bnll_lightning", "fit", *args, "--trainer.max_steps", str(steps),
                "--trainer.max_epochs", "-1", "--trainer.check_val_every_n_epoch", "null",
                "--trainer.val_check_interval", str(steps * self.accumulate)]  # fmt: skip

    def evaluate_command(self, objective: str, seed: int | None, steps: int) -> list[str]:
        """Sharded strategies: the command that answers the held-out rows with the run's export (the base
        model: the job's model) on one device of the job's accelerator, into ``predictions/step_<steps>.jsonl``."""
        seed = 0 if seed is None else seed
        run_dir = self.run_dir(objective, seed)
        model = [] if objective == BASE else ["--model.model", str(run_dir / "hf_model")]
        checker = [] if self.checker is None else ["--checker", str(self.checker)]
        return [sys.executable, "-m", "bnll_lightning", "evaluate", *self.job_args(objective, seed), *model,
                "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.strategy", "auto",
                "--trainer.callbacks", "[]", "--split", "val", *checker, "--max_new_tokens", str(self.max_new_tokens),
                "--batch_size", str(self.batch_size), "--temperature", "0", "--num_samples", "1", "--show", "0",
                "--output", str(run_dir / "predictions" / f"step_{steps}.jsonl")]  # fmt: skip

    def launch(self, command: list[str], log: Path, name: str) -> None:
        """Run ``command`` with its output appended to ``log``; a failure raises :class:`StudyError` naming
        the run (``name``), its last line and its log."""
        with open(log, "a", encoding="utf-8") as f:
            f.write(shlex.join(command) + "\n")
            f.flush()
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
        if code != 0:
            text = log.read_text(encoding="utf-8", errors="replace")
            last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")
            raise StudyError(f"run {name} failed (exit {code}): {last[:200]}; log: {log}")

    def run_processes(self, objective: str, seed: int | None) -> dict[str, Any]:
        """Run :meth:`command` (sharded, then :meth:`evaluate_command`) in a fresh run directory; the
        :class:`RunTrace` figures."""
        run_dir = self.run_dir(objective, seed)
        log = run_dir / "study.log"
        name = "base model" if objective == BASE else f"{objective} seed {seed}"
        shutil.rmtree(run_dir, ignore_errors=True)  # what a failed attempt left
        run_dir.mkdir(parents=True)
        figures: dict[str, Any] = {"steps": 0, "train_seconds": 0.0}  # sharded, the base model is only evaluated
        if not (self.sharded and objective == BASE):
            self.launch(self.command(objective, seed), log, name)
            figures = json.loads((run_dir / TRACE_FILE).read_text(encoding="utf-8"))
        if self.sharded:
            start = time.perf_counter()
            self.launch(self.evaluate_command(objective, seed, figures["steps"]), log, name)
            figures["eval_seconds"] = time.perf_counter() - start  # its process: the export's loading included
            shutil.rmtree(run_dir / "hf_model", ignore_errors=True)
        return figures

    def measure(self, objective: str, seed: int | None) -> tuple[dict[str, Any], str]:
        figures = self.run_processes(objective, seed)
        run_dir = self.run_dir(objective, seed)
        run = compare.read_run(run_dir)
        if len(run.scores) != len(self.rows):
            raise StudyError(f"{run_dir}: {len(run.scores)} rows scored, not the {len(self.rows)} held out; log: "
                             f"{run_dir / 'study.log'}")  # fmt: skip
        answers = self.answers_path(objective, seed)
        answers.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.path, answers)  # beside the other runs' answers, in every study's layout
        if objective == BASE:
            figures = {k: figures[k] for k in ("steps", "train_seconds", "eval_seconds")}
        return figures, "".join("1" if s == 1 else "0" for s in run.scores)

    def left_by(self, objective: str, seed: int | None) -> dict[str, Path]:
        """Where a run leaves files: its answers and its run directory (log, trace, predictions)."""
        return {**super().left_by(objective, seed), "run": self.run_dir(objective, seed)}


def _describe(key: tuple[str, int | None], row: dict[str, Any]) -> str:
    return (f"  {key[0]:<12} seed {key[1]!s:<4} accuracy {row['accuracy']:.3f} ({row['correct']}/{row['n']}; "
            f"{row['train_seconds']:.0f} s training + {row['eval_seconds']:.0f} s scoring)"
            + (f"; on disk {row['on_disk']}" if row.get("on_disk") else ""))  # fmt: skip


# ----------------------------------------------------------------------------- the study: report


def scores_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[Hashable, np.ndarray]]:
    """objective -> seed -> 0/1 items, from the study's CSV rows (the base model under seed None)."""
    out: dict[str, dict[Hashable, np.ndarray]] = {}
    for r in rows:
        out.setdefault(r["objective"], {})[r["seed"]] = items_array(r["items"])
    return out


def reference_of(objective_configs: Mapping[str, Mapping[str, Any] | None]) -> str | None:
    """The objective that is plain NLL (no controller): the reference of the differences."""
    for key, cfg in objective_configs.items():
        objective = (cfg or {}).get("objective") or {}
        if str(objective.get("class_path", "")).endswith(".NLL") and not (cfg or {}).get("alpha_controller"):
            return key
    return None


def report(rows: Sequence[Mapping[str, Any]], objectives: Sequence[str], out: str | Path, *, resamples: int = 4000,
           note: str = "") -> tuple[compare.Comparison, str]:  # fmt: skip
    """Table (``study.md``), plot (``study.png``) and recommendation (``recommendation.yaml``) in ``out`` from
    the study's CSV rows; returns the comparison and the text printed."""
    rows = [r for r in rows if r["objective"] in (BASE, *objectives)]
    configs = {r["objective"]: json.loads(r["objective_config"]) for r in rows
               if r["objective"] != BASE and r.get("objective_config")}  # fmt: skip
    result = compare.summarize(scores_of(rows), reference=reference_of(configs), resamples=resamples)
    table = compare.markdown(result)
    yaml_text = compare.recommendation(result, configs, note)
    out = Path(out)
    (out / "study.md").write_text(table + "\n", encoding="utf-8")
    (out / "recommendation.yaml").write_text(yaml_text, encoding="utf-8")
    plotted = compare.plot(result, out / "study.png")
    files = ["study.csv", "study.md", "recommendation.yaml"] + (["study.png"] if plotted else [])
    files += sorted({f"answers/{r['config']}/ (each run's answers)" for r in rows
                     if (out / "answers" / r["config"]).is_dir()})  # fmt: skip
    text = "\n".join([table, "", yaml_text, f"files in {out}: {', '.join(files)}"
                      + ("" if plotted else " (no plot: pip install matplotlib)")])  # fmt: skip
    return result, text
