"""What a fit prints: a header, the training bar, one line per validation, a summary; the rest with --verbosity all.

:func:`quiet` hides what a run does not need to show (Lightning's INFO lines: devices, tips, the model
summary, seeds; third-party progress bars: GGUF conversion, loading and writing weights; advice-only
warnings) and prints each warning on one line; :func:`restore` undoes it. :class:`ConsoleReport` writes
the header, the validation lines and the summary (the training bar is
:class:`~bnll_lightning.callbacks.StepProgressBar`'s in a terminal, :class:`StepLines`' plain lines when
stdout is a file or a pipe). The CLI uses both unless ``--verbosity all``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from bnll_lightning.models import describe_model

__all__ = ["ConsoleReport", "StepLines", "quiet", "restore", "terminal"]

_undo: list[Callable[[], None]] = []


def _one_line(message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    return f"warning: {message}\n"


def quiet() -> None:
    """Hide what a run's console does not need (see the module docstring), until :func:`restore`."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    bars, hub_bars = transformers_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    filters, format_warning = list(warnings.filters), warnings.formatwarning
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()
    hub.disable_progress_bars()
    warnings.filterwarnings("ignore", category=PossibleUserWarning)  # advice (e.g. "few workers"), not a problem
    warnings.formatwarning = _one_line

    def undo() -> None:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            transformers_logging.enable_progress_bar()
        if hub_bars:
            hub.enable_progress_bars()
        warnings.filters[:] = filters
        warnings.formatwarning = format_warning

    _undo.append(undo)


def restore() -> None:
    """Undo every :func:`quiet`."""
    while _undo:
        _undo.pop()()


def _write(line: str) -> None:
    """A line on stdout that does not tear the training bar."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()  # a log file (block-buffered) shows the line now, not at exit


def _number(value: Any) -> str:
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _metrics(trainer: L.Trainer, prefix: str, only: tuple[str, ...] = ()) -> str:
    """``prefix`` metrics of the run so far (not the per-source ones; ``only`` these names), in a line."""
    items = sorted((k, v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix) and k.count("/") == 1
                   and (not only or k[len(prefix):] in only))  # fmt: skip
    return " · ".join(f"{k} {_number(v)}" for k, v in items)


class ConsoleReport(L.Callback):
    """Rank zero's console during fit: what runs and where it logs (when training starts), one line per
    validation (the step it follows, its time, the ``val/*`` metrics), and at the end the time, the final
    metrics, where the model went and the command that opens TensorBoard."""

    def __init__(self) -> None:
        self._fit_start = self._val_start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # every rank asks: a broadcast under DDP
        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        stats = getattr(data, "stats", None) or {}
        train, val = stats.get("train", {}), stats.get("val", {})
        skipped = sum(v for k, v in train.items() if k.startswith("skipped_"))
        rows = f"{train.get('rows', '?')} training rows" + (f" ({skipped} skipped, see the warning)" if skipped else "")
        rows += f", {val.get('rows', 0)} validation rows" if val else ""
        controller = getattr(pl_module, "alpha_controller", None)
        budget = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        steps = budget or int(trainer.estimated_stepping_batches)
        batch = getattr(data, "batch_size", "?")
        per_step = f"{batch} {'packed sequences' if getattr(data, 'packing', False) else 'rows'}"
        if trainer.accumulate_grad_batches > 1:
            per_step += f" x {trainer.accumulate_grad_batches} micro-batches"
        if trainer.world_size > 1:
            per_step += f" x {trainer.world_size} processes"
        resumed = f", resumed at step {trainer.global_step}" if trainer.ckpt_path else ""
        lines = [
            f"model      {describe_model(pl_module.hparams.get('model', '?'))}",
            f"data       {getattr(data, 'train', '?')}: {rows}",
            f"objective  {pl_module.objective!r}" + (f", α controller {controller!r}" if controller else ""),
            f"training   {steps} optimizer steps of {per_step}{resumed}",
            f"logs       {log_dir}  (tensorboard --logdir {_tensorboard_root(trainer, log_dir)})",
        ]
        _write("\n".join(lines))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        of = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        _write(f"validation after step {trainer.global_step}{of} ({_duration(time.perf_counter() - self._val_start)}):"
               f" {_metrics(trainer, 'val/')}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # every rank asks: a broadcast under DDP
        if not trainer.is_global_zero:
            return
        train = _metrics(trainer, "train/", only=("loss", "nll", "mean_p", "alpha"))
        val = _metrics(trainer, "val/")
        lines = [f"done in {_duration(time.perf_counter() - self._fit_start)}, {trainer.global_step} optimizer steps"
                 + (f": {train}" if train else "") + (f"\n  final  {val}" if val else "")]
        exported = next((getattr(c, "exported", None) for c in trainer.callbacks if getattr(c, "exported", None)), None)
        if exported:
            lines.append(f"model      {exported}")
        if log_dir:
            lines.append(f"logs       tensorboard --logdir {_tensorboard_root(trainer, log_dir)}")
        _write("\n".join(lines))


def terminal() -> bool:
    """Whether stdout is a terminal: where a bar's ``\\r`` redraws overwrite each other (in a file they pile up)."""
    return sys.stdout is not None and sys.stdout.isatty()


class StepLines(L.Callback):
    """The training bar as plain lines, for a stdout that is not a terminal (a log file, a pipe, CI): every
    ``every_n_steps`` optimizer steps and at the last, ``step k/N (elapsed): α … · loss … · mean p …`` with the
    trainer's progress bar's metrics (the CLI disables that bar's drawing there, Lightning's ``disable()``)."""

    def __init__(self, every_n_steps: int | None = None) -> None:
        """
        Args:
            every_n_steps: Optimizer steps between two lines; None: a tenth of the run (at least 1; 50 when
                the run's length is unknown).
        """
        self.every_n_steps = every_n_steps
        self._start, self._last = 0.0, -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._last = time.perf_counter(), trainer.global_step  # a resumed run counts from its step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        total = int(total) if total != float("inf") else None
        every = self.every_n_steps or max(1, (total or 500) // 10)
        if step == self._last or (step % every and step != total) or not trainer.is_global_zero:
            return  # no optimizer step in this micro-batch, not a reporting step, or not rank zero
        self._last = step
        bar = trainer.progress_bar_callback
        metrics = bar.get_metrics(trainer, pl_module) if bar is not None else {}
        shown = " · ".join(f"{k} {_number(v) if isinstance(v, (int, float)) else v}" for k, v in metrics.items())
        _write(f"step {step}/{total or '?'} ({_duration(time.perf_counter() - self._start)})"
               + (f": {shown}" if shown else ""))


def _tensorboard_root(trainer: L.Trainer, log_dir: str | None) -> str:
    """The folder to open TensorBoard on: the logger's root (every run of the job side by side)."""
    return str(getattr(trainer.logger, "save_dir", None) or os.path.dirname(log_dir or "."))
