"""Feeds each validation's monitored metric to an α controller that listens (``PlateauAlpha``)."""

from __future__ import annotations

import math

import lightning.pytorch as L

from bnll_lightning.alpha import PlateauAlpha


def planned_validations(trainer: L.Trainer) -> int:
    """How many validations this fit will run, from the trainer's own schedule (an estimate: 0 when there is
    no validation data or ``limit_val_batches`` is 0)."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    # Lightning sets up the validation data at the first validation; doing it now is what it would do then.
    loop.setup_data()
    if not sum(trainer.num_val_batches) or trainer.val_check_batch is None:
        return 0
    per_epoch_batches = trainer.num_training_batches
    accumulate = trainer.accumulate_grad_batches
    budget = [math.inf]
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        budget.append(trainer.max_steps * accumulate)
    if trainer.max_epochs is not None and trainer.max_epochs >= 0 and math.isfinite(per_epoch_batches):
        budget.append(trainer.max_epochs * per_epoch_batches)
    total = min(budget)
    if not math.isfinite(total) or trainer.val_check_batch == math.inf:
        return 0 if not math.isfinite(total) else int(total // per_epoch_batches)
    every = trainer.check_val_every_n_epoch
    if every is None:  # validation every val_check_batch batches, across epochs
        return int(total // trainer.val_check_batch)
    epochs = int(total // per_epoch_batches) if math.isfinite(per_epoch_batches) else 1
    per_epoch = int(per_epoch_batches // trainer.val_check_batch) if math.isfinite(per_epoch_batches) else 0
    return (epochs // every) * per_epoch


class PlateauFeed(L.Callback):
    """At the start of fit: tells a :class:`~bnll_lightning.alpha.PlateauAlpha` how many validations the run
    has; after each validation (not the sanity check): feeds it the ``monitor`` metric. Lightning runs
    checkpoint callbacks after the others, so a checkpoint written at a validation holds the fed state."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        controller = getattr(pl_module, "alpha_controller", None)
        if isinstance(controller, PlateauAlpha) and controller.run_mode is None:
            controller.plan(planned_validations(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        controller = getattr(pl_module, "alpha_controller", None)
        if not isinstance(controller, PlateauAlpha) or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(controller.monitor)
        if value is None:
            raise KeyError(f"PlateauAlpha: monitor {controller.monitor!r} was not logged in validation; logged:"
                           f" {sorted(trainer.callback_metrics)}")  # fmt: skip
        level = controller.validate(float(value))
        for logger in trainer.loggers:  # self.log is not allowed in on_validation_end
            logger.log_metrics({"val/alpha_level": level}, step=trainer.global_step)
