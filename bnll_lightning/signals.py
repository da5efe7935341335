"""SIGTERM during fit: finish the optimizer step, write a checkpoint to resume from, and exit with 143.

What SLURM preemption, Kubernetes, ``timeout`` and job runners send is SIGTERM. Lightning 2.6 stops at
the end of the *micro-batch* it arrives in, writes nothing and exits with code 0 (its
``SIGTERMException`` is a ``SystemExit`` without a code; fixed upstream in Lightning PR #21623, not in
the release installed here), so a scheduler reads a preempted job as a success and the work since the
last periodic checkpoint is gone. :class:`SignalCheckpoint` (added to every fit by ``SFTModule``)
instead lets the optimizer step in progress finish, so no accumulated gradient is lost, writes
``last-sigterm.ckpt`` beside the periodic checkpoints at that step boundary (the point where
``ModelCheckpoint`` saves, so the resume is exact as after a kill), and stops the fit with
:class:`Preempted`: exit code 143 (128 + SIGTERM) and, from the CLI, the command that resumes.
"""

from __future__ import annotations

import os
import signal
import threading
from functools import partial
from types import FrameType
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["CHECKPOINT_NAME", "EXIT_CODE", "Preempted", "SignalCheckpoint", "checkpoint_path", "remove_stopgap"]

#: The checkpoint a SIGTERM writes; its name starts with "last", so ``--ckpt_path last`` finds it.
CHECKPOINT_NAME = "last-sigterm.ckpt"
#: The exit status of a process stopped by SIGTERM, by the shell's convention.
EXIT_CODE = 128 + int(signal.SIGTERM)


class Preempted(SIGTERMException):
    """Fit stopped by SIGTERM after writing ``checkpoint`` at optimizer step ``step``; exits with 143.

    A :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException`, so callbacks that act on
    Lightning's (``OnExceptionCheckpoint``) see it as one. ``found_by_last``: ``--ckpt_path last``
    resumes from it (a ``ModelCheckpoint`` looks in its folder), else resume from the path itself.
    """

    def __init__(self, checkpoint: str, step: int, found_by_last: bool, global_zero: bool = True) -> None:
        super().__init__(EXIT_CODE)
        self.checkpoint, self.step, self.found_by_last, self.global_zero = checkpoint, step, found_by_last, global_zero


class SignalCheckpoint(L.Callback):
    """On SIGTERM during training: finish the optimizer step in progress, write :data:`CHECKPOINT_NAME`,
    and stop with :class:`Preempted` (exit code 143).

    The checkpoint goes to the ``ModelCheckpoint``'s folder (``<log dir>/checkpoints`` without one:
    nothing is lost with checkpointing off either) and is written at a step boundary, as the periodic
    ones are. The run then stops before the next batch or validation (a validation due at that step
    is skipped, and the resumed run skips it too); a SIGTERM during validation takes effect after the
    next step. When the step was the run's last, the run finishes and exports as usual and the
    checkpoint is removed, as it is at the end of any run that completes (the resumed one included).
    Under several processes every rank stops at the same step, the first after any rank's SIGTERM.
    """

    def __init__(self) -> None:
        self.pending = False  # a SIGTERM has arrived and not been acted on
        self.saved: Preempted | None = None  # written at the last step boundary; raised at the next hook
        self._step_at_batch_start = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.pending, self.saved = False, None
        # Lightning's handler (registered before this hook) makes its loops stop after the current
        # micro-batch, mid-accumulation; this one only takes note, and the step boundary acts on it.
        # Lightning's teardown puts back the handlers that were there before fit.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, partial(self._on_sigterm, trainer))

    def _on_sigterm(self, trainer: L.Trainer, signum: int, frame: FrameType | None) -> None:
        if not self.pending and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # as Lightning's handler: processes it started get it too
        self.pending = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        self._raise_if_saved()
        self._step_at_batch_start = trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_if_saved()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if trainer.global_step == self._step_at_batch_start:
            return  # mid-accumulation: a checkpoint here would drop the step's gradients so far
        stop = self.pending
        if trainer.world_size > 1:  # one small all-reduce per optimizer step: every rank stops at the same one
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path, found_by_last = checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"[bnll] SIGTERM: checkpoint of step {trainer.global_step} written to {path}")
        # Raised at the next batch or validation, not here: this step's scalars reach the logger first.
        self.saved = Preempted(path, trainer.global_step, found_by_last, trainer.is_global_zero)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        remove_stopgap(trainer, CHECKPOINT_NAME)  # the run completed (a SIGTERM at its last step included)
        if self.saved is not None:
            rank_zero_info("[bnll] SIGTERM arrived in the last optimizer step: the run finished instead of stopping")
            self.saved = None

    def _raise_if_saved(self) -> None:
        if self.saved is not None:
            raise self.saved


def remove_stopgap(trainer: L.Trainer, name: str) -> None:
    """Once a run has gone past it: remove the checkpoint called ``name`` that a stopped run left, in this
    run's checkpoint folder and the one this run resumed from."""
    paths = {checkpoint_path(trainer, name)[0], str(trainer.ckpt_path or "")}
    for path in paths:
        if os.path.basename(path) == name and os.path.isfile(path) and trainer.is_global_zero:
            trainer.strategy.remove_checkpoint(path)


def checkpoint_path(trainer: L.Trainer, name: str = CHECKPOINT_NAME) -> tuple[str, bool]:
    """Where a checkpoint to resume from called ``name`` goes (beside the periodic ones, else in
    ``<log dir>/checkpoints``), and whether ``--ckpt_path last`` finds it there (it does in a
    ``ModelCheckpoint``'s folder, for a name that starts with "last")."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return os.path.join(str(callback.dirpath), name), name.startswith("last")
    root = trainer.log_dir or trainer.default_root_dir
    return os.path.join(str(root), "checkpoints", name), False
