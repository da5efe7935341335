"""Observation-only Lightning callbacks: they read what :class:`~bnll_lightning.module.SFTModule`
already computed and write it to TensorBoard; they never change training.

* :class:`ProbabilityHistogram` - the distribution of the target tokens' p, every N optimizer steps
  (TensorBoard's HISTOGRAMS / DISTRIBUTIONS tabs, tag ``train/p``).
* :class:`StepProgressBar` - the console's training bar counts optimizer steps out of ``max_steps``.
* :class:`ContinuumLayout` - a CUSTOM SCALARS layout that draws α next to the confidence that
  drives it (``train/alpha``, ``train/mean_p``, ``train/mean_p_ema`` on one chart) and the objective
  next to the NLL of the same tokens.

``SFTModule.configure_callbacks`` adds both (and a ``LearningRateMonitor``) to every fit. Both act
only on :class:`~lightning.pytorch.loggers.TensorBoardLogger` loggers and do nothing otherwise.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = ["ContinuumLayout", "ProbabilityHistogram", "StepProgressBar", "CONTINUUM_LAYOUT"]

# Tags are regular expressions in a custom-scalars layout: anchor them, or "train/mean_p" would
# also pick up "train/mean_p_ema".
CONTINUUM_LAYOUT: dict[str, dict[str, list[Any]]] = {
    "continuum": {
        "alpha vs confidence": ["Multiline", ["^train/alpha$", "^train/mean_p$", "^train/mean_p_ema$"]],
        "loss vs nll": ["Multiline", ["^train/loss$", "^train/nll$"]],
    }
}


def _tensorboard_writers(trainer: L.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of ``trainer`` (none for other loggers)."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


class ProbabilityHistogram(L.Callback):
    """Logs a histogram of the target tokens' probabilities p (tag ``train/p``) every N optimizer steps.

    The values are ``exp(pl_module.last_target_logp)``: the float32 log p of the target tokens of
    the step's last micro-batch on rank zero, which the module keeps anyway, so the histogram costs
    one device-to-host copy every N steps and no extra forward. The step is the one the same
    optimizer step's scalars (``train/mean_p``, ``train/alpha``) are logged at, so the tabs line up.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        """
        Args:
            every_n_steps: Optimizer steps between two histograms, >= 1. The first optimizer step
                (the base model's p) is always included.
        """
        super().__init__()
        if isinstance(every_n_steps, bool) or int(every_n_steps) != every_n_steps or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps = int(every_n_steps)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # Called once per optimizer step (after accumulation); global_step is not yet incremented,
        # which is the step Lightning logs this step's scalars at.
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero:
            return
        logp = getattr(pl_module, "last_target_logp", None)
        writers = _tensorboard_writers(trainer)
        if logp is None or logp.numel() == 0 or not writers:
            return
        p = logp.detach().float().exp().cpu()
        for writer in writers:
            writer.add_histogram("train/p", p, global_step=step)


class ContinuumLayout(L.Callback):
    """Writes a TensorBoard custom-scalars layout at fit start (rank zero only).

    CUSTOM SCALARS tab, section ``continuum``: chart "alpha vs confidence" puts ``train/alpha``
    (α in force), ``train/mean_p`` (the step's mean p) and ``train/mean_p_ema`` (the running
    statistic the adaptive controller reads) on one set of axes (all lie in [0, 1] for α ≤ 1);
    chart "loss vs nll" puts the objective next to the NLL of the same tokens.
    """

    def __init__(self, layout: dict[str, dict[str, list[Any]]] | None = None) -> None:
        """
        Args:
            layout: A ``SummaryWriter.add_custom_scalars`` layout; None uses ``CONTINUUM_LAYOUT``.
        """
        super().__init__()
        self.layout = CONTINUUM_LAYOUT if layout is None else layout

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for writer in _tensorboard_writers(trainer):
            writer.add_custom_scalars(self.layout)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, but the training bar counts optimizer steps out of ``max_steps``.

    The stock bar counts micro-batches of the current epoch against the epoch's length, which reads
    ``8/3`` after a mid-epoch resume and ``3/1`` under gradient accumulation, and restarts every epoch
    of a step-budgeted run. Here the bar is ``step k/max_steps`` with k = ``trainer.global_step``: the
    number TensorBoard, the schedules and the checkpoints count, resumed where the checkpoint stopped.
    Runs budgeted in epochs (``max_steps: -1``) keep the stock bar.
    """

    @staticmethod
    def _by_steps(trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        if self._by_steps(trainer):  # one bar for the whole fit, from where a resumed run stands
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.n = self.train_progress_bar.last_print_n = trainer.global_step
            self._describe(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._by_steps(trainer):
            return super().on_train_epoch_start(trainer, *args)
        self._describe(trainer)

    def _describe(self, trainer: L.Trainer) -> None:
        self.train_progress_bar.set_description(f"epoch {trainer.current_epoch}, step")
        self.train_progress_bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if not self._by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._by_steps(trainer):
            return super().on_train_epoch_end(trainer, pl_module)
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
