"""Feeds each validation's monitored metric to an α controller that listens (``PlateauAlpha``)."""

from __future__ import annotations

import math

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from bnll_lightning.alpha import PlateauAlpha
from bnll_lightning.constraints import ConfigError
from bnll_lightning.strategies import is_sharded


def planned_validations(trainer: L.Trainer, batches: float | None = None) -> int:
    """How many validations Lightning's schedule runs within the first ``batches`` training batches (None: the
    whole fit); 0 when there is no validation data or ``limit_val_batches`` is 0."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    # Lightning sets up the validation data at the first validation; doing it now is what it would do then.
    loop.setup_data()
    if not sum(trainer.num_val_batches) or trainer.val_check_batch is None:
        return 0
    per_epoch = trainer.num_training_batches
    if batches is None:
        budget = [math.inf]
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            budget.append(trainer.max_steps * trainer.accumulate_grad_batches)
        if trainer.max_epochs is not None and trainer.max_epochs >= 0 and math.isfinite(per_epoch):
            budget.append(trainer.max_epochs * per_epoch)
        batches = min(budget)
    if not math.isfinite(batches) or not math.isfinite(per_epoch):
        return 0  # an endless or unsized run: no count to plan with
    every = trainer.check_val_every_n_epoch
    if every is None:  # every val_check_batch batches, counted across epochs
        return int(batches // trainer.val_check_batch)
    full, rest = divmod(int(batches), int(per_epoch))
    per = int(per_epoch // trainer.val_check_batch) if math.isfinite(trainer.val_check_batch) else 1
    count = (full // every) * per
    if (full + 1) % every == 0 and math.isfinite(trainer.val_check_batch):  # the epoch under way
        count += int(rest // trainer.val_check_batch)
    return count


def best_keeper(trainer: L.Trainer, controller: PlateauAlpha) -> ModelCheckpoint:
    """The run's ``ModelCheckpoint`` that keeps the best weights by the controller's ``monitor`` and ``mode``
    (``restore_best`` loads them at a rise); a :class:`ConfigError` saying what to add when there is none."""
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor == controller.monitor and callback.mode == controller.mode and callback.save_top_k != 0:
            return callback
    raise ConfigError(
        f"PlateauAlpha(restore_best=True) needs a ModelCheckpoint with monitor={controller.monitor!r},"
        f" mode={controller.mode!r} and save_top_k >= 1 in trainer.callbacks: it restores that checkpoint's weights"
    )


class PlateauFeed(L.Callback):
    """At the start of fit: tells a :class:`~bnll_lightning.alpha.PlateauAlpha` how many validations the run
    has; after each validation (not the sanity check): feeds it the ``monitor`` metric and, at a rise with
    ``restore_best``, loads the best weights so far. Lightning runs checkpoint callbacks after the others, so
    a checkpoint written at a validation holds the fed state and the restored weights."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        controller = getattr(pl_module, "alpha_controller", None)
        if not isinstance(controller, PlateauAlpha):
            return
        if controller.run_mode is None:
            controller.plan(planned_validations(trainer))
        elif controller.run_mode == "validation":
            # Lightning resumes a checkpoint written at a validation's training batch *after* that validation
            # (it fast-forwards the loop): the controller never sees it. Said, not silently different.
            due = planned_validations(trainer, trainer.global_step * trainer.accumulate_grad_batches)
            if due > controller.validations:
                rank_zero_warn(
                    f"PlateauAlpha: resumed at step {trainer.global_step} from a checkpoint written before that step's"
                    f" validation, which Lightning does not rerun: the controller has seen {controller.validations} of"
                    f" {due} validations, so alpha may rise one validation later than in an uninterrupted run. Save"
                    " checkpoints after validation (ModelCheckpoint with monitor=...) for an exact resume."
                )
        if controller.restore_best and controller.run_mode == "validation":
            best_keeper(trainer, controller)  # fails now, not at the first rise
            # A sharded strategy's checkpoint is not one state dict to load, and its loader restores the optimizer.
            if is_sharded(trainer.strategy):
                raise ConfigError(f"PlateauAlpha(restore_best=True) runs on one device or under DDP, not under"
                                  f" {type(trainer.strategy).__name__}")  # fmt: skip

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        controller = getattr(pl_module, "alpha_controller", None)
        if not isinstance(controller, PlateauAlpha) or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(controller.monitor)
        if value is None:
            raise KeyError(f"PlateauAlpha: monitor {controller.monitor!r} was not logged in validation; logged:"
                           f" {sorted(trainer.callback_metrics)}")  # fmt: skip
        rises = len(controller.rises)
        level = controller.validate(float(value))
        if controller.restore_best and len(controller.rises) > rises:
            path = best_keeper(trainer, controller).best_model_path
            if not path:
                raise RuntimeError(f"PlateauAlpha: no best checkpoint by {controller.monitor!r} on disk to restore")
            # Weights only: the optimizer's moments and the schedule go on (a file this run wrote, hence not the
            # safe loader: its hyper-parameters may hold callables).
            trainer.strategy.load_model_state_dict(trainer.strategy.load_checkpoint(path, weights_only=False))
            controller.restored.append(trainer.global_step)
        for logger in trainer.loggers:  # self.log is not allowed in on_validation_end
            logger.log_metrics({"val/alpha_level": level}, step=trainer.global_step)
