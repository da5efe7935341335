"""Config validation: number types with a valid range for ``__init__`` signatures, and the error for a rejected value.

jsonargparse checks them while it parses a config, so ``--model.objective.tau 1.5`` fails before
any model is loaded, with the option's name in the message. They are ``float``/``int``
subclasses, so code that passes plain numbers is unaffected; classes keep their own checks for
programmatic use. No Lightning import here: ``objectives.py`` and ``alpha.py`` stay light.

A value that parses but is rejected later (a model path that does not exist, a checkpoint of another
model, packing for a model that cannot keep rows apart) raises :class:`ConfigError`: the CLI prints
it in one line and exits with code 2, wherever it is raised.
"""

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

__all__ = [
    "ClosedUnitInterval",
    "ConfigError",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "UnitIntervalClosedOpen",
    "UnitIntervalOpenClosed",
]



class ConfigError(ValueError):
    """A config value that parses but that the code rejects (when a class is built, or when fit starts)."""


UnitIntervalClosedOpen = restricted_number_type("UnitIntervalClosedOpen", float, [(">=", 0), ("<", 1)])
"""A float in [0, 1) (a probability threshold, an EMA decay)."""

UnitIntervalOpenClosed = restricted_number_type("UnitIntervalOpenClosed", float, [(">", 0), ("<=", 1)])
"""A float in (0, 1] (a fraction that must keep something)."""
