"""Eval mode for a block of code, every submodule's own training flag restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the ``with`` block and give it back as it was, even on an error.

    Each submodule's flag is restored, not ``model.train(previous)``: a model whose parts differ
    (a frozen part kept in eval) keeps them as they were.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training
