"""Test callbacks (tests/test_resume.py, test_signals.py): signals to the training process mid-step, slow steps."""

import os
import signal

from lightning.pytorch import Callback


class KillMidStep(Callback):
    """Kill this process (SIGKILL: no cleanup, no checkpoint on exit) at the second micro-batch of
    the optimizer step after ``step``, i.e. after step ``step``'s checkpoint is on disk and with
    half a step of gradients accumulated."""

    def __init__(self, step: int):
        self.step = step
        self.seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.seen += 1
            if self.seen == 2:
                os.kill(os.getpid(), signal.SIGKILL)


class TermMidStep(Callback):
    """Send this process SIGTERM (a real signal, as a scheduler sends it) at the first micro-batch of the
    optimizer step after ``step``: the signal arrives with the step's gradients half accumulated."""

    def __init__(self, step: int):
        self.step = step
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


class SlowSteps(Callback):
    """Sleep after every micro-batch, so that a test can send a signal while the run is under way."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs):
        import time

        time.sleep(self.seconds)
