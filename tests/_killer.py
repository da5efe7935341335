"""A callback for tests/test_resume.py: SIGKILL the training process part-way through a step."""

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
