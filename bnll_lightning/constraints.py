"""Number types with a valid range, for ``__init__`` signatures that the CLI turns into options.

jsonargparse checks them while it parses a config, so ``--model.objective.tau 1.5`` fails before
any model is loaded, with the option's name in the message. They are ``float``/``int``
subclasses, so code that passes plain numbers is unaffected; classes keep their own checks for
programmatic use. No Lightning import here: ``objectives.py`` and ``alpha.py`` stay light.
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
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "UnitIntervalClosedOpen",
    "UnitIntervalOpenClosed",
]

UnitIntervalClosedOpen = restricted_number_type("UnitIntervalClosedOpen", float, [(">=", 0), ("<", 1)])
"""A float in [0, 1) (a probability threshold, an EMA decay)."""

UnitIntervalOpenClosed = restricted_number_type("UnitIntervalOpenClosed", float, [(">", 0), ("<=", 1)])
"""A float in (0, 1] (a fraction that must keep something)."""
