"""Lightning callbacks, none of which changes training: accuracy by generation, and TensorBoard observers.

* :class:`GenerationEval` - ``val/accuracy`` (with sampling ``val/pass@k``, ``val/maj@n``) at validation
  end, predictions in ``predictions/step_<N>.jsonl`` of the log directory (add it to ``trainer.callbacks``;
  generation and checkers are :mod:`bnll_lightning.evaluate`'s).
* :class:`ProbabilityHistogram` - the distribution of the target tokens' p, every N optimizer steps
  (TensorBoard's HISTOGRAMS / DISTRIBUTIONS tabs, tag ``train/p``).
* :class:`StepProgressBar` - the console's training bar counts optimizer steps out of ``max_steps``.
* :class:`StepLearningRateMonitor` - the learning rate, once per optimizer step (``lr-<optimizer>/pg<N>``).
* :class:`ContinuumLayout` - a CUSTOM SCALARS layout that draws α next to the confidence that
  drives it (``train/alpha``, ``train/mean_p``, ``train/statistic_ema`` on one chart) and the objective
  next to the NLL of the same tokens.

``SFTModule.configure_callbacks`` adds ProbabilityHistogram and ContinuumLayout (both act only on
:class:`~lightning.pytorch.loggers.TensorBoardLogger` loggers) and StepLearningRateMonitor to every fit.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.aggregation import MeanMetric, SumMetric

from bnll_lightning.evaluate import EvalResult, GenerationArgs, evaluate_generation, get_checker, write_jsonl
from bnll_lightning.strategies import is_sharded

__all__ = ["ContinuumLayout", "GenerationEval", "ProbabilityHistogram", "StepLearningRateMonitor", "StepProgressBar",
           "CONTINUUM_LAYOUT"]

# Tags are regular expressions in a custom-scalars layout, matched anywhere in a name: anchored, each
# draws exactly its tag (a future "train/mean_p_..." stays off the chart).
CONTINUUM_LAYOUT: dict[str, dict[str, list[Any]]] = {
    "continuum": {
        "alpha vs confidence": ["Multiline", ["^train/alpha$", "^train/mean_p$", "^train/statistic_ema$"]],
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
        # which is the step Lightning logs this step's scalars at. It reads what the last training_step
        # kept, which the module's own hook leaves alone: the two hooks may run in either order.
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
    (α in force), ``train/mean_p`` (the step's mean p) and ``train/statistic_ema`` (the EMA of
    the statistic the adaptive controller reads: the median p by default) on one set of axes (all lie in [0, 1] for α ≤ 1);
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
    Runs budgeted in epochs (``max_steps: -1``) keep the stock bar. It shows α, the loss and the mean p
    of the last step; validation gets no bar of its own (one line each, from
    :class:`~bnll_lightning.console.ConsoleReport`), unless ``validation_bars``.
    """

    def __init__(self, validation_bars: bool = False) -> None:
        """
        Args:
            validation_bars: Lightning's validation and sanity-check bars and every metric on the bar (the
                CLI's ``--verbosity all``).
        """
        super().__init__()
        self.validation_bars = validation_bars

    def init_validation_tqdm(self) -> Tqdm:
        return super().init_validation_tqdm() if self.validation_bars else Tqdm(disable=True)

    def init_sanity_tqdm(self) -> Tqdm:
        return super().init_sanity_tqdm() if self.validation_bars else Tqdm(disable=True)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if self.validation_bars:
            return metrics
        shown = {"alpha": "α", "loss": "loss", "p": "mean p"}  # the module's bar values, in this order
        return {label: metrics[key] for key, label in shown.items() if key in metrics}

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


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor(logging_interval="step")``, logging once per optimizer step.

    Lightning's logs at every micro-batch, at the step count, so under gradient accumulation each
    step's learning rate was written once per micro-batch (3 points at one step with
    ``accumulate_grad_batches: 3``). Here only the first micro-batch of a step logs: the rate the
    step's update uses (the schedule moves after the update).
    """

    def __init__(self, log_momentum: bool = False, log_weight_decay: bool = False) -> None:
        """
        Args:
            log_momentum: Also log the optimizer's momentum (or Adam's beta1).
            log_weight_decay: Also log the weight decay.
        """
        super().__init__(logging_interval="step", log_momentum=log_momentum, log_weight_decay=log_weight_decay)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                             *args: Any, **kwargs: Any) -> None:  # fmt: skip
        if batch_idx % trainer.accumulate_grad_batches == 0:  # Lightning's windows start at each epoch's batch 0
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx, *args, **kwargs)


def _logged_step(trainer: L.Trainer) -> int:
    """The step TensorBoard files this validation's scalars under. Lightning logs by the count of
    finished optimizer steps *before* the current one is counted (so validation after the 15th step
    is filed at 14, beside that step's training scalars); ``global_step`` already says 15."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


def _all_ranks(metric: MeanMetric | SumMetric, device: torch.device, value: float, weight: float = 1.0) -> float:
    """``value`` of this rank (a mean over ``weight`` items for ``MeanMetric``) combined with every other
    rank's by torchmetrics (a rank without items passes weight 0)."""
    metric = metric.to(device).set_dtype(torch.float64)
    args = () if isinstance(metric, SumMetric) else (torch.tensor(float(weight), dtype=torch.float64, device=device),)
    metric.update(torch.tensor(float(value), dtype=torch.float64, device=device), *args)
    return float(metric.compute())


class GenerationEval(L.Callback):
    def __init__(
        self,
        every_n_val: int = 1,
        num_rows: int | None = None,
        max_new_tokens: int = GenerationArgs.max_new_tokens,
        batch_size: int = GenerationArgs.batch_size,
        checker: str | None = None,
        predictions_file: bool = True,
        temperature: float = GenerationArgs.temperature,
        top_p: float = GenerationArgs.top_p,
        num_samples: int = GenerationArgs.num_samples,
        seed: int = GenerationArgs.seed,
        pass_k: list[int] | None = None,
    ) -> None:
        """Accuracy by generation on the validation rows, at the end of validation.

        Logs ``val/accuracy`` (and writes ``predictions/step_<N>.jsonl`` in the log directory);
        with ``num_samples > 1`` also ``val/pass@k`` for each k of ``pass_k`` and ``val/maj@n``
        (n = num_samples), every one a mean over rows.
        Under DDP each rank generates for its own slice of the rows and the counts are summed,
        so the accuracy is that of all rows (sharded strategies, FSDP/DeepSpeed, are skipped with a
        warning). Needs an ``SFTModule`` (``model``, ``tokenizer``) and an ``SFTDataModule``.

        Args:
            every_n_val: Run on every n-th validation (generation is slower than the val loss).
            num_rows: Score the first N validation rows (None: all); the same rows every time.
            max_new_tokens: Generation budget per answer; longer answers are cut (and usually wrong).
            batch_size: Prompts generated together.
            checker: Answer checker (exact, normalized, task, math); None: the built-in task's own
                checker, else normalized.
            predictions_file: Write per-example predictions (prompt, prediction, answer, correct).
            temperature: 0 is greedy decoding (the paper's evaluation); > 0 samples.
            top_p: Nucleus sampling mass (temperature > 0 only).
            num_samples: Answers per prompt (temperature > 0); accuracy averages over all of them
                (the paper's maths number: mean accuracy of 16 samples at temperature 1).
            seed: Sampling seed (the global RNG is left alone).
            pass_k: The k of the unbiased pass@k (each <= num_samples); None: num_samples alone
                (pass@1 would equal val/accuracy).
        """
        if every_n_val < 1:
            raise ValueError(f"every_n_val must be >= 1, got {every_n_val}")
        if num_rows is not None and num_rows < 1:
            raise ValueError(f"num_rows must be >= 1 or None, got {num_rows}")
        get_checker(checker)  # fail at construction on an unknown name
        if pass_k is not None and not all(1 <= int(k) <= num_samples for k in pass_k):
            raise ValueError(f"pass_k must lie in [1, num_samples={num_samples}], got {pass_k}")
        self.pass_k = None if pass_k is None else [int(k) for k in pass_k]
        self.every_n_val = every_n_val
        self.num_rows = num_rows
        self.checker = checker
        self.predictions_file = predictions_file
        self.generation = GenerationArgs(max_new_tokens, batch_size, temperature, top_p, num_samples, seed)
        self.validations = 0
        self._warned_sharded = False
        self.last_result: EvalResult | None = None  # this rank's last result (its slice of rows)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_val:
            return
        if is_sharded(trainer.strategy):
            # Sharded weights are only whole inside the wrapped forward; a generation loop outside it
            # would need every rank in lock step. Evaluate the exported model instead.
            if not self._warned_sharded:
                rank_zero_warn(
                    f"GenerationEval does not run under {type(trainer.strategy).__name__} (sharded weights); "
                    "evaluate the exported model: "
                    "python -m bnll_lightning evaluate --config ... --model.model <hf_model>"
                )
                self._warned_sharded = True
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "raw_rows"):
            raise RuntimeError("GenerationEval needs an SFTDataModule (trainer.datamodule with raw_rows)")
        rows = datamodule.raw_rows("val")[: self.num_rows]
        if not rows:
            rank_zero_warn("GenerationEval: no validation rows; skipping generation")
            return
        # Each rank takes every world_size-th row; indices stay global for the predictions file.
        mine = list(range(trainer.global_rank, len(rows), trainer.world_size))
        start = time.perf_counter()
        with trainer.precision_plugin.forward_context():
            result = evaluate_generation(
                pl_module.model, pl_module.tokenizer, [rows[i] for i in mine], datamodule,
                self.checker, **asdict(self.generation), pass_k=self.pass_k,
            )
        for p in result.predictions:
            p["index"] = mine[p["index"]]
        self.last_result = result
        # Each figure over all rows: a mean of this rank's predictions (or rows) that torchmetrics combines
        # over the ranks when it computes. The names come from the settings, not the result, so every rank
        # computes the same metrics in the same order.
        samples = self.generation.num_samples
        ks = (self.pass_k or [samples]) if samples > 1 else []
        extra = {f"pass@{k}": result.pass_at.get(k, 0.0) for k in ks}
        if samples > 1:
            extra[f"maj@{samples}"] = result.maj or 0.0
        n = _all_ranks(SumMetric(), pl_module.device, result.n)
        accuracy = _all_ranks(MeanMetric(), pl_module.device, result.accuracy, result.n)
        sampled = {name: _all_ranks(MeanMetric(), pl_module.device, v, result.rows) for name, v in extra.items()}
        # Identical on every rank already; sync_dist averages equal numbers (and keeps DDP quiet).
        pl_module.log("val/accuracy", accuracy, prog_bar=True, sync_dist=True)
        for name, value in sampled.items():
            pl_module.log(f"val/{name}", value, sync_dist=True)
        path = self._write(trainer, result.predictions) if self.predictions_file else None
        self.last_step = _logged_step(trainer)
        rank_zero_info(
            f"[bnll] val/accuracy {accuracy:.3f} ({round(accuracy * n)}/{int(n)})"
            + "".join(f", {name} {value:.3f}" for name, value in sampled.items()) + f" after step {trainer.global_step}, "
            f"{time.perf_counter() - start:.1f} s" + (f"; predictions: {path}" if path else "")
        )

    def _write(self, trainer: L.Trainer, predictions: list[dict[str, Any]]) -> str | None:
        """Gather every rank's predictions on rank zero and write them there, in row order."""
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size if trainer.is_global_zero else None
            torch.distributed.gather_object(predictions, gathered, dst=0)
            if not trainer.is_global_zero:
                return None
            predictions = sorted((p for part in gathered for p in part), key=lambda p: (p["index"], p["sample"]))
        if not trainer.is_global_zero:
            return None
        return write_jsonl(os.path.join(log_dir, "predictions", f"step_{trainer.global_step}.jsonl"), predictions)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))
